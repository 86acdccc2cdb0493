"""The five implementations the benchmark compares, behind one small interface.

Each implementation patches the same kind of model with the same kohya LoRAs and goes through the same
steps: patch, re-patch after a strength change, re-patch after a block-vector change (`BlockChange`: SD's
UNet output blocks x0.5, Flux's single blocks x0.5), restore (the engine then patches once more on its kept
backup memory and restores: `again`). Every step returns {phase: seconds}; `weight(target)` gives the live host tensor of a
target module so the runner can measure errors against an fp64 reference.

* core        ComfyUI 0.3.75: `comfy.sd.load_lora_for_models` chained per LoRA (what chained LoraLoader
              nodes do), then `ModelPatcher.patch_model(force_patch_weights=True)` / `unpatch_model()`.
              Block change: per-key strengths through `add_patches` (how block-weight packs drive core: the
              file's patches loaded once, the keys of the changed blocks added at strength x factor).
* nodes       LoRA Core's nodes: one plan for the stack (HostModels.plan) turned into our weight adapter inside
              ComfyUI's ModelPatcher (HostModels.apply), patched/unpatched by ModelPatcher like core.
* engine      lora_core standalone: PatchEngine over the same ComfyUI modules' tensors (same-shape batching
              on its default: on for CUDA weights, off on CPU).
* engine-batched / engine-perweight   the same with batching forced on / off (opt-in A/B of the batched path).
* diffusers   `load_lora_weights` per LoRA (adapter names), `set_adapters`, `fuse_lora` / `unfuse_lora`.
* lorapatcher lora_core's diffusers entry point (`LoraPatcher`) on the same diffusers model.
"""
from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .models import Lora, Target

OUT_FACTOR = 0.5   # the block-vector change: UNet output blocks (LDM output_blocks = diffusers up_blocks)


@dataclass(frozen=True)
class BlockChange:
    """The block-vector change of a case: `named` for our named syntax (e.g. "OUT*={:g}"), `host_word` marks the
    host keys of those blocks (what a block-weight pack filters core's patches by)."""

    named: str
    host_word: str

    def vector(self, factor: float) -> str:
        return self.named.format(factor)

    def selects(self, host_key) -> bool:
        # core's patch keys are a tensor name, or (name, (dim, offset, size)) for a part of a fused weight
        return self.host_word in (host_key[0] if isinstance(host_key, tuple) else host_key)


SD_OUT_BLOCKS = BlockChange("OUT*={:g}", ".output_blocks.")


