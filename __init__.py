"""LoRA Core: a ComfyUI node pack for loading, block-weighting, mixing and training LoRAs.

ComfyUI imports this file from custom_nodes/<pack>/. The library lives in lora_core/ (no ComfyUI imports);
nodes/ adapts ComfyUI's objects to it.
"""
import os
import sys

# `lora_core` is a standalone library that tests and scripts import by its own name; put the pack folder on
# sys.path so the nodes import that same module (one identity, one file cache) rather than a pack-relative copy.
# `nodes` is only ever imported relatively, so it never shadows ComfyUI's top-level `nodes` module.
_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
