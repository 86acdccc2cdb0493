"""Tiny but real Z-Image and Lumina Image 2.0 models and CLIPs for tests, built with ComfyUI's own classes (CPU,
fp32, seeded weights).

* `comfy_z_image()` / `comfy_lumina2()` -> `comfy.model_patcher.ModelPatcher` over `model_base.Lumina2` (ComfyUI's
  NextDiT, comfy/ldm/lumina/model.py), made by `comfy.supported_models.ZImage` / `Lumina2` from the `unet_config`
  model_detection.py builds for each (its `cap_embedder.1.weight` branch: dim, cap_feat_dim, n_layers, heads, KV
  heads, axes, ffn multiplier, Z-Image's modulation), shrunk. Constraints: head width = dim / n_heads = sum of
  `axes_dims`; `multiple_of` (NextDiT default 256) is set to 16 so the feed-forward width stays small.
  - Z-Image: dim 48, 2 heads / 2 KV heads (equal q / k / v thirds, as Z-Image's 30 / 30), ffn int(8/3 x 48) = 128
    (diffusers' ZImageTransformer2DModel gives the same), `adaLN_modulation.0` from a min(dim, 256)-wide input;
    pad tokens (`pad_tokens_multiple`).
  - Lumina 2: dim 64, 4 heads / **2 KV heads (GQA)**: `attention.qkv` rows [q 64 | k 32 | v 32] (Lumina 2:
    [2304 | 768 | 768]), ffn 4 x 64, `adaLN_modulation.1`.
  Both: 2 layers, 2 noise + 2 context refiners, caption width 32 (the tiny encoders' width), 16 latent channels.
* `comfy_clip_z_image()` / `comfy_clip_lumina2()` -> `comfy.sd.CLIP` over ComfyUI's `ZImageTEModel` (`qwen3_4b`,
  Qwen3-4B: `Llama2_` with q/k norms) / Lumina 2's `LuminaModel` (`gemma2_2b`, Gemma-2-2B: Llama2_ with Gemma's
  sandwich norms), shrunk through ComfyUI's own `<name>_model_config` option (hidden 32, 3 layers: it reads layer -2; the head width
  stays the config classes' constant).
* `diffusers_z_image_twin()` / `diffusers_lumina2_twin()` -> diffusers' own ZImageTransformer2DModel /
  Lumina2Transformer2DModel with the same sizes (seeded weights; names differ, shapes agree except Z-Image's
  t_embedder, whose middle width diffusers fixes at 1024).
"""
from __future__ import annotations

import torch

from tests.comfy_host import import_comfy
from tests.tiny_models import CPU, _comfy_clip, _model_patcher, seed_weights

CONTEXT = 32
Z_IMAGE = dict(dim=48, n_heads=2, n_kv_heads=2, axes_dims=[8, 8, 8])
LUMINA2 = dict(dim=64, n_heads=4, n_kv_heads=2, axes_dims=[4, 6, 6])


