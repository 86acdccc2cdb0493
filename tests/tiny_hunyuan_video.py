"""Tiny but real HunyuanVideo models and CLIPs for tests, built with ComfyUI's own classes (CPU, fp32, seeded).

* `comfy_hunyuan_video(variant)` -> `comfy.model_patcher.ModelPatcher` over `comfy.supported_models.HunyuanVideo`
  (T2V), `HunyuanVideoI2V` (in_channels 33) or `HunyuanVideoSkyreelsI2V` (32), `model_base.HunyuanVideo*`,
  made from the `unet_config` ComfyUI's detector derives from a HunyuanVideo state dict (model_detection.py, the
  `txt_in.individual_token_refiner.blocks.0.norm1.weight` branch), shrunk. The detector takes the hidden size from
  `img_in.proj` and sets `num_heads = hidden / 128`; everything else is a constructor argument of
  `comfy/ldm/hunyuan_video/model.py::HunyuanVideo`, free within one constraint: the rotary axes `axes_dim` add up
  to the head width (16 + 56 + 56 = 128 at full size). Default here: 2 heads x 32 (axes 8 + 12 + 12) = 64 wide,
  the tiny Flux's widths and block counts (2 double, 3 single), so a Flux LoRA fits this model's shapes and only
  its names and metadata can tell it apart; a 3-D patch embedder `img_in.proj` (Conv3d, patch 1 x 2 x 2);
  `txt_in` token refiner over the tiny Llama's width (32) with ComfyUI's fixed 2 refiner blocks; `vector_in` over
  the tiny CLIP-L's pooled width (32); a guidance input (HunyuanVideo's distilled guidance).
* `comfy_clip_hunyuan_video()` -> `comfy.sd.CLIP` over ComfyUI's `HunyuanVideoClipModel` (`clip_l` = CLIP-L,
  `llama` = LLaVA-Llama-3-8B's language model, `comfy.text_encoders.llama.Llama2`), both shrunk through ComfyUI's
  own `<name>_model_config` options (Llama: hidden 32, 4 layers - ComfyUI reads layer -3 -, 2 heads / 1 KV head;
  the head width 128 is a class constant of `Llama2Config`; vocabulary kept for the real tokenizer).
* `diffusers_hunyuan_video_twin()` -> diffusers' `HunyuanVideoTransformer3DModel` with the same sizes, so the same
  modules have the same shapes (weights differ).
* `comfy_hunyuan_video_15()` / `comfy_clip_hunyuan_video_15()` -> HunyuanVideo 1.5 (`supported_models.
  HunyuanVideo15`) and its Qwen2.5-VL CLIP with ComfyUI's own tokenizer, tiny.
"""
from __future__ import annotations

import torch

from tests.comfy_host import import_comfy
from tests.tiny_models import CPU, _comfy_clip, _model_patcher, seed_weights, tiny_clip_config

HIDDEN, HEADS, DEPTH, DEPTH_SINGLE, CONTEXT, VEC = 64, 2, 2, 3, 32, 32
IN_CHANNELS = {"t2v": 16, "i2v": 33, "skyreels": 32}
CLASSES = {"t2v": "HunyuanVideo", "i2v": "HunyuanVideoI2V", "skyreels": "HunyuanVideoSkyreelsI2V"}


