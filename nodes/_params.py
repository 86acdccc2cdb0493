"""Patches on parameters ComfyUI's ModelPatcher never writes.

ComfyUI 0.3.75's `ModelPatcher.load` (comfy/model_patcher.py `_load_list`) patches the parameters of *leaf* modules
only: a module whose children hold parameters is skipped ("skip random weights in non leaf modules"). A parameter
that belongs to such a module - Wan's `blocks.N.modulation` and `head.modulation`, Z-Image's `x_pad_token` /
`cap_pad_token` and SD3's `pos_embed` on the model itself - is accepted by `add_patches` (core's LoRA loader
reports nothing) and then never patched: a full diff on it has no effect in core.

`ensure_params_patched(patcher)` registers an ON_LOAD callback that writes those patches with ModelPatcher's own
`patch_weight_to_device` (core's patch math, its backup and `unpatch_model`'s restore), once per load: a key is
patched only while it has no backup (i.e. since the last unpatch). The callback travels with clones.
"""
from __future__ import annotations

import comfy.patcher_extension

CALLBACK_KEY = "lora_core_non_leaf_params"


def non_leaf_params(module, keys) -> list[str]:
    """The keys among `keys` naming a parameter of a module whose children hold parameters (what `_load_list`
    skips)."""
    out = []
    for key in keys:
        path, _, name = key.rpartition(".")
        try:
            owner = module.get_submodule(path) if path else module
        except AttributeError:
            continue
        own = dict(owner.named_parameters(recurse=False))
        if name in own and any(True for n, _ in owner.named_parameters(recurse=True) if n not in own):
            out.append(key)
    return out


def _on_load(patcher, device_to, lowvram_model_memory, force_patch_weights, full_load):
    for key in non_leaf_params(patcher.model, list(patcher.patches)):
        if key not in patcher.backup:
            patcher.patch_weight_to_device(key, device_to=device_to)


def ensure_params_patched(patcher) -> list[str]:
    """Register the callback on `patcher` when it carries patches on non-leaf parameters; returns those keys."""
    keys = non_leaf_params(patcher.model, list(patcher.patches))
    on_load = comfy.patcher_extension.CallbacksMP.ON_LOAD
    if keys and not patcher.callbacks.get(on_load, {}).get(CALLBACK_KEY):
        patcher.add_callback_with_key(on_load, CALLBACK_KEY, _on_load)
    return keys
