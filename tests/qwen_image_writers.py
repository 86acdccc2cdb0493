"""Independent writers of Qwen-Image LoRA files, for tests (import: `from tests import qwen_image_writers as qw`).

Real writers are used where they are installable: PEFT on diffusers' own `QwenImageTransformer2DModel` (what
`QwenImagePipeline.save_lora_weights` saves, and what diffusion-pipe and DiffSynth-Studio train), LyCORIS's
own wrapper. The others follow their documented naming; every rule cites its source (snapshots listed in
/work/shared/reference/dit-families.md §4):

* ComfyUI native (`comfy/lora.py::model_lora_keys_unet`, generic `diffusion_model.<path>`): `lora_up` /
  `lora_down` + `.alpha` on every Linear of the model (tests.dit_writers.comfy_native).
* ai-toolkit (`extensions_built_in/diffusion_models/qwen_image/qwen_image.py`,
  `convert_lora_weights_before_save`: `transformer.` -> `diffusion_model.`; its transformer LoRAs are saved in
  PEFT format, `lora_A` / `lora_B`, no `.alpha` (alpha = rank)); targets the Linears of `transformer_blocks`
  (`get_transformer_block_names`).
* diffusion-pipe (`models/qwen_image.py::save_adapter`: `'diffusion_model.' + k` over PEFT's state dict of the
  diffusers transformer, no alpha key): PEFT lora_A/lora_B.
* diffusers / PEFT (`QwenImagePipeline.save_lora_weights`): `transformer.<path>.lora_A.weight`.
* musubi-tuner (`networks/lora_qwen_image.py`: `lora.create_network(["QwenImageTransformerBlock"], "lora_unet",
  ...)`, default `exclude_patterns` `.*(_mod_).*`; `networks/lora.py`: name = `prefix + "." + block path + "." +
  child`, dots -> `_`, `lora_down` / `lora_up` + `.alpha`): `lora_unet_transformer_blocks_0_attn_to_q`, no
  img_mod / txt_mod.
* DiffSynth-Studio (`diffsynth/trainers/utils.py`: `inject_adapter_in_model(LoraConfig(r, lora_alpha=r))`;
  `examples/qwen_image/model_training/train.py` saves through `ModelLogger(remove_prefix_in_ckpt="pipe.dit.")`
  with no state-dict converter, so the module's own parameter names stay): bare
  `transformer_blocks.0.attn.to_q.lora_A.default.weight` (PEFT's adapter name kept), no alpha; the targets of
  `examples/qwen_image/model_training/lora/Qwen-Image.sh`.
* Qwen-Image-Lightning (lightx2v) distillation LoRAs: bare `<path>.lora_down.weight` / `lora_up` + `.alpha`.
* LyCORIS / SimpleTuner (`lycoris_` + the module path with `_`; ComfyUI maps it since #9280): every algorithm.
* raw PEFT state dicts (`get_peft_model(...).state_dict()` without diffusers' saver): `base_model.model.<path>`.
* full diffs: `diffusion_model.<path>.diff` + `.diff_b` (tests.dit_writers.full_diffs).
* text encoder: ComfyUI's generic `text_encoders.qwen25_7b.transformer.<path>` (the only form core maps; no
  trainer writes Qwen text-encoder LoRAs).

Every factor is random and non-zero, so every module has a non-zero delta.
"""
from __future__ import annotations

import copy
from typing import Iterable, Mapping

import torch

from tests import dit_writers as dw

PEFT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1", "txt_mod.1",
                "img_in", "txt_in", "proj_out", "norm_out.linear", "linear_1", "linear_2")
# DiffSynth-Studio's Qwen-Image targets (examples/qwen_image/model_training/lora/Qwen-Image.sh)
DIFFSYNTH_TARGETS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
                     "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1")


def net(model) -> torch.nn.Module:
    """The transformer of a ComfyUI ModelPatcher (or a plain module)."""
    return model.model.diffusion_model if hasattr(model, "model") else model