def z_image_config(layers: int = 2, dim: int = 48, heads: int = 2, kv_heads: int = 2, cap: int = CONTEXT) -> dict:
    """model_detection.py's Z-Image unet_config (dim 3840 branch), at tiny size."""
    head = dim // heads
    return {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": dim, "cap_feat_dim": cap,
            "n_layers": layers, "qk_norm": True, "n_heads": heads, "n_kv_heads": kv_heads,
            "axes_dims": [head // 3, head // 3, head - 2 * (head // 3)], "axes_lens": [64, 64, 64],
            "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0,
            "pad_tokens_multiple": 32, "multiple_of": 16}


def lumina2_config(layers: int = 2, dim: int = 64, heads: int = 4, kv_heads: int = 2, cap: int = CONTEXT) -> dict:
    """model_detection.py's Lumina 2 unet_config (dim 2304 branch: GQA, ffn x 4), at tiny size."""
    head = dim // heads
    return {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": dim, "cap_feat_dim": cap,
            "n_layers": layers, "qk_norm": True, "n_heads": heads, "n_kv_heads": kv_heads,
            "axes_dims": [head - 2 * (head * 3 // 8), head * 3 // 8, head * 3 // 8], "axes_lens": [64, 64, 64],
            "rope_theta": 10000.0, "ffn_dim_multiplier": 4.0, "multiple_of": 16}


def comfy_z_image(seed: int = 0, **sizes):
    """Tiny Z-Image ModelPatcher (`comfy.supported_models.ZImage`, `model_base.Lumina2`)."""
    comfy = import_comfy()
    patcher = _model_patcher(comfy.supported_models.ZImage, z_image_config(**sizes), None, seed)
    return patcher


def comfy_lumina2(seed: int = 0, **sizes):
    """Tiny Lumina Image 2.0 ModelPatcher (`comfy.supported_models.Lumina2`, GQA attention)."""
    comfy = import_comfy()
    return _model_patcher(comfy.supported_models.Lumina2, lumina2_config(**sizes), None, seed)


def tiny_llm_config(hidden: int = 32, layers: int = 2, heads: int = 2, kv_heads: int = 1) -> dict:
    """Overrides for ComfyUI's Qwen3_4BConfig / Gemma2_2B_Config (dataclass fields; head_dim is a class constant)."""
    return {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads}


def comfy_clip_z_image(layers: int = 3, hidden: int = 32, seed: int = 0):
    """Tiny Z-Image `comfy.sd.CLIP` (ZImageTEModel: `qwen3_4b` = te1)."""
    import_comfy()
    from comfy.text_encoders import z_image

    return _comfy_clip(z_image.te(), z_image.ZImageTokenizer, {"qwen3_4b": tiny_llm_config(hidden, layers)}, seed)


def comfy_clip_lumina2(layers: int = 3, hidden: int = 32, seed: int = 0):
    """Tiny Lumina 2 `comfy.sd.CLIP` (LuminaModel: `gemma2_2b` = te1). The Gemma tokenizer needs its
    sentencepiece model (a checkpoint carries it): these tests only read and patch weights."""
    import_comfy()
    from comfy.text_encoders import lumina2

    class NoTokenizer:
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            pass

        def state_dict(self):
            return {}

    return _comfy_clip(lumina2.te(), NoTokenizer, {"gemma2_2b": tiny_llm_config(hidden, layers)}, seed)


def diffusers_z_image_twin(seed: int = 0, layers: int = 2):
    """diffusers' ZImageTransformer2DModel with comfy_z_image()'s sizes."""
    from diffusers import ZImageTransformer2DModel

    cfg = z_image_config(layers)
    model = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=cfg["dim"],
                                     n_layers=layers, n_refiner_layers=2, n_heads=cfg["n_heads"],
                                     n_kv_heads=cfg["n_kv_heads"], cap_feat_dim=CONTEXT, axes_dims=cfg["axes_dims"],
                                     axes_lens=cfg["axes_lens"])
    return seed_weights(model.to(CPU, torch.float32), seed).eval()


def diffusers_lumina2_twin(seed: int = 0, layers: int = 2):
    """diffusers' Lumina2Transformer2DModel with comfy_lumina2()'s sizes (GQA 4 / 2 heads)."""
    from diffusers import Lumina2Transformer2DModel

    cfg = lumina2_config(layers)
    model = Lumina2Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, hidden_size=cfg["dim"],
                                      num_layers=layers, num_refiner_layers=2, num_attention_heads=cfg["n_heads"],
                                      num_kv_heads=cfg["n_kv_heads"], multiple_of=16, ffn_dim_multiplier=None,
                                      axes_dim_rope=tuple(cfg["axes_dims"]), axes_lens=(64, 64, 64),
                                      cap_feat_dim=CONTEXT)
    return seed_weights(model.to(CPU, torch.float32), seed).eval()