class Clock:
    """Wall time on CPU; CUDA events (after a sync) on a GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable, *args, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn(*args, **kwargs)
            end.record()
            torch.cuda.synchronize()
            return result, start.elapsed_time(end) / 1000.0
        begin = time.perf_counter()
        result = fn(*args, **kwargs)
        return result, time.perf_counter() - begin


def out_block_factor(target: Target) -> float:
    return OUT_FACTOR if target.component == "unet" and target.path.startswith("up_blocks") else 1.0


def _quiet_comfy_logs() -> None:
    logging.getLogger().setLevel(logging.ERROR)
    logging.getLogger("lora_core").setLevel(logging.ERROR)


# ------------------------------------------------------------------------------------------ ComfyUI

class ComfyEnv:
    """One full-size ComfyUI MODEL (+ CLIP, or None for a MODEL-only case) shared by core, nodes and engine
    (used one at a time)."""

    def __init__(self, patcher, clip, device: torch.device, blocks: BlockChange = SD_OUT_BLOCKS):
        import comfy.lora

        _quiet_comfy_logs()
        _host_module()   # the pack is imported when ComfyUI starts, not at a first patch: not timed
        self.patcher, self.clip, self.device, self.blocks = patcher, clip, device, blocks
        key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
        self.key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map) if clip is not None else key_map

    def patchers(self, model, clip) -> list:
        return [model] + ([clip.patcher] if clip is not None else [])

    def modules(self) -> list:
        owners = [self.patcher.model] + ([self.clip.cond_stage_model] if self.clip is not None else [])
        return [m for owner in owners for m in owner.modules()]

    def state_dict(self) -> dict:
        owners = [self.patcher.model] + ([self.clip.cond_stage_model] if self.clip is not None else [])
        return {k: v for owner in owners for k, v in owner.state_dict(keep_vars=True).items()}

    def live(self, target: Target) -> torch.Tensor:
        import comfy.utils

        key = self.key_map[target.kohya]
        owner = self.patcher.model if key.startswith("diffusion_model.") else self.clip.cond_stage_model
        return comfy.utils.get_attr(owner, key)

    def host_key(self, target: Target) -> str:
        return self.key_map[target.kohya]


class _PatcherImpl:
    """Shared by core and nodes: both end in ModelPatcher.patch_model / unpatch_model."""

    name = ""

    def __init__(self, env: ComfyEnv):
        self.env = env
        self.model = self.clip = None

    def _build(self, loras: Sequence[Lora], strengths: Sequence[float], out_factor: float = 1.0):
        raise NotImplementedError

    def _patch_loaded(self) -> None:
        for patcher in self.env.patchers(self.model, self.clip):
            patcher.patch_model(device_to=self.env.device, lowvram_model_memory=0, load_weights=True,
                                force_patch_weights=True)

    def _unpatch(self) -> None:
        for patcher in self.env.patchers(self.model, self.clip):
            patcher.unpatch_model()

    def patch(self, clock, loras, strengths) -> dict:
        self.loras = loras
        (self.model, self.clip), load = clock(self._build, loras, strengths)
        _, patch = clock(self._patch_loaded)
        return {"load": load, "patch": patch}

    def repatch(self, clock, strengths, out_factor: float = 1.0) -> dict:
        # What ComfyUI does when a LoRA node's input changes: the node re-runs (new clone, new patches_uuid),
        # model management unpatches the loaded clone and patches the new one.
        old_model, old_clip = self.model, self.clip
        (model, clip), load = clock(self._build, self.loras, strengths, out_factor)
        self.model, self.clip = old_model, old_clip
        _, restore = clock(self._unpatch)
        self.model, self.clip = model, clip
        _, patch = clock(self._patch_loaded)
        return {"restore": restore, "load": load, "patch": patch}

    def restore(self, clock) -> dict:
        _, restore = clock(self._unpatch)
        self.model = self.clip = None
        return {"restore": restore}

    def held_bytes(self) -> int:
        total = 0
        for patcher in self.env.patchers(self.model, self.clip):
            total += sum(b.weight.numel() * b.weight.element_size() for b in patcher.backup.values())
        return total

    def side_branches(self) -> int:
        return sum(bool(getattr(m, "weight_function", None)) or bool(getattr(m, "bias_function", None))
                   or bool(m._forward_hooks) or bool(m._forward_pre_hooks) for m in self.env.modules())


class CoreImpl(_PatcherImpl):
    name = "core"

    def _build(self, loras, strengths, out_factor: float = 1.0):
        import comfy.lora
        import comfy.lora_convert
        import comfy.sd

        model, clip = self.env.patcher, self.env.clip
        if out_factor == 1.0:
            for lora, strength in zip(loras, strengths):
                model, clip = comfy.sd.load_lora_for_models(model, clip, lora.tensors, strength, strength)
            return model, clip
        model, clip = model.clone(), (clip.clone() if clip is not None else None)
        for lora, strength in zip(loras, strengths):
            loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora.tensors), self.env.key_map)
            for key, patch in loaded.items():
                factor = out_factor if self.env.blocks.selects(key) else 1.0
                model.add_patches({key: patch}, strength * factor)
                if clip is not None:
                    clip.add_patches({key: patch}, strength * factor)
        return model, clip


def _requests(loras, strengths, block_weights=None):
    from lora_core.api import LoraRequest
    from lora_core.types import LoraFile

    return [LoraRequest(LoraFile(None, lora.tensors), s, s, block_weights=block_weights, name=lora.name)
            for lora, s in zip(loras, strengths)]


def _block_vector(arch_name: str, factor: float, blocks: BlockChange = SD_OUT_BLOCKS):
    from lora_core.blocks import resolve_vector

    return resolve_vector(arch_name, "named", blocks.vector(factor))


def _host_module():
    from tests.pack import node_module

    node_module("loader")
    import importlib

    return importlib.import_module("lora_core_pack.nodes._host")


class NodesImpl(_PatcherImpl):
    name = "nodes"

    def _build(self, loras, strengths, out_factor: float = 1.0):
        host = _host_module().HostModels(self.env.patcher, self.env.clip)
        blocks = _block_vector(host.key_map.arch.name, out_factor, self.env.blocks) if out_factor != 1.0 else None
        plan = host.plan(_requests(loras, strengths, blocks))
        return host.apply(plan)


class EngineImpl:
    """lora_core's PatchEngine straight on the ComfyUI modules' tensors (no ModelPatcher)."""

    name = "engine"

    def __init__(self, env: ComfyEnv, backup_device=None, batch_same_shape=None):
        from lora_core.engine import PatchEngine

        if batch_same_shape is not None:
            self.name = "engine-batched" if batch_same_shape else "engine-perweight"
        self.env = env
        self.host = _host_module().HostModels(env.patcher, env.clip)
        tensors = env.state_dict()
        self.engine = PatchEngine(tensors, backup_device=backup_device, batch_same_shape=batch_same_shape)

    def _plan(self, loras, strengths, out_factor=1.0):
        blocks = _block_vector(self.host.key_map.arch.name, out_factor, self.env.blocks) if out_factor != 1.0 else None
        return self.host.plan(_requests(loras, strengths, blocks)).patches

    def patch(self, clock, loras, strengths) -> dict:
        self.loras = loras
        plan, load = clock(self._plan, loras, strengths)
        _, patch = clock(self.engine.apply, plan)
        return {"load": load, "patch": patch}

    def repatch(self, clock, strengths, out_factor: float = 1.0) -> dict:
        plan, load = clock(self._plan, self.loras, strengths, out_factor)
        counts, patch = clock(self.engine.apply, plan)
        return {"load": load, "patch": patch, "keys_rewritten": counts["written"]}

    def restore(self, clock) -> dict:
        _, restore = clock(self.engine.restore)
        return {"restore": restore}

    def again(self, clock) -> dict:
        """The first strengths once more after the restore, on the same engine (its backup memory is reused:
        engine.BackupPool), then restore and free that memory: {"patch", "restore"} seconds."""
        plan = self._plan(self.loras, [round(1.0 - 0.1 * i, 2) for i in range(len(self.loras))])
        allocations = self.engine._pool.allocations
        _, patch = clock(self.engine.apply, plan)
        _, restore = clock(self.engine.restore, release=True)
        return {"patch": patch, "restore": restore, "allocated": self.engine._pool.allocations - allocations}

    def held_bytes(self) -> int:
        return self.engine.backup_bytes() + self.engine.factor_bytes()

    def side_branches(self) -> int:
        return sum(bool(getattr(m, "weight_function", None)) or bool(m._forward_hooks) or bool(m._forward_pre_hooks)
                   for m in self.env.modules())


# ------------------------------------------------------------------------------------------ diffusers

class DiffusersEnv:
    def __init__(self, arch: str, modules: dict, device: torch.device):
        self.arch, self.modules, self.device = arch, modules, device

    def live(self, target: Target) -> torch.Tensor:
        module = self.modules[target.component].get_submodule(target.path)
        module = getattr(module, "base_layer", module)
        return module.weight

    def host_key(self, target: Target) -> str:
        return f"{target.component}.{target.path}"


class DiffusersImpl:
    name = "diffusers"

    def __init__(self, env: DiffusersEnv):
        from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
        from diffusers.utils import logging as dlogging

        dlogging.set_verbosity_error()
        mixin = StableDiffusionLoraLoaderMixin if env.arch == "sd15" else StableDiffusionXLLoraLoaderMixin

        class Components(mixin):
            """The components a pipeline would hold; the mixin's functions only need these attributes."""

            hf_device_map = None   # read by load_lora_weights (no accelerate device map here)

            @property
            def components(self) -> dict:
                return {name: getattr(self, name) for name in self._lora_loadable_modules if hasattr(self, name)}

        self.env = env
        self.pipe = Components()
        for name, module in env.modules.items():
            setattr(self.pipe, name, module)
        self.components = list(env.modules)

    def _load(self, loras):
        for index, lora in enumerate(loras):
            self.pipe.load_lora_weights(dict(lora.tensors), adapter_name=f"a{index}")

    def _weights(self, strengths, out_factor):
        if out_factor == 1.0:
            return list(strengths)
        weights = []
        for s in strengths:
            entry = {"unet": {"down": s, "mid": s, "up": s * out_factor}}
            entry.update({name: s for name in self.components if name != "unet"})
            weights.append(entry)
        return weights

    def _fuse(self, strengths, out_factor=1.0):
        self.pipe.set_adapters(self.names, self._weights(strengths, out_factor))
        self.pipe.fuse_lora(components=self.components, adapter_names=self.names)

    def patch(self, clock, loras, strengths) -> dict:
        self.names = [f"a{i}" for i in range(len(loras))]
        _, load = clock(self._load, loras)
        _, patch = clock(self._fuse, strengths)
        return {"load": load, "patch": patch}

    def repatch(self, clock, strengths, out_factor: float = 1.0) -> dict:
        _, restore = clock(self.pipe.unfuse_lora, components=self.components)
        _, patch = clock(self._fuse, strengths, out_factor)
        return {"restore": restore, "patch": patch}

    def restore(self, clock) -> dict:
        _, restore = clock(self.pipe.unfuse_lora, components=self.components)
        return {"restore": restore}

    def unload(self) -> None:
        self.pipe.unload_lora_weights()

    def held_bytes(self) -> int:
        total = 0
        for module in self.env.modules.values():
            total += sum(p.numel() * p.element_size() for n, p in module.named_parameters() if "lora_" in n)
        return total

    def side_branches(self) -> int:
        # fused PEFT layers skip the LoRA matmuls but stay wrapped: count the wrappers still in the model
        return sum(hasattr(m, "base_layer") for module in self.env.modules.values() for m in module.modules())


