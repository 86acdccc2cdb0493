"""Tiny but real SD3 / SD3.5 models and CLIPs for tests, built with ComfyUI's own classes (CPU, fp32, seeded).

* `comfy_sd3(variant)` -> a `comfy.model_patcher.ModelPatcher` over `comfy.supported_models.SD3(unet_config)` /
  `model_base.SD3` (ComfyUI's MMDiT, comfy/ldm/modules/diffusionmodules/mmdit.py). The config is what
  `comfy.model_detection.detect_unet_config` derives from an SD3 state dict, shrunk: ComfyUI fixes the head width
  at 64 (`hidden_size = 64 * depth`, `num_heads = depth`), so depth 2 is hidden 128 and depth 3 hidden 192; the
  context embedder's output must be the hidden size; `pos_embed` holds `pos_embed_max_size`² patches. Variants:

  - "medium": SD3 Medium's structure (no q/k norm, no attn2), depth 2;
  - "3.5-medium": SD3.5 Medium's (RMS q/k norm `ln_q`/`ln_k`, `x_block.attn2` in the first blocks), depth 3 with
    attn2 in blocks 0 and 1 (3.5 Medium: blocks 0-12 of 24);
  - "3.5-large": SD3.5 Large's (q/k norm, no attn2), depth 3.

  The last block's `context_block` is ComfyUI's `pre_only` block (only `attn.qkv` and a 2h `adaLN_modulation.1`).
* `comfy_clip_sd3(clip_l=True, clip_g=True, t5=True)` -> `comfy.sd.CLIP` over ComfyUI's `SD3ClipModel` (its
  `sd3_clip(...)` factory; every encoder optional, as `supported_models.SD3.clip_target` builds it): `clip_l`,
  `clip_g`, `t5xxl` with shrunken configs (tests.tiny_models.tiny_clip_config / tiny_t5_config).
* `diffusers_sd3_twin(variant)` -> diffusers' `SD3Transformer2DModel` with the same shapes (weights differ).
"""
from __future__ import annotations

import torch

from tests.comfy_host import import_comfy
from tests.tiny_models import _comfy_clip, _model_patcher, tiny_clip_config, tiny_t5_config

VARIANTS = {
    # depth, x_block attn2 layers, q/k norm
    "medium": (2, (), False),
    "3.5-medium": (3, (0, 1), True),
    "3.5-large": (3, (), True),
}
CONTEXT, POOLED, POS_MAX = 32, 48, 8


def sd3_config(variant: str = "medium", depth=None, context: int = CONTEXT, pooled: int = POOLED) -> dict:
    """The unet_config comfy.model_detection builds for an SD3-family state dict (model_detection.py, the
    `joint_blocks.0.context_block.attn.qkv.weight` branch), at tiny size."""
    default_depth, attn2, qk_norm = VARIANTS[variant]
    depth = default_depth if depth is None else depth
    hidden = 64 * depth
    config = {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": depth, "input_size": None,
              "adm_in_channels": pooled,
              "context_embedder_config": {"target": "torch.nn.Linear",
                                          "params": {"in_features": context, "out_features": hidden}},
              "num_patches": POS_MAX * POS_MAX, "pos_embed_max_size": POS_MAX, "pos_embed_scaling_factor": None,
              "x_block_self_attn_layers": [i for i in attn2 if i < depth]}
    if qk_norm:
        config["qk_norm"] = "rms"
    return config


def comfy_sd3(variant: str = "medium", seed: int = 0, depth=None):
    """Tiny SD3-family ModelPatcher (`comfy.supported_models.SD3`, `model_base.SD3`); keys
    `diffusion_model.joint_blocks.N.x_block.attn.qkv.weight` etc."""
    comfy = import_comfy()
    patcher = _model_patcher(comfy.supported_models.SD3, sd3_config(variant, depth), None, seed)
    # `pos_embed` is a buffer ComfyUI allocates empty (a checkpoint fills it): fill it from the seed too
    pos = patcher.model.diffusion_model.pos_embed
    with torch.no_grad():
        pos.copy_(0.02 * torch.randn(pos.shape, generator=torch.Generator().manual_seed(seed + 1)))
    return patcher


def comfy_clip_sd3(clip_l: bool = True, clip_g: bool = True, t5: bool = True, layers: int = 3, hidden: int = 32,
                   seed: int = 0):
    """Tiny SD3 `comfy.sd.CLIP` (`clip_l` = te1, `clip_g` = te2, `t5xxl` = te3; each optional). 3 layers: ComfyUI
    reads CLIP-L and CLIP-G at their penultimate layer (`layer_idx=-2` must be inside the encoder)."""
    import_comfy()
    from comfy.text_encoders import sd3_clip

    overrides = {}
    if clip_l:
        overrides["clip_l"] = tiny_clip_config(hidden, layers)
    if clip_g:
        overrides["clip_g"] = tiny_clip_config(hidden, layers, act="gelu")
    if t5:
        overrides["t5xxl"] = tiny_t5_config(hidden, layers)
    return _comfy_clip(sd3_clip.sd3_clip(clip_l=clip_l, clip_g=clip_g, t5=t5), sd3_clip.SD3Tokenizer, overrides,
                       seed)


def diffusers_sd3_twin(variant: str = "medium", depth=None, seed: int = 0):
    """diffusers' SD3Transformer2DModel with the shapes of comfy_sd3(variant) (weights differ): head width 64,
    `dual_attention_layers` = the attn2 blocks, `qk_norm="rms_norm"` for 3.5."""
    from diffusers import SD3Transformer2DModel

    default_depth, attn2, qk_norm = VARIANTS[variant]
    depth = default_depth if depth is None else depth
    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, num_layers=depth,
                                 attention_head_dim=64, num_attention_heads=depth, joint_attention_dim=CONTEXT,
                                 caption_projection_dim=64 * depth, pooled_projection_dim=POOLED, out_channels=16,
                                 pos_embed_max_size=POS_MAX, dual_attention_layers=tuple(i for i in attn2 if i < depth),
                                 qk_norm="rms_norm" if qk_norm else None).eval()
