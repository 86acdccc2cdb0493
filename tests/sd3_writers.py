"""Independent writers of SD3 / SD3.5 LoRA files, for tests (import: `from tests import sd3_writers as sw`).

Real writers are used where they are installable: PEFT on diffusers' own `SD3Transformer2DModel` (what
`StableDiffusion3Pipeline.save_lora_weights`, ai-toolkit (`toolkit/models/sd3.py` saves through diffusers) and
diffusion-pipe's `models/sd3.py` (line 63, `save_lora_weights`) write), LyCORIS's own wrapper. Trainers that are
not installable here get a small writer following their naming; each cites the rule's source:

* kohya sd-scripts `networks/lora_sd3.py` (LoRANetwork): `SD3_TARGET_REPLACE_MODULE = ["SingleDiTBlock"]` (the
  x_block / context_block of each joint block: every Linear inside, qkv fused unless `split_qkv`, which is
  re-fused at save), `LORA_PREFIX_SD3 = "lora_unet"`, `lora_name = prefix + "." + module path`, dots -> `_`;
  `emb_dims` adds `context_embedder`, `t_embedder`, `x_embedder` (a Conv2d), `y_embedder`,
  `final_layer_adaLN_modulation`, `final_layer_linear`; text encoders `LORA_PREFIX_TEXT_ENCODER_CLIP_L = "lora_te1"`,
  `_CLIP_G = "lora_te2"`, `_T5 = "lora_te3"` over CLIPAttention / CLIPMLP / T5Attention / T5DenseGatedActDense;
  tensors `.lora_down.weight`, `.lora_up.weight`, `.alpha`. Its metadata (sd3_train_network.py,
  library/sai_model_spec.py `determine_architecture`): `ss_base_model_version` = the model type (`medium`,
  `5-medium`, `5-large`), `modelspec.architecture` = `stable-diffusion-3-<type>/lora`.
* ComfyUI native (comfy/lora.py model_lora_keys_unet's generic map): `diffusion_model.<path>` with lora_up/lora_down
  or lora_A/lora_B (+ alpha); full diffs `diffusion_model.<path>.diff` / `.diff_b`
  (comfy/weight_adapter / lora.py load_lora's `diff` / `diff_b`).
* diffusers / PEFT (diffusers loaders/lora_pipeline.py SD3LoraLoaderMixin, transformer prefix "transformer"):
  `transformer.<SD3Transformer2DModel path>.lora_A.weight` / `.lora_B.weight`; flash-sd3 and PEFT scripts
  without the pipeline prefix: `base_model.model.<path>` (comfy/lora.py, "format for flash-sd3 lora").
* OneTrainer (comfy/lora.py, "OneTrainer lora"): `lora_transformer_<diffusers path _>` + `.alpha`.
* SimpleTuner LyCORIS (comfy/lora.py, "simpletuner lycoris format"): LyCORIS's wrapper on the diffusers
  transformer with prefix `lycoris`: `lycoris_<diffusers path _>`.

Every factor is random and non-zero, so every module has a non-zero delta.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional

import torch

from tests import dit_writers as dw
from tests import lora_writers as lw

SD3_DIFFUSERS_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                         "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                         "norm1.linear", "norm1_context.linear", "norm_out.linear", "proj_out", "context_embedder",
                         "linear_1", "linear_2", "pos_embed.proj")
KOHYA_EMBEDDERS = ("context_embedder", "t_embedder.", "x_embedder.", "y_embedder.", "final_layer.")
KOHYA_TE_PREFIXES = {"clip_l": "lora_te1", "clip_g": "lora_te2", "t5xxl": "lora_te3"}
KOHYA_METADATA = {  # sd3_train_network.py / sai_model_spec.py, per kohya model type
    "medium": {"ss_base_model_version": "medium", "modelspec.architecture": "stable-diffusion-3-medium/lora",
               "ss_network_module": "networks.lora_sd3"},
    "5-medium": {"ss_base_model_version": "5-medium",
                 "modelspec.architecture": "stable-diffusion-3-5-medium/lora", "ss_network_module": "networks.lora_sd3"},
    "5-large": {"ss_base_model_version": "5-large", "modelspec.architecture": "stable-diffusion-3-5-large/lora",
                "ss_network_module": "networks.lora_sd3"},
}


def mmdit(model):
    return model.model.diffusion_model


def joint_block_layers(model, blocks: Optional[Iterable[int]] = None) -> dict[str, torch.nn.Module]:
    """Every Linear of the joint blocks' x_block / context_block (kohya's SingleDiTBlock targets)."""
    layers = dw.linear_layers(mmdit(model), include=("joint_blocks.",))
    if blocks is not None:
        wanted = {f"joint_blocks.{i}." for i in blocks}
        layers = {p: m for p, m in layers.items() if any(p.startswith(w) for w in wanted)}
    return layers


def embedder_layers(model) -> dict[str, torch.nn.Module]:
    """kohya's `emb_dims` modules: the embedders (x_embedder.proj is a Conv2d) and the final layer."""
    return {p: m for p, m in mmdit(model).named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and p.startswith(KOHYA_EMBEDDERS)}


