"""Tiny but real Wan 2.1 / 2.2 models and CLIPs for tests, built with ComfyUI's own classes (CPU, fp32, seeded).

* `comfy_wan(variant)` -> a `comfy.model_patcher.ModelPatcher` over the `comfy.supported_models` class ComfyUI picks
  for that `unet_config` (comfy/ldm/wan/model.py's WanModel inside model_base.WAN21 / WAN22). The config is what
  `comfy.model_detection.detect_unet_config` derives from a Wan state dict (the `head.modulation` branch), shrunk:
  dim 64 with 2 heads (ComfyUI's detector sets num_heads = dim / 128, which a tiny width cannot have; the head width
  32 gives rotary axes 12 + 10 + 10), 2 blocks, FFN 128, text width 32 (the tiny UMT5's, so its conditioning fits).
  Variants:

  - "t2v": Wan 2.1 T2V / 2.2 T2V-A14B expert structure (`supported_models.WAN21_T2V`, 16 channels in and out);
  - "i2v": Wan 2.1 I2V (`WAN21_I2V`: model_type i2v, in_dim 36, `img_emb` and `cross_attn.k_img` / `v_img`);
  - "i2v-a14b": a Wan 2.2 I2V-A14B expert (`WAN21_T2V` with in_dim 36: no CLIP-image branch);
  - "5b": Wan 2.2 TI2V-5B (`WAN22_T2V`, model_base.WAN22: 48 channels in and out; `comfy_wan22_vae` is its VAE).
* `comfy_clip_wan()` -> `comfy.sd.CLIP` over ComfyUI's Wan text encoder (`comfy.text_encoders.wan.te()`:
  `umt5xxl` = UMT5-XXL), shrunk through ComfyUI's own `umt5xxl_model_config` option.
* `diffusers_wan_twin(variant)` -> diffusers' `WanTransformer3DModel` with the same shapes (weights differ).
"""
from __future__ import annotations

import torch

from tests.comfy_host import import_comfy
from tests.tiny_models import CPU, _comfy_clip, _model_patcher, seed_weights, tiny_t5_config

DIM, HEADS, DEPTH, FFN, TEXT = 64, 2, 2, 128, 32
# variant -> (supported_models class name, model_type, in_dim, out_dim)
VARIANTS = {
    "t2v": ("WAN21_T2V", "t2v", 16, 16),
    "i2v": ("WAN21_I2V", "i2v", 36, 16),
    "i2v-a14b": ("WAN21_T2V", "t2v", 36, 16),
    "5b": ("WAN22_T2V", "t2v", 48, 48),
}


def wan_config(variant: str = "t2v", dim: int = DIM, heads: int = HEADS, depth: int = DEPTH, ffn: int = FFN,
               text_dim: int = TEXT) -> dict:
    """The unet_config comfy.model_detection builds for a Wan state dict (model_detection.py, `head.modulation`),
    at tiny size (num_heads given: see the module docstring)."""
    _, model_type, in_dim, out_dim = VARIANTS[variant]
    return {"image_model": "wan2.1", "dim": dim, "out_dim": out_dim, "num_heads": heads, "ffn_dim": ffn,
            "num_layers": depth, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1),
            "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6, "in_dim": in_dim, "model_type": model_type,
            "text_dim": text_dim}


def comfy_wan(variant: str = "t2v", seed: int = 0, **sizes):
    """Tiny Wan ModelPatcher; keys `diffusion_model.blocks.N.self_attn.q.weight`, `diffusion_model.blocks.N.
    modulation` (a parameter), `diffusion_model.head.modulation`, ..."""
    comfy = import_comfy()
    config_class = getattr(comfy.supported_models, VARIANTS[variant][0])
    return _model_patcher(config_class, wan_config(variant, **sizes), None, seed)


class _NoTokenizer:
    """Stands in for WanT5Tokenizer, whose SentencePiece model (UMT5's, 4 MB) ComfyUI does not ship: these tests
    patch weights and never tokenize."""

    def __init__(self, embedding_directory=None, tokenizer_data=None):
        pass

    def state_dict(self):
        return {}


def comfy_clip_wan(layers: int = 2, hidden: int = TEXT, seed: int = 0):
    """Tiny Wan `comfy.sd.CLIP` (WanTEModel: `umt5xxl` = te1; UMT5 keeps a relative attention bias per block)."""
    import_comfy()
    from comfy.text_encoders import wan

    return _comfy_clip(wan.te(), _NoTokenizer, {"umt5xxl": tiny_t5_config(hidden, layers)}, seed)


