"""Server tier fixtures: one real ComfyUI server for the whole tier, plus a factory for more."""
from __future__ import annotations

import pytest

from ddiminv_dev.server import start_server


@pytest.fixture(scope="session")
def server():
    handle = start_server()
    print(f"ComfyUI server up at {handle.url} in {handle.start_seconds:.1f}s (log: {handle.log_path})")
    yield handle
    handle.stop()


@pytest.fixture
def server_factory():
    """``server_factory(extra_args=(), port=None)`` starts another server; all are stopped after the test."""
    started = []

    def make(extra_args=(), port=None, **kw):
        h = start_server(extra_args=extra_args, port=port, **kw)
        started.append(h)
        return h

    yield make
    for h in started:
        h.stop()