class LoraPatcherImpl:
    name = "lorapatcher"

    def __init__(self, env: DiffusersEnv, backup_device=None):
        from lora_core.api import LoraPatcher

        self.env = env
        self.patcher = LoraPatcher(unet=env.modules["unet"], text_encoder=env.modules["text_encoder"],
                                   text_encoder_2=env.modules.get("text_encoder_2"), backup_device=backup_device)

    def _plan(self, loras, strengths, out_factor=1.0):
        blocks = _block_vector(self.patcher.key_map.arch.name, out_factor) if out_factor != 1.0 else None
        return self.patcher.plan(_requests(loras, strengths, blocks)).patches

    def patch(self, clock, loras, strengths) -> dict:
        self.loras = loras
        plan, load = clock(self._plan, loras, strengths)
        _, patch = clock(self.patcher.engine.apply, plan)
        return {"load": load, "patch": patch}

    def repatch(self, clock, strengths, out_factor: float = 1.0) -> dict:
        plan, load = clock(self._plan, self.loras, strengths, out_factor)
        counts, patch = clock(self.patcher.engine.apply, plan)
        return {"load": load, "patch": patch, "keys_rewritten": counts["written"]}

    def restore(self, clock) -> dict:
        _, restore = clock(self.patcher.restore)
        return {"restore": restore}

    def held_bytes(self) -> int:
        return self.patcher.engine.backup_bytes() + self.patcher.engine.factor_bytes()

    def side_branches(self) -> int:
        return sum(bool(m._forward_hooks) or bool(m._forward_pre_hooks) or hasattr(m, "base_layer")
                   for module in self.env.modules.values() for m in module.modules())


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