def hunyuan_video_config(variant: str = "t2v", hidden: int = HIDDEN, heads: int = HEADS, depth: int = DEPTH,
                         depth_single: int = DEPTH_SINGLE, context: int = CONTEXT, vec=VEC,
                         guidance: bool = True) -> dict:
    """The `unet_config` comfy.model_detection builds for a HunyuanVideo state dict, at tiny size."""
    head = hidden // heads
    if head * heads != hidden or head % 8:
        raise ValueError(f"hidden {hidden} must be heads x a head width divisible by 8, got {heads} heads")
    return {"image_model": "hunyuan_video", "in_channels": IN_CHANNELS[variant], "patch_size": [1, 2, 2],
            "out_channels": 16, "vec_in_dim": vec, "axes_dim": [head // 4, head * 3 // 8, head * 3 // 8],
            "meanflow": False, "context_in_dim": context, "hidden_size": hidden, "mlp_ratio": 4.0,
            "num_heads": heads, "depth": depth, "depth_single_blocks": depth_single, "theta": 256,
            "qkv_bias": True, "byt5": False, "guidance_embed": guidance, "use_cond_type_embedding": False,
            "vision_in_dim": None}


def comfy_hunyuan_video(variant: str = "t2v", seed: int = 0, **sizes):
    """Tiny HunyuanVideo ModelPatcher (`comfy.supported_models.<CLASSES[variant]>`); keys
    `diffusion_model.double_blocks.N.img_attn.qkv.weight`, `diffusion_model.img_in.proj.weight` (5-D), ..."""
    comfy = import_comfy()
    config_class = getattr(comfy.supported_models, CLASSES[variant])
    return _model_patcher(config_class, hunyuan_video_config(variant, **sizes), None, seed)


def tiny_llama_config(hidden: int = 32, layers: int = 4, heads: int = 2, kv_heads: int = 1) -> dict:
    """Overrides for ComfyUI's `Llama2Config` (the LLaVA-Llama-3-8B language model; head_dim is a class constant)."""
    return {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads}


def comfy_clip_hunyuan_video(layers_l: int = 2, layers_llama: int = 4, hidden: int = 32, seed: int = 0):
    """Tiny HunyuanVideo `comfy.sd.CLIP` (HunyuanVideoClipModel: `clip_l` = te1, `llama` = te2)."""
    import_comfy()
    from comfy.text_encoders import hunyuan_video

    return _comfy_clip(hunyuan_video.hunyuan_video_clip(), hunyuan_video.HunyuanVideoTokenizer,
                       {"clip_l": tiny_clip_config(hidden, layers_l), "llama": tiny_llama_config(hidden, layers_llama)},
                       seed)


def diffusers_hunyuan_video_twin(hidden: int = HIDDEN, heads: int = HEADS, depth: int = DEPTH,
                                 depth_single: int = DEPTH_SINGLE, context: int = CONTEXT, vec: int = VEC,
                                 in_channels: int = 16, seed: int = 0):
    """diffusers' HunyuanVideoTransformer3DModel with the sizes of `comfy_hunyuan_video()` (seeded weights)."""
    from diffusers import HunyuanVideoTransformer3DModel

    head = hidden // heads
    model = HunyuanVideoTransformer3DModel(
        in_channels=in_channels, out_channels=16, num_attention_heads=heads, attention_head_dim=head,
        num_layers=depth, num_single_layers=depth_single, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2,
        patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=context, pooled_projection_dim=vec,
        rope_theta=256.0, rope_axes_dim=(head // 4, head * 3 // 8, head * 3 // 8))
    return seed_weights(model.to(CPU, torch.float32), seed).eval()


def hunyuan_video_15_config(hidden: int = HIDDEN, heads: int = HEADS, depth: int = DEPTH, context: int = CONTEXT,
                            vision: int = 48) -> dict:
    """HunyuanVideo 1.5's `unet_config` as model_detection.py builds it (no vector_in, no guidance, `byt5_in`,
    `vision_in`, `cond_type_embedding`, double blocks only), shrunk; the SigLIP width `vision_in_dim` is a
    constructor argument (1152 at full size)."""
    config = hunyuan_video_config("t2v", hidden, heads, depth, 0, context, None, guidance=False)
    config.update({"in_channels": 65, "out_channels": 32, "patch_size": [1, 1, 1], "byt5": True,
                   "use_cond_type_embedding": True, "vision_in_dim": vision})
    return config


def comfy_hunyuan_video_15(seed: int = 0, **sizes):
    """Tiny HunyuanVideo 1.5 ModelPatcher (`comfy.supported_models.HunyuanVideo15`, `model_base.HunyuanVideo15`)."""
    comfy = import_comfy()
    return _model_patcher(comfy.supported_models.HunyuanVideo15, hunyuan_video_15_config(**sizes), None, seed)


def diffusers_hunyuan_video_15_twin(hidden: int = HIDDEN, heads: int = HEADS, depth: int = DEPTH,
                                    context: int = CONTEXT, vision: int = 48, seed: int = 0):
    """diffusers' HunyuanVideo15Transformer3DModel with the sizes of `comfy_hunyuan_video_15()` (seeded weights)."""
    from diffusers import HunyuanVideo15Transformer3DModel

    head = hidden // heads
    model = HunyuanVideo15Transformer3DModel(
        in_channels=65, out_channels=32, num_attention_heads=heads, attention_head_dim=head, num_layers=depth,
        num_refiner_layers=2, text_embed_dim=context, text_embed_2_dim=1472, image_embed_dim=vision,
        rope_axes_dim=(head // 4, head * 3 // 8, head * 3 // 8))
    return seed_weights(model.to(CPU, torch.float32), seed).eval()


def comfy_clip_hunyuan_video_15(layers: int = 4, hidden: int = CONTEXT, seed: int = 0):
    """Tiny HunyuanVideo 1.5 `comfy.sd.CLIP`: ComfyUI's own text encoder for it (supported_models.HunyuanVideo15.
    clip_target: `hunyuan_image.te`, Qwen2.5-VL-7B as `qwen25_7b` = te1, which reads layer -3: 4 layers) and its
    own HunyuanVideo15Tokenizer (the Qwen2.5 tokenizer files ComfyUI ships; the video prompt template is cut off
    after encoding), without the ByT5 glyph encoder (a caption without quoted text gives it nothing). The Qwen
    keeps its vocabulary for the real tokenizer; the vision tower is shrunk as in tests/tiny_qwen_image.py."""
    import_comfy()
    from comfy.text_encoders import hunyuan_image, hunyuan_video

    from tests import tiny_qwen_image as tq

    with tq._small_vision_tower():
        return _comfy_clip(hunyuan_image.te(byt5=False), hunyuan_video.HunyuanVideo15Tokenizer,
                           {"qwen25_7b": tq.tiny_qwen25_config(hidden, layers)}, seed)
