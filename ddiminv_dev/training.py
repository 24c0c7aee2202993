"""What the trainers of the development models share (the learned model, the scenes UNet, the scenes flow DiT and
their TAESDs): log lines, the training loop, the resumable model state, and the command-line tools' plumbing.

* :func:`loop`: the iterations ``start..iterations`` of one ``step``: learning rate per iteration, a running loss,
  a log line every ``log_every`` iterations and at the end, a save every ``save_every`` iterations and/or every
  ``save_minutes`` and at the end, and an optional ``minutes`` budget that ends (and saves) the run early.
* :class:`Resumable`: a model with its AdamW optimiser, EMA of the weights and batch RNG. It resumes from the full
  state (model, EMA, optimiser, RNG; git-ignored ``*_state.pt``) when there is one, else from the shipped fp16 EMA
  weights (their metadata holds the iteration count), else from an initialiser; it saves both (the full state
  written to a temporary file and renamed, so a killed run never leaves half a file). Learning rates that depend
  only on the iteration (constant after a warm-up) make a run split over sessions train exactly like one run.
* :func:`tool_parser`, :func:`vae_then_model` and :func:`run_tool`: the ``tools/train_*.py`` command lines.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch


def log_line(log, msg: str) -> None:
    """Print ``[HH:MM:SS] msg`` and, with ``log`` (a path), append it there too."""
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if log is not None:
        with open(log, "a") as f:
            f.write(line + "\n")


def meta(path: Path) -> dict:
    """The string metadata of a safetensors file."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def save_weights(sd: dict, path: Path, meta: dict) -> None:
    """Write ``sd`` as safetensors with ``meta`` (values as strings), via a temporary file."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")  # per process: two writers never share a temporary file
    save_file(sd, str(tmp), metadata={k: str(v) for k, v in meta.items()})
    tmp.replace(path)


def fp16(sd: dict) -> dict:
    """``sd`` as contiguous float16 CPU tensors (what the weights files hold)."""
    return {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in sd.items()}


def warmup(lr: float, n: int, start: int = 0):
    """Learning rate per iteration: ``lr`` ramped linearly over the ``n`` iterations after ``start``."""
    return lambda it: lr * min(1.0, (it - start + 1) / n)


def loop(step, start: int, iterations: int, *, opt, lr_at, name: str, log, t0: float, save, log_every: int = 25,
         save_every: int | None = None, save_minutes: float | None = None, minutes: float | None = None,
         decay: tuple = (0.99, 0.01)) -> float | None:
    """Run ``lv = step(it)`` for ``it`` in ``start..iterations`` (or until ``minutes`` of it have passed), with
    ``opt``'s learning rate ``lr_at(it)``; ``run`` is the running loss (``decay[0] * run + decay[1] * loss``). Logs
    ``"<name> it <n>/<iterations> loss <run>"`` every ``log_every`` iterations and at the end; calls
    ``save(n, run)`` every ``save_every`` iterations, when ``save_minutes`` have passed since the last save, and at
    the end. Returns the running loss (None when there was nothing to do)."""
    run = None
    last_save = t_train = time.perf_counter()
    for it in range(start, iterations):
        for group in opt.param_groups:
            group["lr"] = lr_at(it)
        lv = step(it)
        run = lv if run is None else decay[0] * run + decay[1] * lv
        done = it + 1 == iterations or (minutes is not None and time.perf_counter() - t_train > minutes * 60)
        if (it + 1) % log_every == 0 or done:
            log_line(log, f"{name} it {it + 1}/{iterations} loss {run:.4f} ({time.perf_counter() - t0:.0f}s)")
        if (done or (save_every is not None and (it + 1) % save_every == 0)
                or (save_minutes is not None and time.perf_counter() - last_save > save_minutes * 60)):
            save(it + 1, run)
            last_save = time.perf_counter()
        if done:
            break
    return run


class Resumable:
    """``net`` (on ``device``) trained by AdamW (``lr``, no weight decay) with an EMA of its weights and a batch
    RNG seeded ``seed``: ``out`` holds the fp16 EMA weights, ``state_path`` (optional) the full state."""

    def __init__(self, net, out: Path, state_path: Path | None, *, lr: float, seed: int, name: str, log=None,
                 device: str = "cpu"):
        self.net, self.out, self.state_path = net, Path(out), state_path
        self.seed, self.name, self.log, self.device = int(seed), name, log, device
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.g = torch.Generator().manual_seed(self.seed)
        self.avg: dict = {}
        self.start = 0

    def resume(self, init=None, weights: bool = True) -> int:
        """Load the full state if there is one, else (``weights``) the fp16 weights ``out`` if they exist, else the
        state dict ``init()`` returns (nothing loaded when ``init`` is None or returns None); the batch RNG is then
        seeded ``seed + start``. Returns the iteration to start from."""
        from safetensors.torch import load_file
        if self.state_path is not None and Path(self.state_path).exists():
            st = torch.load(self.state_path, map_location="cpu", weights_only=False)
            self.net.load_state_dict(st["model"])
            self.avg = {k: v.to(self.device) for k, v in st["ema"].items()}
            self.opt.load_state_dict(st["opt"])
            self.g.set_state(st["rng"])
            self.start = int(st["iterations"])
            log_line(self.log, f"{self.name}: resumed full state at iteration {self.start}")
            return self.start
        sd = None
        if weights and self.out.exists():
            sd, self.start = load_file(str(self.out)), int(meta(self.out).get("iterations", 0))
            log_line(self.log, f"{self.name}: resumed from fp16 weights at iteration {self.start}")
        elif init is not None:
            sd = init()
        if sd is not None:
            self.net.load_state_dict({k: v.float() for k, v in sd.items()})
        self.avg = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        self.g.manual_seed(self.seed + self.start)
        return self.start

    def save(self, it: int, meta: dict) -> None:
        """Write the fp16 EMA weights (``meta`` in their metadata) and, with a ``state_path``, the full state."""
        save_weights(fp16(self.avg), self.out, meta)
        if self.state_path is not None:
            tmp = Path(self.state_path).with_suffix(".tmp")
            torch.save({"model": self.net.state_dict(), "ema": self.avg, "opt": self.opt.state_dict(),
                        "rng": self.g.get_state(), "iterations": it}, tmp)
            tmp.replace(self.state_path)

    def train(self, step, iterations: int, *, lr_at, ema: float, meta, t0: float, **kw) -> float | None:
        """:func:`loop` from :meth:`resume`'s start: ``step(g)`` (one optimiser step on a batch drawn from the RNG
        ``g``, returning the loss), then the EMA update (decay ``ema``); saves with metadata ``meta(it, run)``."""
        from ddiminv_dev.learned.train import ema_update

        def one(it):
            lv = step(self.g)
            ema_update(self.avg, self.net, ema, it)
            return lv

        return loop(one, self.start, iterations, opt=self.opt, lr_at=lr_at, name=self.name, log=self.log, t0=t0,
                    save=lambda it, run: self.save(it, meta(it, run)), **kw)


# ------------------------------------------------------------------------------------------------ the tools
def tool_parser(doc: str, *, out: Path, vae_iters: int, threads: int = 2):
    """The arguments every ``tools/train_*.py`` takes: ``--vae-iters``, ``--out``, ``--threads``, ``--log``."""
    import argparse
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae-iters", type=int, default=vae_iters)
    ap.add_argument("--out", type=Path, default=out)
    ap.add_argument("--threads", type=int, default=threads)
    ap.add_argument("--log", default=None, help="also append the progress lines to this file")
    return ap


def add_scenes_args(ap, model: str, iters_flag: str, default_iters: int = 20000) -> None:
    """The scenes trainers' arguments: model iterations (``iters_flag``), captions, batch, saving, budget, device."""
    from ddiminv_dev.scenes import train
    ap.add_argument(iters_flag, type=int, default=default_iters)
    ap.add_argument("--n2", type=int, default=train.N2, help="two-object training captions")
    ap.add_argument("--n3", type=int, default=train.N3, help="three-object training captions")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--save-minutes", type=float, default=4.0)
    ap.add_argument("--minutes", type=float, default=None,
                    help=f"stop the {model} after this many minutes of training (saved; the next run resumes)")
    ap.add_argument("--device", default="cpu",
                    help=f"torch device of the {model} training (e.g. cuda); the VAE trains on the CPU")


