"""Check unit tests against mutmut's mutants of one module, in one process (docs/mutation.md).

mutmut 3 forks a pytest run per mutant; on a shared 2-core machine at the lowest priority that run can get no CPU
for minutes. This runs the same mutants (the trampolines mutmut wrote into ``mutants/``, chosen by
``MUTANT_UNDER_TEST``) against plain test functions imported once: a mutant is *killed* when one of the selected
tests raises. Only tests without fixtures (``parametrize`` is expanded); the tests run without a mutant first and
must pass. Run it inside ``mutants/`` after ``mutmut run`` has generated them::

    cd mutants && ../.venv/bin/python ../tools/mutant_check.py inversion.checks tests/unit/test_checks.py \
        [--only test_a,test_b]  [--names FILE]

It prints ``killed NAME TEST`` or ``survived NAME`` per mutant and the totals.
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import sys


def _cases(paths, only):
    cases = []
    for path in paths:
        modname = "mutant_check_" + os.path.basename(path)[:-3]
        spec = importlib.util.spec_from_file_location(modname, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[modname] = mod
        spec.loader.exec_module(mod)
        for name, fn in vars(mod).items():
            if not (name.startswith("test") and callable(fn)) or getattr(fn, "__module__", "") != modname:
                continue
            if only and not any(o == name or name.startswith(o) for o in only):
                continue
            params = [{}]
            for mark in getattr(fn, "pytestmark", []):
                if mark.name != "parametrize":
                    continue
                argnames = mark.args[0]
                argnames = [a.strip() for a in argnames.split(",")] if isinstance(argnames, str) else list(argnames)
                params = [{**p, **dict(zip(argnames, getattr(v, "values", v) if len(argnames) > 1 else (v,),
                                           strict=True))}
                          for p in params for v in mark.args[1]]
            missing = set(inspect.signature(fn).parameters) - set(params[0])
            if missing:
                sys.exit(f"{name} needs fixtures {sorted(missing)}: leave it out with --only")
            cases += [(name, fn, p) for p in params]
    return cases


def _first_failure(cases, mutant):
    os.environ["MUTANT_UNDER_TEST"] = mutant
    for name, fn, p in cases:
        try:
            fn(**p)
        except KeyboardInterrupt:
            raise
        except BaseException:   # noqa: BLE001 -- a mutant may raise anything (pytest.fail/raises: BaseException)
            return name
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("module", help="e.g. inversion.checks (its mutants are listed in inversion/checks.py.meta)")
    ap.add_argument("tests", nargs="+", help="test files, relative to mutants/")
    ap.add_argument("--only", default="", help="comma-separated test function names (or prefixes) to run")
    ap.add_argument("--names", help="a file of mutant names, one a line (default: all of the module's)")
    a = ap.parse_args(argv)
    sys.path.insert(0, os.getcwd())
    if a.names:
        with open(a.names) as f:
            names = [line.strip() for line in f if line.strip()]
    else:
        with open(a.module.replace(".", "/") + ".py.meta") as f:
            names = sorted(json.load(f)["exit_code_by_key"])
    cases = _cases(a.tests, [o for o in a.only.split(",") if o])
    print(f"{len(cases)} test cases, {len(names)} mutants", flush=True)
    failed = _first_failure(cases, "none.none")
    if failed:
        sys.exit(f"{failed} fails without a mutant")
    killed = 0
    for n in names:
        failed = _first_failure(cases, n)
        killed += failed is not None
        print(f"killed {n} {failed}" if failed else f"survived {n}", flush=True)
    print(f"killed {killed} of {len(names)}, survived {len(names) - killed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
