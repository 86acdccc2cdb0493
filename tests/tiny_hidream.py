"""Tiny but real HiDream I1 models and CLIPs for tests, built with ComfyUI's own classes (CPU, fp32, seeded).

* `comfy_hidream()` -> a `comfy.model_patcher.ModelPatcher` over `comfy.supported_models.HiDream(unet_config)` /
  `model_base.HiDream` (comfy/ldm/hidream/model.py). ComfyUI's detector (model_detection.py, the
  `caption_projection.0.linear.weight` branch) hard-codes every size; the model class takes them as arguments:
  here 2 heads x 32 = 64 wide (rotary axes 16+8+8 = the head width, like the real 64+32+32 of 128), 2 double and
  2 single stream blocks, 4 routed experts (2 active) and a shared expert in every `ff_i` (SwiGLU `w1`/`w2`/`w3`),
  caption channels 32 / 32 (the tiny encoders' widths; one `caption_projection` per block plus one), pooled text
  64; `llama_layers` (which Llama layer's output each block reads; the real model lists 48) has one entry per
  block, cycling over the tiny Llama's 2 layers, so the forward runs. Keys
  `diffusion_model.double_stream_blocks.N.block.attn1.to_q.weight`, `...ff_i.experts.0.w1.weight`.
* `comfy_clip_hidream(clip_l=True, clip_g=True, t5=True, llama=True)` -> `comfy.sd.CLIP` over ComfyUI's own
  `HiDreamTEModel` (text_encoders/hidream.py `hidream_clip`): `clip_l`, `clip_g`, `t5xxl` and `llama`
  (Llama-3.1-8B, hunyuan_video.LLAMAModel) with shrunken configs (Llama: hidden 32, 2 layers, 2 heads / 1 KV
  head, small vocabulary; head width 128 is a class constant). It never tokenizes: a stand-in tokenizer.
* `comfy_clip_hidream_tokenizing()` -> the same CLIP with ComfyUI's own `HiDreamTokenizer` (CLIP-L / CLIP-G, T5 and
  Llama-3 tokenizer files ComfyUI ships) and the Llama's full vocabulary, for the train node's caption path.
"""
from __future__ import annotations

from tests.comfy_host import import_comfy
from tests.tiny_flux2 import _NoTokenizer
from tests.tiny_models import _comfy_clip, _model_patcher, tiny_clip_config, tiny_t5_config

HIDDEN, HEADS, DEPTH, DEPTH_SINGLE, CAPTION, POOLED, EXPERTS = 64, 2, 2, 2, 32, 64, 4
LLAMA_LAYERS = 2   # the tiny Llama's layers: ComfyUI's HiDream TE stacks every layer's output (layer="all")


def hidream_config(hidden: int = HIDDEN, heads: int = HEADS, depth: int = DEPTH, depth_single: int = DEPTH_SINGLE,
                   experts: int = EXPERTS) -> dict:
    """HiDream's unet_config (model_detection.py), at tiny size (see the module docstring)."""
    head = hidden // heads
    return {"image_model": "hidream", "attention_head_dim": head, "axes_dims_rope": [head // 2, head // 4, head // 4],
            "caption_channels": [CAPTION, CAPTION], "max_resolution": [16, 16], "in_channels": 16,
            "llama_layers": [i % LLAMA_LAYERS for i in range(depth + depth_single)], "num_attention_heads": heads,
            "num_routed_experts": experts, "num_activated_experts": 2, "num_layers": depth,
            "num_single_layers": depth_single, "out_channels": 16, "patch_size": 2, "text_emb_dim": POOLED}


def comfy_hidream(seed: int = 0, **sizes):
    """Tiny HiDream I1 ModelPatcher (`comfy.supported_models.HiDream`, `model_base.HiDream`)."""
    comfy = import_comfy()
    return _model_patcher(comfy.supported_models.HiDream, hidream_config(**sizes), None, seed)


def tiny_llama_config(hidden: int = 32, layers: int = LLAMA_LAYERS, heads: int = 2, kv_heads: int = 1, vocab: int = 256) -> dict:
    return {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab}


def comfy_clip_hidream(clip_l: bool = True, clip_g: bool = True, t5: bool = True, llama: bool = True,
                       layers: int = 3, hidden: int = 32, seed: int = 0):
    """Tiny HiDream `comfy.sd.CLIP` (`clip_l` = te1, `clip_g` = te2, `t5xxl` = te3, `llama` = te4)."""
    import_comfy()
    from comfy.text_encoders import hidream

    overrides = {"clip_l": tiny_clip_config(hidden, layers), "clip_g": tiny_clip_config(hidden, layers, act="gelu"),
                 "t5xxl": tiny_t5_config(hidden, 2), "llama": tiny_llama_config(hidden)}
    return _comfy_clip(hidream.hidream_clip(clip_l, clip_g, t5, llama), _NoTokenizer, overrides, seed)


def comfy_clip_hidream_tokenizing(layers: int = 3, hidden: int = 32, seed: int = 0):
    """`comfy_clip_hidream()` that tokenizes captions (ComfyUI's HiDreamTokenizer; the Llama keeps Llama-3's
    vocabulary, 128320 ids, for the real tokenizer's ids)."""
    import_comfy()
    from comfy.text_encoders import hidream

    llama = {k: v for k, v in tiny_llama_config(hidden).items() if k != "vocab_size"}
    overrides = {"clip_l": tiny_clip_config(hidden, layers), "clip_g": tiny_clip_config(hidden, layers, act="gelu"),
                 "t5xxl": tiny_t5_config(hidden, 2), "llama": llama}
    return _comfy_clip(hidream.hidream_clip(True, True, True, True), hidream.HiDreamTokenizer, overrides, seed)


def diffusers_hidream_twin(seed: int = 0, **sizes):
    """diffusers' HiDreamImageTransformer2DModel with the sizes of `comfy_hidream()` (seeded weights)."""
    import torch
    from diffusers import HiDreamImageTransformer2DModel

    from tests.tiny_models import CPU, seed_weights

    cfg = hidream_config(**sizes)
    model = HiDreamImageTransformer2DModel(
        patch_size=cfg["patch_size"], in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
        num_layers=cfg["num_layers"], num_single_layers=cfg["num_single_layers"],
        attention_head_dim=cfg["attention_head_dim"], num_attention_heads=cfg["num_attention_heads"],
        caption_channels=cfg["caption_channels"], text_emb_dim=cfg["text_emb_dim"],
        num_routed_experts=cfg["num_routed_experts"], num_activated_experts=cfg["num_activated_experts"],
        axes_dims_rope=tuple(cfg["axes_dims_rope"]), max_resolution=tuple(cfg["max_resolution"]),
        llama_layers=cfg["llama_layers"])
    return seed_weights(model.to(CPU, torch.float32), seed).eval()
