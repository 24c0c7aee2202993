"""How `make test` splits the suite between pytest-xdist workers (``-n logical``, one per CPU, at most 4).

A worker takes whole *units*: a unit is one test file, so a file's module- and session-scoped fixtures (the scenes
readers' renders, a server, a booted ComfyUI) are built once, not once per worker; the files that start a local
Ray are one unit (two Ray clusters at once would compete for the same CPUs and /tmp/ray). The slowest units go out
first, so the run does not end with one worker idle while the other finishes a long file.

xdist's own ``--dist loadgroup`` cannot do this under pytest 9.2: it marks a group by renaming ``item._nodeid``,
which pytest 9 no longer reads (its node ids come from ``item._id``), so every test was scheduled alone.
"""
from __future__ import annotations

# files (relative to tests/) that must run in one worker, one after the other
SERIAL_UNITS = {"ray": ("server/test_ray_batch.py", "server/test_ray_batch_fake.py")}

# seconds of the slowest units (sums of their tests' --durations) in one `pytest -n 2` run on the 2-core CPU
# (2026-12-07, under load); only their order matters: a unit not listed counts as 0 and keeps xdist's queue order
SLOW_UNITS = {
    "ray": 740, "server/test_hardening_server.py": 500, "server/test_example_workflows.py": 456,
    "unit/test_bench_smoke.py": 268, "unit/test_ci_clone_names.py": 193, "server/test_browser.py": 181,
    "host/test_scenes_readers.py": 110, "host/test_video_vae.py": 87, "host/test_attention_control.py": 87,
    "host/test_nulltext.py": 86, "host/test_demo.py": 70, "server/test_runner.py": 62,
}


def unit_of(nodeid: str) -> str:
    """The unit of work a test belongs to: its file (relative to tests/), or the name of a SERIAL_UNITS group."""
    path = nodeid.split("::", 1)[0]
    path = path[len("tests/"):] if path.startswith("tests/") else path
    for unit, files in SERIAL_UNITS.items():
        if path in files:
            return unit
    return path


def next_unit(pending) -> str:
    """Of the units not yet handed out (in xdist's queue order: by default its --loadscope-reorder puts the
    units with the most tests first), the one to hand out next: the slowest listed in SLOW_UNITS, else the first."""
    return max(enumerate(pending), key=lambda iu: (SLOW_UNITS.get(iu[1], 0), -iu[0]))[1]


def make_scheduler(config, log):
    """The xdist scheduler of `make test` (for ``pytest_xdist_make_scheduler``); None (xdist's own) when the
    command line names a ``--dist`` other than the default ``load``."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Units(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

        def _assign_work_unit(self, node) -> None:
            if self.workqueue:
                self.workqueue.move_to_end(next_unit(self.workqueue), last=False)
            super()._assign_work_unit(node)

    return Units(config, log)
