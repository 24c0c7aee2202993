"""What makes `make test`'s parallel run (pytest-xdist, ``-n logical``) safe and balanced: the scheduler hands a
worker whole files (ddiminv_dev.xdist_units), workers draw server ports from disjoint slices
(ddiminv_dev.server.free_port), and the on-disk caches that several workers build at once are built by one
while the others wait (ddiminv_dev.cache.file_lock, used by the scenes' CLIP cache and latent pool)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ddiminv_dev import server, xdist_units

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ the scheduler
@pytest.mark.parametrize("nodeid, unit", [
    ("tests/host/test_refine.py::test_a[x-1]", "host/test_refine.py"),
    ("unit/test_checks.py::TestA::test_b", "unit/test_checks.py"),
    ("tests/server/test_ray_batch.py::test_job", "ray"),
    ("server/test_ray_batch_fake.py::test_fake[2]", "ray"),
    ("tests/server/test_runner.py::test_run", "server/test_runner.py"),
])
def test_a_test_belongs_to_its_file_or_its_serial_group(nodeid, unit):
    assert xdist_units.unit_of(nodeid) == unit


def test_the_slowest_units_go_out_first_then_collection_order(monkeypatch):
    monkeypatch.setattr(xdist_units, "SLOW_UNITS", {"b.py": 10.0, "d.py": 30.0, "z.py": 99.0})
    pending = ["a.py", "b.py", "c.py", "d.py", "e.py"]
    order = []
    while pending:
        order.append(xdist_units.next_unit(pending))
        pending.remove(order[-1])
    assert order == ["d.py", "b.py", "a.py", "c.py", "e.py"]


def test_an_explicit_dist_mode_keeps_xdists_scheduler():
    class Config:
        def getvalue(self, name):
            return {"dist": "each"}[name]
    assert xdist_units.make_scheduler(Config(), log=None) is None


def test_a_parallel_run_gives_each_file_to_one_worker(tmp_path):
    """Two workers, three files of six tests: every file's tests run in one worker. (With xdist's per-test
    scheduling, which `--dist loadgroup` silently falls back to under pytest 9.2, files are split.)"""
    (tmp_path / "conftest.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import pytest

        @pytest.hookimpl(optionalhook=True)
        def pytest_xdist_make_scheduler(config, log):
            from ddiminv_dev import xdist_units
            return xdist_units.make_scheduler(config, log)
        """))
    for f in "abc":
        (tmp_path / f"test_{f}.py").write_text(textwrap.dedent(f"""
            import json, os, time
            import pytest

            @pytest.mark.parametrize("i", range(6))
            def test_{f}(i):
                time.sleep(0.05)
                with open({str(tmp_path / "ran.jsonl")!r}, "a") as out:
                    out.write(json.dumps(["{f}", os.environ["PYTEST_XDIST_WORKER"]]) + "\\n")
            """))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider",
                        "--rootdir", str(tmp_path), str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ran = [json.loads(line) for line in (tmp_path / "ran.jsonl").read_text().splitlines()]
    assert len(ran) == 18
    workers = {f: {w for g, w in ran if g == f} for f in "abc"}
    assert all(len(w) == 1 for w in workers.values()), workers
    assert set().union(*workers.values()) == {"gw0", "gw1"}  # and both workers had work


# ------------------------------------------------------------------------------------------------------ ports
def test_xdist_workers_draw_ports_from_disjoint_slices(monkeypatch):
    seen = {}
    for k in (0, 1, 3):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{k}")
        lo = server.PORT_BASE + server.PORT_SLICE * k
        seen[k] = {server.free_port() for _ in range(5)}
        assert all(lo <= p < lo + server.PORT_SLICE for p in seen[k]), (k, seen[k])
    assert len(seen[0] | seen[1] | seen[3]) == 15


def test_a_port_in_use_is_not_handed_out(monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw11")  # a slice no worker of `make test` (at most 4) draws from
    monkeypatch.setattr(server, "_port_offset", 0)
    busy = server.PORT_BASE + server.PORT_SLICE * 11 + 1  # the next one the slice would give
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", busy))
        except OSError:
            pytest.fail(f"port {busy} is taken on this machine already; the test needs it free")
        s.listen()
        assert server.free_port() == busy + 1


# --------------------------------------------------------------------------------------------- shared caches
_ENCODER = """
import sys, time
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[1])
from ddiminv_dev.scenes import train as ST

class Clip:
    def tokenize(self, t):
        return t
    def encode_from_tokens(self, t, return_pooled):
        time.sleep(0.2)
        return torch.full((1, 2, 3), float(len(t))), torch.zeros(1, 3)

def load():
    with open(sys.argv[3], "a") as f:
        f.write("loaded\\n")
    return Clip()

# both processes start encoding together (a barrier of two files): without the lock both see the cache missing
ready = Path(sys.argv[2]).parent / "ready"
ready.mkdir(exist_ok=True)
(ready / sys.argv[4]).touch()
deadline = time.monotonic() + 120
while len([p for p in ready.iterdir() if p.name in ("0", "1")]) < 2 and time.monotonic() < deadline:
    time.sleep(0.01)
out = ST.encode_cached(["a", "bb", "ccc", "dddd"], Path(sys.argv[2]), load, lambda cond, pooled: cond[0])
print([float(x[0, 0]) for x in out])
"""


def test_two_processes_building_one_text_cache_encode_once(tmp_path):
    """Two processes (two xdist workers) ask for the same uncached texts at once: one loads the encoder and
    encodes, the other waits for the lock and reads the cache. Without the lock both load and both write."""
    code, cache, calls = tmp_path / "enc.py", tmp_path / "contexts.pt", tmp_path / "calls.txt"
    code.write_text(_ENCODER)
    procs = [subprocess.Popen([sys.executable, str(code), str(ROOT), str(cache), str(calls), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert [o[0].strip().splitlines()[-1] for o in outs] == ["[1.0, 2.0, 3.0, 4.0]"] * 2
    assert calls.read_text().count("loaded") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["enc.py", "contexts.pt", "contexts.pt.lock",
                                                                  "calls.txt", "ready"])  # no temporary file left


def test_a_port_answered_by_another_process_is_not_taken_for_the_server():
    """start_server accepts a server only when its own process listens on the port: between free_port() and the
    server's bind another process may take the port, and its answer must not pass for ours."""
    import os
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert server._listens(os.getpid(), port)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            assert not server._listens(child.pid, port)
        finally:
            child.kill()
            child.wait()
