"""Tiny but real ComfyUI models (CPU, fp32, seeded weights) for tests.

Every builder uses ComfyUI's own classes, so the objects behave exactly like those a ComfyUI workflow
passes to a node:

* `comfy_sd15()`, `comfy_sd2()`, `comfy_sdxl()` -> `comfy.model_patcher.ModelPatcher` over a real
  `BaseModel` / `model_base.SDXL` built from `comfy.supported_models.SD15 / SD20 / SDXL(unet_config)`
  with few channels. The SD2/SDXL attention-head width (64 in ComfyUI's config) is lowered to fit.
  `patcher.model.model_config.unet_config` holds the config; keys are `diffusion_model.<ldm>`.
* `comfy_clip_sd15()`, `comfy_clip_sd2()`, `comfy_clip_sdxl()` -> `comfy.sd.CLIP` built from ComfyUI's
  `SD1ClipModel` / `SD2ClipModel` / `SDXLClipModel` with a shrunken `textmodel_json_config`
  (hidden 32, 2-3 layers, at least 3 where ComfyUI reads the penultimate layer; vocabulary kept at 49408 so the real tokenizer works). `clip.patcher` is the
  ModelPatcher over `clip.cond_stage_model` (keys `clip_l.transformer.text_model...` etc.), exactly as
  `comfy.sd.CLIP` holds a full-size one. Each tiny CLIP is about 1.7 M parameters per encoder.
* `unet_config_sd15/sd2/sdxl(...)` give the plain config dicts (also usable by diffusers tests).

Sizes on CPU: tiny SD15/SD2 about 1.5 M parameters (0.1 s to build); tiny SDXL keeps SDXL's exact depth
lists ([0,0,2,2,10,10], the list ComfyUI's `SDXL` class is detected by), so it is 25.6 M parameters
(about 0.8 s): build it once per test module (a module-scoped fixture).

Applying patches: `comfy.sd.CLIP` loads its patcher when it is built, so the modules are already marked
as loaded; apply a patched clone the way ComfyUI does, with
`comfy.model_management.load_models_gpu([clip.patcher], force_full_load=True)` (a bare
`clip.patcher.patch_model()` on a clone is skipped by ComfyUI). `unload_all_models()` restores.

Weights are filled deterministically from `seed` (ComfyUI's ops skip torch's init, so without this
they would be uninitialised memory). Same seed and arguments -> bit-identical weights.
"""
from __future__ import annotations

import torch

from tests.comfy_host import import_comfy

CPU = torch.device("cpu")


def _depths(per_level: list[int], num_res_blocks: int) -> tuple[list[int], list[int]]:
    """ComfyUI's transformer_depth (per input resnet) and transformer_depth_output (per output block,
    in level order: ComfyUI consumes it from the END, so output_blocks.0 takes the last entry)."""
    depth = [d for d in per_level for _ in range(num_res_blocks)]
    depth_out = [d for d in per_level for _ in range(num_res_blocks + 1)]
    return depth, depth_out


