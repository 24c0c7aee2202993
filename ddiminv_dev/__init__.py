"""Development code of ddim-inversion: the one package that tests, benchmarks and the demo import.

Never shipped to users' node list: ComfyUI loads the pack from the repository root's ``__init__.py``,
which imports only ``nodes/`` and ``inversion/``. Nothing here is imported by the pack.

Layout: ``paths`` (where the repository, its cache and ComfyUI are), ``gmm`` (the analytic oracle, pure
torch), and -- with ComfyUI importable -- ``host`` (the one in-process executor harness) and the model and
file generators.
"""
