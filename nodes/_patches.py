"""How LoRA Core hands its math to ComfyUI: one weight-adapter patch per host tensor.

Each patched tensor gets a single `LoraCoreWeightAdapter` holding every LoRA aimed at it (a whole stack is
one patch set), so ComfyUI's ModelPatcher keeps owning backups, lazy loading, lowvram/offload, hooks,
clones and Save Checkpoint; at load time it calls `calculate_weight`, which runs lora_core's engine.
"""
from __future__ import annotations

import torch

from comfy.weight_adapter.base import WeightAdapterBase

from lora_core.engine import WeightPatch, patch_weight


class LoraCoreWeightAdapter(WeightAdapterBase):
    """A ComfyUI weight adapter that applies a list of lora_core `WeightPatch`es to one tensor.

    The constructor keeps core's `(loaded_keys, weights)` shape because newer ComfyUI versions rebuild
    adapters as `type(v)(v.loaded_keys, weights)`; `weights` is the tuple of WeightPatches.
    """

    name = "lora_core"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = tuple(weights)

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        # Never picked up by core's own file loader: LoRA Core builds these itself.
        return None

    def calculate_shape(self, key):
        return None

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        # ComfyUI hands us an fp32 working copy on full loads and the compute dtype under lowvram; our math
        # is always fp32 and is cast back once.
        work = weight if weight.dtype == torch.float32 else weight.to(torch.float32)
        if strength == 1.0 and _is_identity(function):
            patch_weight(work, self.weights, key)
            if work is not weight:
                weight.copy_(work)
            return weight
        # Something scaled or transformed our patch as a whole (e.g. a model merge wrapping a LoRA'd
        # model): apply the result as a delta, the way core treats its own adapters.
        delta = patch_weight(work.clone(), self.weights, key) - work
        weight += function(strength * delta).to(weight.dtype)
        return weight


def _is_identity(function) -> bool:
    """Core passes `lambda a: a` when a patch has no function; tell that apart from a real transform."""
    if function is None:
        return True
    probe = torch.ones(1)
    try:
        return function(probe) is probe
    except Exception:
        return False


def to_comfy_patches(plan: dict[str, list[WeightPatch]], loaded_keys: set[str]) -> dict:
    """A lora_core plan {host key: [WeightPatch]} -> the dict ModelPatcher.add_patches expects."""
    return {key: LoraCoreWeightAdapter(loaded_keys, patches) for key, patches in plan.items() if patches}