def every_layer(model) -> dict[str, torch.nn.Module]:
    """Every Linear and Conv2d of the MMDiT (what ComfyUI's generic map addresses)."""
    return {p: m for p, m in mmdit(model).named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def kohya_sd3(model, rank: int = 4, alpha: float = 2.0, seed: int = 0, embedders: bool = True, blocks=None,
              layers=None) -> dict:
    """kohya sd-scripts SD3 names: `lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight`, with the
    `emb_dims` modules (x_embedder's conv LoRA: down (r, in, 2, 2), up (h, r, 1, 1)) when `embedders`."""
    if layers is None:
        layers = joint_block_layers(model, blocks)
        if embedders:
            layers.update(embedder_layers(model))
    return lw.kohya_state_dict(layers, "lora_unet", rank, alpha, seed)


def kohya_text_encoders(clip, rank: int = 4, alpha: float = 2.0, seed: int = 0, prefixes=None) -> dict:
    """kohya SD3 text-encoder names for the encoders the CLIP holds (lora_te1 CLIP-L, lora_te2 CLIP-G, lora_te3
    T5), or `prefixes` ({ComfyUI attribute: prefix}) for other numberings."""
    held = {a: p for a, p in (prefixes or KOHYA_TE_PREFIXES).items()
            if getattr(clip.cond_stage_model, a, None) is not None}
    return dw.kohya_text_encoders(clip, held, rank, alpha, seed)


def comfy_native(model, rank: int = 4, alpha: float = 2.0, seed: int = 0, prefix: str = "diffusion_model.",
                 peft_suffixes: bool = False, layers=None) -> dict:
    """ComfyUI-native names on every Linear and Conv2d: `diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_up.
    weight` (lora_A / lora_B with `peft_suffixes`; bare with prefix "")."""
    layers = every_layer(model) if layers is None else layers
    up, down = (".lora_B.weight", ".lora_A.weight") if peft_suffixes else (".lora_up.weight", ".lora_down.weight")
    state = lw.kohya_state_dict(layers, "X", rank, alpha, seed)
    out = {}
    for path in layers:
        name = "X_" + path.replace(".", "_")
        out[prefix + path + down] = state[name + ".lora_down.weight"]
        out[prefix + path + up] = state[name + ".lora_up.weight"]
        out[prefix + path + ".alpha"] = state[name + ".alpha"]
    return out


def full_diffs(model, seed: int = 0, prefix: str = "diffusion_model.", with_bias: bool = True) -> dict:
    """`<prefix><module>.diff` for every weight of the MMDiT (linears, the patch conv, the RMS q/k norms of 3.5)
    and `.diff_b` for every bias."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, param in sorted(mmdit(model).named_parameters()):
        module, _, kind = name.rpartition(".")
        if kind == "weight":
            state[f"{prefix}{module}.diff"] = 0.01 * torch.randn(param.shape, generator=generator)
        elif kind == "bias" and with_bias:
            state[f"{prefix}{module}.diff_b"] = 0.01 * torch.randn(param.shape, generator=generator)
    return state


def peft_sd3(transformer, rank: int = 4, alpha: float = 8, seed: int = 0,
             targets: Iterable[str] = SD3_DIFFUSERS_TARGETS):
    """(state dict with `transformer.` keys as SD3LoraLoaderMixin.save_lora_weights writes it, LoraConfig): real
    PEFT on diffusers' own SD3Transformer2DModel (PEFT matches `to_q` in attn and attn2 alike)."""
    return dw.peft_flux(transformer, rank, alpha, seed, targets)


def onetrainer_sd3(transformer, rank: int = 4, alpha: float = 2.0, seed: int = 0,
                   targets: Iterable[str] = SD3_DIFFUSERS_TARGETS) -> dict:
    """OneTrainer's SD3 names: `lora_transformer_<diffusers path _>` with kohya suffixes and `.alpha`."""
    return dw.onetrainer_flux(transformer, rank, alpha, seed, [t for t in targets if t != "pos_embed.proj"])


def rename(state: Mapping[str, torch.Tensor], old: str, new: str) -> dict:
    """Every key starting with `old` under `new` instead (the others unchanged)."""
    return dw.rename_prefix(state, old, new)
