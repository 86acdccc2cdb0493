"""Tiny but real Flux.2 [dev] models and CLIPs for tests, built with ComfyUI's own classes (CPU, fp32, seeded).

* `comfy_flux2()` -> a `comfy.model_patcher.ModelPatcher` over `comfy.supported_models.Flux2(unet_config)` /
  `model_base.Flux2` (ComfyUI's Flux class with Flux.2's switches, comfy/ldm/flux/model.py, layers.py). The
  config is what `comfy.model_detection.detect_unet_config` derives from a Flux.2 state dict (the
  `double_stream_modulation_img.lin.weight` branch: global modulation, SiLU-gated MLPs, no biases, mlp_ratio 3,
  patch 1), shrunk: hidden 64 = 2 heads x 32 (rotary axes 8+8+8+8 = the head width, like the real 4 x 32 of
  128), 2 double and 3 single blocks, text width 32 (the tiny CLIP's). ComfyUI hard-codes 48 heads in its
  detector; the model class takes any count. So the fused layouts are Flux.2's, only narrower:
  `img_attn.qkv` 3h = 192 rows, `img_mlp.0` [gate | up] 2 x 3h = 384 rows, `single_blocks.N.linear1`
  q | k | v | gate | up = 3h + 2 x 3h = 576 rows, `linear2` reads [attention h | MLP 3h] = 256 columns, the global
  `double_stream_modulation_img.lin` 6h rows, `single_stream_modulation.lin` 3h.
* `comfy_clip_flux2()` -> `comfy.sd.CLIP` over ComfyUI's own `Flux2TEModel` (`mistral3_24b` = Mistral-Small-3.x
  24B, a `Llama2_` language model; text_encoders/flux.py `flux2_te`), with the language model shrunk through
  ComfyUI's own `mistral3_24b_model_config` option (hidden 32, 2 layers, 2 heads / 1 KV head, a small
  vocabulary; the head width stays Mistral's 128, a class constant of `Mistral3Small24BConfig`). Its tokenizer
  needs Mistral's tekken file, which the tests never use: the CLIP gets a stand-in tokenizer class. Keys
  `mistral3_24b.transformer.model.layers.N.self_attn.q_proj.weight`.
* `diffusers_flux2_twin()` -> diffusers' `Flux2Transformer2DModel` with the same sizes (seeded weights).
"""
from __future__ import annotations

import torch

from tests.comfy_host import import_comfy
from tests.tiny_models import CPU, _comfy_clip, _model_patcher, seed_weights

HIDDEN, HEADS, DEPTH, DEPTH_SINGLE, CONTEXT, IN_CHANNELS = 64, 2, 2, 3, 32, 128
MLP = 3 * HIDDEN   # Flux.2's mlp_ratio 3.0


def flux2_config(hidden: int = HIDDEN, heads: int = HEADS, depth: int = DEPTH, depth_single: int = DEPTH_SINGLE,
                 context: int = CONTEXT, in_channels: int = IN_CHANNELS, guidance: bool = True) -> dict:
    """The unet_config of comfy.model_detection's Flux.2 branch, at tiny size (see the module docstring)."""
    head = hidden // heads
    if head * heads != hidden or head % 4:
        raise ValueError(f"hidden {hidden} must be heads x a head width divisible by 4")
    return {"image_model": "flux2", "axes_dim": [head // 4] * 4, "num_heads": heads, "mlp_ratio": 3.0,
            "theta": 2000, "out_channels": in_channels, "global_modulation": True, "vec_in_dim": None,
            "mlp_silu_act": True, "qkv_bias": False, "ops_bias": False, "default_ref_method": "index",
            "ref_index_scale": 10.0, "patch_size": 1, "in_channels": in_channels, "hidden_size": hidden,
            "context_in_dim": context, "depth": depth, "depth_single_blocks": depth_single,
            "guidance_embed": guidance}


def comfy_flux2(seed: int = 0, **sizes):
    """Tiny Flux.2 [dev] ModelPatcher (`comfy.supported_models.Flux2`, `model_base.Flux2`)."""
    comfy = import_comfy()
    return _model_patcher(comfy.supported_models.Flux2, flux2_config(**sizes), None, seed)


def tiny_mistral_config(hidden: int = 32, layers: int = 2, heads: int = 2, kv_heads: int = 1,
                        vocab: int = 256) -> dict:
    """Overrides for ComfyUI's `Mistral3Small24BConfig` (dataclass fields only; head_dim 128 is a class constant)."""
    return {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab}


class _NoTokenizer:
    """Stand-in for Flux2Tokenizer (it needs Mistral's tekken data): LoRA tests never tokenize."""

    def __init__(self, embedding_directory=None, tokenizer_data=None):
        pass

    def state_dict(self):
        return {}


def comfy_clip_flux2(layers: int = 2, hidden: int = 32, seed: int = 0):
    """Tiny Flux.2 `comfy.sd.CLIP` (ComfyUI's Flux2TEModel: `mistral3_24b` = te1)."""
    import_comfy()
    from comfy.text_encoders import flux

    return _comfy_clip(flux.flux2_te(), _NoTokenizer, {"mistral3_24b": tiny_mistral_config(hidden, layers)}, seed)


def diffusers_flux2_twin(hidden: int = HIDDEN, heads: int = HEADS, depth: int = DEPTH,
                         depth_single: int = DEPTH_SINGLE, context: int = CONTEXT, seed: int = 0):
    """diffusers' Flux2Transformer2DModel with the sizes of `comfy_flux2()` (seeded weights)."""
    from diffusers import Flux2Transformer2DModel

    head = hidden // heads
    model = Flux2Transformer2DModel(patch_size=1, in_channels=IN_CHANNELS, out_channels=IN_CHANNELS,
                                    num_layers=depth, num_single_layers=depth_single, attention_head_dim=head,
                                    num_attention_heads=heads, joint_attention_dim=context,
                                    axes_dims_rope=(head // 4,) * 4, mlp_ratio=3.0)
    return seed_weights(model.to(CPU, torch.float32), seed).eval()