def diffusers_wan_twin(variant: str = "t2v", dim: int = DIM, heads: int = HEADS, depth: int = DEPTH, ffn: int = FFN,
                       text_dim: int = TEXT, seed: int = 0):
    """diffusers' WanTransformer3DModel with the shapes of `comfy_wan(variant)` (seeded weights): RMS q/k norms
    across heads, cross-attention norm, the image branch (`added_kv_proj_dim`, `image_dim` 1280) for "i2v"."""
    from diffusers import WanTransformer3DModel

    _, model_type, in_dim, out_dim = VARIANTS[variant]
    i2v = variant == "i2v"
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=dim // heads,
                                  in_channels=in_dim, out_channels=out_dim, text_dim=text_dim, freq_dim=256,
                                  ffn_dim=ffn, num_layers=depth, cross_attn_norm=True,
                                  qk_norm="rms_norm_across_heads", image_dim=1280 if i2v else None,
                                  added_kv_proj_dim=dim if i2v else None)
    return seed_weights(model.to(CPU, torch.float32), seed).eval()


def _t5_as_umt5_tokenizer(min_length: int):
    """A tokenizer under WanT5Model's `umt5xxl` key from the T5 tokenizer ComfyUI ships (comfy/text_encoders/
    t5_tokenizer: T5's 32k SentencePiece ids, all inside UMT5's 256k vocabulary). UMT5's own SentencePiece model
    comes inside the UMT5-XXL checkpoint (tokenizer_data "spiece_model"), which tests do not have; UMT5XXlTokenizer's
    other settings are kept (no start token, end token 1, pad 0), with a short `min_length` instead of 512."""
    import os

    import_comfy()
    from comfy import sd1_clip
    from comfy.text_encoders import sd3_clip
    from transformers import T5TokenizerFast

    path = os.path.join(os.path.dirname(os.path.realpath(sd3_clip.__file__)), "t5_tokenizer")

    class Inner(sd1_clip.SDTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            super().__init__(path, embedding_directory=embedding_directory, pad_with_end=False, embedding_size=TEXT,
                             embedding_key="umt5xxl", tokenizer_class=T5TokenizerFast, has_start_token=False,
                             pad_to_max_length=False, max_length=99999999, min_length=min_length, pad_token=0,
                             tokenizer_data=tokenizer_data)

    class Tokenizer(sd1_clip.SD1Tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                             clip_name="umt5xxl", tokenizer=Inner)

    return Tokenizer


def comfy_clip_wan_tokenizing(layers: int = 2, hidden: int = TEXT, seed: int = 0, min_length: int = 16):
    """`comfy_clip_wan` that can tokenize captions (`_t5_as_umt5_tokenizer`): the train node's own text path,
    CLIP.tokenize + encode_from_tokens through ComfyUI's WanTEModel (UMT5 with attention masks, padding zeroed)."""
    import_comfy()
    from comfy.text_encoders import wan

    return _comfy_clip(wan.te(), _t5_as_umt5_tokenizer(min_length), {"umt5xxl": tiny_t5_config(hidden, layers)},
                       seed)


def comfy_wan_vae(seed: int = 22):
    """A real comfy.sd.VAE over ComfyUI's Wan 2.1 VAE (comfy.ldm.wan.vae.WanVAE: 16 channels, 4x temporal and 8x
    spatial compression) at demo/tiny_wan.py's base width 8, seeded like demo.tiny_wan's file (fp32)."""
    import_comfy()
    import comfy.sd
    from demo.tiny_wan import _fill, wan_vae_layout

    generator = torch.Generator().manual_seed(seed)
    state = {key: _fill(key, shape, generator) for key, shape in sorted(wan_vae_layout().items())}
    return comfy.sd.VAE(sd=state)


def comfy_wan22_vae(seed: int = 22, dim: int = 8):
    """A real comfy.sd.VAE over ComfyUI's Wan 2.2 VAE (comfy.ldm.wan.vae2_2.WanVAE: 48 channels, 4x temporal and 16x
    spatial compression, the TI2V-5B's), seeded, at base width `dim`. comfy/sd.py recognises the Wan 2.2 VAE by its
    keys (`decoder.upsamples.0.upsamples.0.residual.2.weight`) and builds it at the real widths (dim 160, decoder
    256) whatever the file holds, so the class is given the tiny widths while the VAE is built; everything else
    (latent channels, scale ratios, encode path) is sd.py's own."""
    from unittest import mock

    import_comfy()
    import comfy.ldm.wan.vae2_2 as vae22
    import comfy.sd
    from demo.tiny_wan import _fill

    real = vae22.WanVAE
    config = {"dim": dim, "dec_dim": dim, "z_dim": 48, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
              "attn_scales": [], "temperal_downsample": [False, True, True], "dropout": 0.0}
    with torch.device("meta"):
        layout = {key: tuple(value.shape) for key, value in real(**config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {key: _fill(key, shape, generator) for key, shape in sorted(layout.items())}
    with mock.patch.object(vae22, "WanVAE", lambda **c: real(**{**c, "dim": dim, "dec_dim": dim})):
        return comfy.sd.VAE(sd=state)