def unet_config_sd15(model_channels: int = 32, channel_mult=(1, 2), num_res_blocks: int = 2,
                     attention_levels=None, context_dim: int = 768) -> dict:
    """SD1.x-shaped unet_config: conv proj_in, context 768, attention on every level but the last
    (like SD1.5, whose deepest level has none); pass `attention_levels` (per level depths) to change it."""
    levels = len(channel_mult)
    per_level = list(attention_levels) if attention_levels is not None else [1] * (levels - 1) + [0]
    depth, depth_out = _depths(per_level, num_res_blocks)
    return {
        "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": model_channels,
        "num_res_blocks": [num_res_blocks] * levels, "channel_mult": list(channel_mult),
        "transformer_depth": depth, "transformer_depth_output": depth_out, "transformer_depth_middle": 1,
        "context_dim": context_dim, "use_linear_in_transformer": False, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def unet_config_sd2(model_channels: int = 32, channel_mult=(1, 2), num_res_blocks: int = 2,
                    attention_levels=None) -> dict:
    """SD2.x-shaped unet_config: linear proj_in, context 1024."""
    cfg = unet_config_sd15(model_channels, channel_mult, num_res_blocks, attention_levels, context_dim=1024)
    cfg["use_linear_in_transformer"] = True
    return cfg


def unet_config_sdxl(model_channels: int = 32, channel_mult=(1, 2, 2),
                     transformer_depth=(0, 0, 2, 2, 10, 10), transformer_depth_middle: int = 10,
                     transformer_depth_output=(0, 0, 0, 2, 2, 2, 10, 10, 10)) -> dict:
    """SDXL unet_config with few channels but SDXL's exact depth lists (the list ComfyUI's `SDXL`
    class matches on), 2 resnets per level, 3 levels, context 2048, adm 2816 (label_emb)."""
    return {
        "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": model_channels,
        "num_res_blocks": [2, 2, 2], "channel_mult": list(channel_mult),
        "transformer_depth": list(transformer_depth), "transformer_depth_output": list(transformer_depth_output),
        "transformer_depth_middle": transformer_depth_middle, "context_dim": 2048,
        "use_linear_in_transformer": True, "use_spatial_transformer": True, "legacy": False,
        "num_classes": "sequential", "adm_in_channels": 2816,
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def seed_weights(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter deterministically: matrices ~ N(0, 1/fan_in), norm weights ~ 1, the rest small."""
    gen = torch.Generator().manual_seed(seed)
    # Norm layers are found by type: LDM names many of them without "norm" (in_layers.0, out_layers.0, out.0).
    norm_weights = {f"{prefix}.weight" if prefix else "weight" for prefix, m in module.named_modules()
                    if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None}
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda item: item[0]):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim >= 2:
                fan_in = p[0].numel()
                value = noise / fan_in ** 0.5
            elif name in norm_weights or (name.endswith("weight") and "norm" in name):
                value = 1.0 + 0.02 * noise
            else:
                value = 0.02 * noise
            p.copy_(value.to(p.dtype))
    return module


def _model_patcher(config_class, unet_config: dict, head_channels, seed: int):
    comfy = import_comfy()
    model_config = config_class(unet_config)
    if head_channels is not None:  # ComfyUI's SD2/SDXL width (64) does not divide tiny channels
        model_config.unet_config["num_head_channels"] = head_channels
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, device=CPU)
    model.to(torch.float32)
    seed_weights(model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)


def comfy_sd15(model_channels: int = 32, channel_mult=(1, 2), num_res_blocks: int = 2, attention_levels=None,
               seed: int = 0):
    """Tiny SD1.5 ModelPatcher (`comfy.supported_models.SD15`), about 1-2 M parameters by default."""
    comfy = import_comfy()
    cfg = unet_config_sd15(model_channels, channel_mult, num_res_blocks, attention_levels)
    return _model_patcher(comfy.supported_models.SD15, cfg, None, seed)


def comfy_sd2(model_channels: int = 32, channel_mult=(1, 2), num_res_blocks: int = 2, attention_levels=None,
              seed: int = 0):
    """Tiny SD2.x ModelPatcher (`comfy.supported_models.SD20`: linear proj_in, context 1024)."""
    comfy = import_comfy()
    cfg = unet_config_sd2(model_channels, channel_mult, num_res_blocks, attention_levels)
    return _model_patcher(comfy.supported_models.SD20, cfg, 16, seed)


def comfy_sdxl(model_channels: int = 32, channel_mult=(1, 2, 2), seed: int = 0, **depths):
    """Tiny SDXL ModelPatcher (`comfy.supported_models.SDXL`, `model_base.SDXL`), SDXL's block layout
    (IN00-IN08, M00, OUT00-OUT08, label_emb) with few channels. `depths` may override the
    transformer_depth lists of `unet_config_sdxl` for a smaller model."""
    comfy = import_comfy()
    cfg = unet_config_sdxl(model_channels, channel_mult, **depths)
    return _model_patcher(comfy.supported_models.SDXL, cfg, 16, seed)


# --- text encoders ---------------------------------------------------------------------------

def tiny_clip_config(hidden: int = 32, layers: int = 2, heads: int = 4, act: str = "quick_gelu") -> dict:
    """Overrides for ComfyUI's CLIP json config: hidden width, depth, heads (vocab stays 49408)."""
    return {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_attention_heads": heads,
            "num_hidden_layers": layers, "projection_dim": hidden, "hidden_act": act}


def _comfy_clip(clip_class, tokenizer_class, overrides: dict, seed: int):
    comfy = import_comfy()
    import comfy.supported_models_base as smb

    target = smb.ClipTarget(tokenizer_class, clip_class)
    options = {"dtype": torch.float32, "load_device": CPU, "offload_device": CPU, "initial_device": CPU}
    options.update({f"{name}_model_config": cfg for name, cfg in overrides.items()})
    clip = comfy.sd.CLIP(target=target, model_options=options)
    seed_weights(clip.cond_stage_model, seed)
    return clip


def comfy_clip_sd15(layers: int = 2, hidden: int = 32, seed: int = 0):
    """Tiny SD1.x `comfy.sd.CLIP` (SD1ClipModel, CLIP-L naming `clip_l.transformer...`)."""
    import_comfy()
    import comfy.sd1_clip as sd1

    return _comfy_clip(sd1.SD1ClipModel, sd1.SD1Tokenizer, {"clip_l": tiny_clip_config(hidden, layers)}, seed)


def comfy_clip_sd2(layers: int = 3, hidden: int = 32, seed: int = 0):
    """Tiny SD2.x `comfy.sd.CLIP` (SD2ClipModel, OpenCLIP-H in HF naming `clip_h.transformer...`)."""
    import_comfy()
    from comfy.text_encoders import sd2_clip

    return _comfy_clip(sd2_clip.SD2ClipModel, sd2_clip.SD2Tokenizer,
                       {"clip_h": tiny_clip_config(hidden, layers, act="gelu")}, seed)


def comfy_clip_sdxl(layers_l: int = 3, layers_g: int = 3, hidden: int = 32, seed: int = 0):
    """Tiny SDXL `comfy.sd.CLIP` (SDXLClipModel: `clip_l` = te1, `clip_g` = te2)."""
    import_comfy()
    import comfy.sdxl_clip as sdxl

    return _comfy_clip(sdxl.SDXLClipModel, sdxl.SDXLTokenizer,
                       {"clip_l": tiny_clip_config(hidden, layers_l), "clip_g": tiny_clip_config(hidden, layers_g, act="gelu")},
                       seed)


# --- diffusers / transformers twins ------------------------------------------------------------

def diffusers_twin(kind: str):
    """The diffusers UNet2DConditionModel with the same structure and shapes as comfy_sd15/sd2/sdxl()
    (weights differ): the host for diffusers-format writers whose LoRAs then apply to the ComfyUI model."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    common = dict(sample_size=8, in_channels=4, out_channels=4, norm_num_groups=32, layers_per_block=2)
    if kind == "sd15":
        return UNet2DConditionModel(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768,
                                    attention_head_dim=4, **common)
    if kind == "sd2":
        return UNet2DConditionModel(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=1024,
                                    attention_head_dim=2, use_linear_projection=True, **common)
    return UNet2DConditionModel(
        block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2048,
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 4, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        **common)


def transformers_clip_twin(hidden: int = 32, layers: int = 2, act: str = "quick_gelu"):
    """A transformers CLIPTextModel shaped like the tiny ComfyUI encoders above (same module shapes)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=4, projection_dim=hidden, hidden_act=act)
    return CLIPTextModel(config).eval()


# --- DiT families ------------------------------------------------------------------------------

def flux_config(hidden: int = 64, heads: int = 2, depth: int = 2, depth_single: int = 3, guidance: bool = True,
                context: int = 32, vec: int = 32, in_channels: int = 16) -> dict:
    """A Flux.1-shaped `unet_config` (what comfy.model_detection builds for Flux), shrunk: hidden 64 = 2 heads
    x 32 (axes 8+12+12), 2 double and 3 single blocks; the fused layouts (qkv, linear1 = q|k|v|mlp) are
    Flux's, only narrower."""
    return {"image_model": "flux", "in_channels": in_channels, "patch_size": 2, "out_channels": 16,
            "vec_in_dim": vec, "context_in_dim": context, "hidden_size": hidden, "mlp_ratio": 4.0,
            "num_heads": heads, "depth": depth, "depth_single_blocks": depth_single,
            "axes_dim": [8, 12, 12] if hidden // heads == 32 else [hidden // heads // 4, hidden // heads * 3 // 8,
                                                                    hidden // heads * 3 // 8],
            "theta": 10000, "qkv_bias": True, "guidance_embed": guidance}


def chroma_config(hidden: int = 64, heads: int = 2, depth: int = 2, depth_single: int = 3, context: int = 32,
                  patch_size: int = 2) -> dict:
    """A Chroma-shaped config: Flux's blocks without per-block modulation, a 2-layer distilled guidance layer.
    As in ComfyUI's detection of a real Chroma, in/out_channels count a whole 2x2 patch (64 = 16 latent channels x
    4), so the model takes 16-channel latents like Flux."""
    cfg = flux_config(hidden, heads, depth, depth_single, False, context)
    cfg.update({"image_model": "chroma", "in_channels": 64, "out_channels": 64, "in_dim": 64, "out_dim": hidden,
                "hidden_dim": 96, "n_layers": 2, "patch_size": patch_size})
    for key in ("guidance_embed", "vec_in_dim"):
        cfg.pop(key)
    return cfg


def comfy_flux(seed: int = 0, variant: str = "dev", **overrides):
    """Tiny Flux.1 ModelPatcher built with ComfyUI's own classes (`comfy.supported_models.Flux` / `FluxSchnell`,
    `model_base.Flux`): keys `diffusion_model.double_blocks.N...`, fused `img_attn.qkv` (3 x 64 rows) and
    `single_blocks.N.linear1` (3 x 64 + 256 rows)."""
    comfy = import_comfy()
    classes = {"dev": comfy.supported_models.Flux, "schnell": comfy.supported_models.FluxSchnell}
    cfg = flux_config(guidance=variant == "dev", **overrides)
    return _model_patcher(classes[variant], cfg, None, seed)


def comfy_chroma(seed: int = 0, **overrides):
    """Tiny Chroma ModelPatcher (`comfy.supported_models.Chroma`, `model_base.Chroma`)."""
    comfy = import_comfy()
    return _model_patcher(comfy.supported_models.Chroma, chroma_config(**overrides), None, seed)


def tiny_t5_config(hidden: int = 32, layers: int = 2, heads: int = 4) -> dict:
    """Overrides for ComfyUI's T5-XXL json config (gated-GELU T5 v1.1 blocks; vocabulary kept for the tokenizer)."""
    return {"d_model": hidden, "d_ff": 2 * hidden, "d_kv": hidden // heads, "num_heads": heads,
            "num_layers": layers}


def comfy_clip_flux(layers_l: int = 2, layers_t5: int = 2, hidden: int = 32, seed: int = 0):
    """Tiny Flux `comfy.sd.CLIP` (FluxClipModel: `clip_l` = te1, `t5xxl` = te2)."""
    import_comfy()
    from comfy.text_encoders import flux

    return _comfy_clip(flux.flux_clip(), flux.FluxTokenizer, {"clip_l": tiny_clip_config(hidden, layers_l),
                                                              "t5xxl": tiny_t5_config(hidden, layers_t5)}, seed)


def comfy_clip_chroma(layers_t5: int = 2, hidden: int = 32, seed: int = 0):
    """Tiny Chroma `comfy.sd.CLIP` (PixArt's T5-XXL alone: `t5xxl` = te1)."""
    import_comfy()
    from comfy.text_encoders import pixart_t5

    return _comfy_clip(pixart_t5.pixart_te(), pixart_t5.PixArtTokenizer,
                       {"t5xxl": tiny_t5_config(hidden, layers_t5)}, seed)
