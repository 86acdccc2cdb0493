"""Tiny but real Qwen-Image models for tests, built with ComfyUI's own classes (CPU, fp32, seeded weights).

* `comfy_qwen_image()` -> `comfy.model_patcher.ModelPatcher` over `model_base.QwenImage`, made by
  `comfy.supported_models.QwenImage(unet_config)` exactly as ComfyUI makes it for a checkpoint, with a shrunk
  config. ComfyUI's detector (model_detection.py) reads only `in_channels` and `num_layers` from a file; every
  other size is a constructor argument of `comfy/ldm/qwen_image/model.py::QwenImageTransformer2DModel`, free
  within two constraints: the inner width is `num_attention_heads x attention_head_dim`, and the rotary axes
  `axes_dims_rope` must add up to `attention_head_dim` (EmbedND over head_dim; 16+56+56 = 128 at full size).
  Default here: 2 heads x 32 (axes 8+12+12) = 64 wide, 2 blocks, text width 32 (the tiny CLIP's), in_channels
  64 (16 latent channels x 2 x 2, as ComfyUI's Wan21 latent format packs them), out_channels 16. Keys
  `diffusion_model.transformer_blocks.N.attn.to_q.weight` etc. (ComfyUI keeps diffusers' names).
* `comfy_clip_qwen_image()` -> `comfy.sd.CLIP` over ComfyUI's `QwenImageTEModel` (`qwen25_7b` = Qwen2.5-VL-7B:
  `Llama2_` language model plus the Qwen2-VL vision tower), with the language model shrunk through ComfyUI's
  own `qwen25_7b_model_config` option (hidden 32, 2 layers, 2 heads / 1 KV head; the head width stays
  Qwen2.5-VL's 128, a class constant of `Qwen25_7BVLI_Config`, vocabulary kept for the real tokenizer). The
  vision tower's width (1280) is hard-coded in `Qwen25_7BVLI.__init__`, so while the CLIP is built ComfyUI's
  own `Qwen2VLVisionTransformer` is constructed with small sizes (width 32, 2 heads, 2 blocks) instead: same
  class and module names, about 0.1 M parameters instead of 0.6 B. Keys `qwen25_7b.transformer.model.layers.N
  .self_attn.q_proj.weight`, `qwen25_7b.transformer.visual.blocks.N.attn.qkv.weight`.
* `diffusers_qwen_image_twin()` -> diffusers' `QwenImageTransformer2DModel` with the same sizes, so the same
  module names have the same shapes (weights differ).
"""
from __future__ import annotations

import contextlib

import torch

from tests.comfy_host import import_comfy
from tests.tiny_models import CPU, _comfy_clip, _model_patcher, seed_weights

HIDDEN, HEADS, DEPTH, CONTEXT = 64, 2, 2, 32   # CONTEXT = the tiny CLIP's width: its conditioning fits


def qwen_image_config(hidden: int = HIDDEN, heads: int = HEADS, depth: int = DEPTH, context: int = CONTEXT,
                      in_channels: int = 64, out_channels: int = 16) -> dict:
    """A Qwen-Image `unet_config`: what ComfyUI's detector gives (`image_model`, `in_channels`, `num_layers`) plus
    the sizes the model class takes as arguments (see the module docstring for the constraints)."""
    head = hidden // heads
    if head * heads != hidden or head % 8:
        raise ValueError(f"hidden {hidden} must be heads x a head width divisible by 8, got {heads} heads")
    return {"image_model": "qwen_image", "in_channels": in_channels, "out_channels": out_channels,
            "num_layers": depth, "attention_head_dim": head, "num_attention_heads": heads,
            "joint_attention_dim": context, "patch_size": 2,
            "axes_dims_rope": (head // 4, head * 3 // 8, head * 3 // 8)}


def comfy_qwen_image(seed: int = 0, **sizes):
    """Tiny Qwen-Image ModelPatcher (`comfy.supported_models.QwenImage`, `model_base.QwenImage`)."""
    comfy = import_comfy()
    return _model_patcher(comfy.supported_models.QwenImage, qwen_image_config(**sizes), None, seed)


def tiny_qwen25_config(hidden: int = 32, layers: int = 2, heads: int = 2, kv_heads: int = 1) -> dict:
    """Overrides for ComfyUI's `Qwen25_7BVLI_Config` (dataclass fields only; head_dim 128 is a class constant)."""
    return {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads}


@contextlib.contextmanager
def _small_vision_tower(width: int = 32, heads: int = 2, blocks: int = 2):
    from comfy.text_encoders import llama, qwen_vl

    original = qwen_vl.Qwen2VLVisionTransformer

    def small(hidden_size, output_hidden_size, device=None, dtype=None, ops=None, **_):
        return original(hidden_size=width, output_hidden_size=output_hidden_size, intermediate_size=2 * width,
                        num_heads=heads, num_layers=blocks, device=device, dtype=dtype, ops=ops)

    assert llama.qwen_vl is qwen_vl
    qwen_vl.Qwen2VLVisionTransformer = small
    try:
        yield
    finally:
        qwen_vl.Qwen2VLVisionTransformer = original


def comfy_clip_qwen_image(layers: int = 2, hidden: int = 32, seed: int = 0):
    """Tiny Qwen-Image `comfy.sd.CLIP` (QwenImageTEModel: `qwen25_7b` = te1)."""
    import_comfy()
    from comfy.text_encoders import qwen_image

    with _small_vision_tower():
        return _comfy_clip(qwen_image.te(), qwen_image.QwenImageTokenizer,
                           {"qwen25_7b": tiny_qwen25_config(hidden, layers)}, seed)


def diffusers_qwen_image_twin(hidden: int = HIDDEN, heads: int = HEADS, depth: int = DEPTH, context: int = CONTEXT,
                              seed: int = 0):
    """diffusers' QwenImageTransformer2DModel with the sizes of `comfy_qwen_image()` (seeded weights)."""
    from diffusers import QwenImageTransformer2DModel

    cfg = qwen_image_config(hidden, heads, depth, context)
    model = QwenImageTransformer2DModel(patch_size=2, in_channels=cfg["in_channels"],
                                        out_channels=cfg["out_channels"], num_layers=depth,
                                        attention_head_dim=cfg["attention_head_dim"], num_attention_heads=heads,
                                        joint_attention_dim=context, axes_dims_rope=cfg["axes_dims_rope"])
    return seed_weights(model.to(CPU, torch.float32), seed).eval()


def comfy_z_image(seed: int = 0):
    """A tiny Z-Image ModelPatcher (`comfy.supported_models.ZImage`, `model_base.Lumina2`, ComfyUI's NextDiT), for
    mismatch tests: another family's model (tests/tiny_lumina.py has that family's own), whose LoRAs must be
    refused on Qwen-Image and on which a Qwen-Image LoRA must be refused. Sizes as model_detection.py gives Z-Image, shrunk (dim 64, 2 heads)."""
    comfy = import_comfy()
    cfg = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": 32,
           "n_layers": 2, "qk_norm": True, "n_heads": 2, "n_kv_heads": 2, "axes_dims": [8, 12, 12],
           "axes_lens": [64, 64, 64], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
           "z_image_modulation": True, "time_scale": 1000.0, "multiple_of": 16}
    return _model_patcher(comfy.supported_models.ZImage, cfg, None, seed)
