"""Where the real ComfyUI host lives, and how to import its core in-process (only for reading model shapes).

The demo and the end-to-end tests run ComfyUI as a separate server process (demo/server.py); this module is
only used by demo/tiny_model.py and demo/tiny_flux.py to let ComfyUI's own classes say which keys and shapes a
tiny SD1.5 UNet, a tiny Flux, CLIP-L and TAESD have, so the files we write are exactly what ComfyUI builds when it
loads them.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST_DIR = Path(os.environ.get("LORA_CORE_COMFYUI", REPO / ".host" / "ComfyUI"))


def require_host() -> Path:
    """The ComfyUI folder, or a clear error naming the command that installs it."""
    if not (HOST_DIR / "main.py").exists() or not (HOST_DIR / "comfy" / "model_patcher.py").exists():
        raise RuntimeError(f"ComfyUI host not found in {HOST_DIR}: run `make host` (or `make setup`).")
    return HOST_DIR


def import_comfy_core():
    """Import ComfyUI's `comfy` package in this process on CPU (idempotent). Returns the package."""
    host = require_host()
    if "comfy.options" not in sys.modules:
        if str(host) not in sys.path:
            sys.path.insert(0, str(host))
        saved_argv = sys.argv
        # ComfyUI parses sys.argv at import; give it only --cpu so our own CLI flags never reach its parser.
        sys.argv = [saved_argv[0], "--cpu"]
        try:
            import comfy.options

            comfy.options.enable_args_parsing()
            # Must come before anything imports comfy.utils, or the bare name `utils` resolves to comfy/utils.py.
            import utils.extra_config  # noqa: F401
            import comfy.model_management  # noqa: F401
            import comfy.supported_models  # noqa: F401
            import comfy.taesd.taesd  # noqa: F401
        finally:
            sys.argv = saved_argv
    import comfy

    return comfy
