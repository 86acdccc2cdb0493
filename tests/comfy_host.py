"""Import the real ComfyUI 0.3.75 host (unpacked by `make host` into .host/ComfyUI) in-process, on CPU.

Tests call `import_comfy()` before touching any `comfy.*` module. The host is never a stand-in: if it
is missing the tests fail with the command that installs it.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST_DIR = Path(os.environ.get("LORA_CORE_COMFYUI", REPO / ".host" / "ComfyUI"))

_imported = False


def import_comfy(cpu: bool = True):
    """Put ComfyUI on sys.path with `--cpu` (unless `cpu=False`: GPU benchmarks want ComfyUI's real device
    handling) and import its core modules once. Returns the `comfy` package."""
    global _imported
    if not _imported:
        if not (HOST_DIR / "comfy" / "model_patcher.py").exists():
            raise RuntimeError(f"ComfyUI host not found in {HOST_DIR}: run `make host` (or `make test`).")
        if str(HOST_DIR) not in sys.path:
            sys.path.insert(0, str(HOST_DIR))
        sys.argv = [sys.argv[0], "--cpu"] if cpu else [sys.argv[0]]
        import comfy.options

        comfy.options.enable_args_parsing()
        # Must come before anything imports comfy.utils, or the bare name `utils` resolves to comfy/utils.py.
        import utils.extra_config  # noqa: F401
        import comfy.model_management  # noqa: F401
        import comfy.model_patcher  # noqa: F401
        import comfy.sd  # noqa: F401
        import comfy.lora  # noqa: F401
        import comfy.supported_models  # noqa: F401

        _imported = True
    import comfy

    return comfy
