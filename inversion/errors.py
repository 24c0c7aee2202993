"""The pack's one error model (pure python).

Every bad input any of the pack's nodes sees raises :class:`InversionInputError` with one message style::

    <Node display name>: <what is wrong>; <the fix>

The checks (``inversion.checks``, ``inversion.schedule``, ``Options.check``) raise it without the node name;
each node runs inside :func:`node_boundary`, which prefixes its display name. ``MethodError`` and
``ScheduleError`` are the same error raised from the math core (subclasses, so callers of the core can
catch either); at the node boundary they become a plain ``InversionInputError``.
"""
from __future__ import annotations

from contextlib import contextmanager


class InversionInputError(ValueError):
    """Bad input: the message says what is wrong and, after a ';', the fix."""


@contextmanager
def node_boundary(display_name: str):
    """Run a node body; any InversionInputError (or subclass) leaves as one InversionInputError whose message
    starts with ``"<display_name>: "``."""
    try:
        yield
    except InversionInputError as e:
        msg = str(e)
        if not msg.startswith(display_name + ": "):
            msg = f"{display_name}: {msg}"
        raise InversionInputError(msg) from None
