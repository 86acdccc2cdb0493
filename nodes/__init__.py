"""ComfyUI adapter layer: one node family per module. Every module in this package that defines
NODE_CLASS_MAPPINGS (and optionally NODE_DISPLAY_NAME_MAPPINGS) is registered automatically, so adding
a family never touches a shared list."""
from __future__ import annotations

import importlib
import logging
import pkgutil

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name.startswith("_"):
        continue
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    _classes = getattr(_module, "NODE_CLASS_MAPPINGS", None)
    if not _classes:
        continue
    _clash = set(_classes) & set(NODE_CLASS_MAPPINGS)
    if _clash:
        raise RuntimeError(f"LoRA Core: node ids defined twice: {sorted(_clash)} (in nodes/{_info.name}.py)")
    NODE_CLASS_MAPPINGS.update(_classes)
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_module, "NODE_DISPLAY_NAME_MAPPINGS", {}))

logging.getLogger("lora_core").debug("LoRA Core nodes: %s", sorted(NODE_CLASS_MAPPINGS))