def block_linears(model, exclude=()) -> dict:
    """Every Linear inside `transformer_blocks` (what musubi's and ai-toolkit's networks wrap)."""
    return dw.linear_layers(net(model), include=("transformer_blocks.",), exclude=exclude)


def comfy_native(model, seed: int = 0, **kw) -> dict:
    return dw.comfy_native(model, seed=seed, **kw)


def ai_toolkit(model, rank: int = 4, seed: int = 0) -> dict:
    return dw.lora_pairs(block_linears(model), lambda p: "diffusion_model." + p, rank, None, seed,
                         ".lora_B.weight", ".lora_A.weight", "")


def musubi(model, rank: int = 4, alpha: float = 2.0, seed: int = 0, exclude_mod: bool = True) -> dict:
    layers = block_linears(model, exclude=("_mod.",) if exclude_mod else ())
    return dw.lora_pairs(layers, lambda p: "lora_unet_" + p.replace(".", "_"), rank, alpha, seed)


def lightning(model, rank: int = 4, alpha: float = 8.0, seed: int = 0) -> dict:
    return dw.lora_pairs(block_linears(model), lambda p: p, rank, alpha, seed)


def peft_state(transformer, rank: int = 4, alpha: float = 4, seed: int = 0,
               targets: Iterable[str] = PEFT_TARGETS, adapter_names: bool = False) -> dict:
    """Real PEFT on diffusers' QwenImageTransformer2DModel, factors randomised; keys without prefix. With
    `adapter_names` the module's own parameter names (`...lora_A.default.weight`, what DiffSynth saves), else
    `get_peft_model_state_dict`'s (`...lora_A.weight`, what diffusers / diffusion-pipe save)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
    adapted = inject_adapter_in_model(config, copy.deepcopy(transformer))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    if adapter_names:
        return {k: v.detach().clone() for k, v in adapted.named_parameters() if "lora_" in k}
    return {k: v.contiguous() for k, v in get_peft_model_state_dict(adapted).items()}


def diffusers_peft(transformer, seed: int = 0, **kw) -> dict:
    return {f"transformer.{k}": v for k, v in peft_state(transformer, seed=seed, **kw).items()}


def diffusion_pipe(transformer, seed: int = 0, **kw) -> dict:
    return {f"diffusion_model.{k}": v for k, v in peft_state(transformer, seed=seed, **kw).items()}


def diffsynth(transformer, seed: int = 0, rank: int = 4) -> dict:
    return peft_state(transformer, rank=rank, alpha=rank, seed=seed, targets=DIFFSYNTH_TARGETS, adapter_names=True)


def base_model_model(transformer, seed: int = 0, **kw) -> dict:
    return {f"base_model.model.{k}": v for k, v in peft_state(transformer, seed=seed, **kw).items()}


def text_encoder(clip, rank: int = 4, alpha: float = 2.0, seed: int = 0, include=("model.layers.", "visual.blocks.")):
    """ComfyUI's generic text-encoder names for every Linear of the Qwen2.5-VL encoder's layers (and vision tower
    blocks): `text_encoders.qwen25_7b.transformer.model.layers.0.self_attn.q_proj.lora_up.weight`."""
    encoder = clip.cond_stage_model.qwen25_7b.transformer
    layers = dw.linear_layers(encoder, include=include)
    return dw.lora_pairs(layers, lambda p: "text_encoders.qwen25_7b.transformer." + p, rank, alpha, seed)


def renamed(state: Mapping[str, torch.Tensor], old: str, new: str) -> dict:
    """The same tensors with prefix `old` replaced by `new` (the truth for a writer core cannot read)."""
    return dw.rename_prefix(state, old, new)


def strip_adapter_name(state: Mapping[str, torch.Tensor], adapter: str = "default") -> dict:
    return {k.replace(f".{adapter}.", "."): v for k, v in state.items()}