def vae_then_model(ap, args, *, model: str, model_file: Path, vae_file: Path, fresh: str, train_vae,
                   train_model, iters: int) -> int:
    """A scenes tool's run: refuse to train the VAE past the one ``model_file`` was trained on, train the VAE
    (``train_vae(out, iterations, save_minutes, log)``), then, with ``iters`` > 0, the model
    (``train_model(vae, captions)``, returning its weights file)."""
    from ddiminv_dev.scenes import train
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if model_file.exists() and vae_file.exists():
        done = int(meta(vae_file).get("iterations", 0))
        if args.vae_iters > done:
            ap.error(f"the {model} in {args.out} was trained on the latents of the VAE at {done} iterations; training "
                     f"the VAE further would invalidate it: pass --vae-iters {done} (or move {model_file.name} away to "
                     f"retrain the {model} from {fresh})")
    vae = train_vae(args.out, iterations=args.vae_iters, save_minutes=args.save_minutes, log=args.log)
    print(f"VAE: {args.vae_iters} iterations ({time.perf_counter() - t0:.0f}s) -> {vae}")
    if iters > 0:
        out = train_model(vae, train.training_captions(n2=args.n2, n3=args.n3))
        print(f"{model}: {meta(out).get('iterations')} of {iters} iterations -> {out}")
    print(f"total {time.perf_counter() - t0:.0f}s")
    return 0


def run_tool(main) -> None:
    """A tool's ``__main__`` (once the repository is on ``sys.path``): run ``main()`` in the repository folder and
    exit with its status."""
    import os

    from ddiminv_dev.paths import ROOT
    os.chdir(ROOT)
    raise SystemExit(main())
