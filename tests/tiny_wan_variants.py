"""Tiny Wan models of ComfyUI's other Wan classes (comfy/ldm/wan/model.py, model_animate.py), built with ComfyUI's
own `supported_models` classes on the tiny Wan config of tests/tiny_wan.py (dim 64, 2 heads, FFN 128):

* "vace": `WAN21_Vace` -> model_base.WAN21_Vace (VaceWanModel), 2 VACE blocks (`vace_layers`, `vace_in_dim` 96
  as model_detection.py reads them);
* "camera": `WAN21_Camera` (CameraWanModel, model_type camera: with the CLIP-image branch, in_dim 32);
* "camera-2.2": `WAN22_Camera` (model_type camera_2.2, in_dim 36, no CLIP-image branch);
* "s2v": `WAN22_S2V` (WanModel_S2V; audio injected at blocks 0 and 1);
* "humo": `WAN21_HuMo` (HumoWanModel: audio cross-attention in every block, audio_proj);
* "animate": `WAN22_Animate` (AnimateWanModel, 5 blocks: ComfyUI builds num_layers // 5 face fuser blocks and
  detects Animate by the first one).

The fixed-size parts ComfyUI hard-codes (HuMo's audio_proj 51200 -> 512, Animate's motion encoder, S2V's 1024-wide
audio convs) keep these at 1-40 M parameters.
"""
from __future__ import annotations

from tests.comfy_host import import_comfy
from tests.tiny_models import _model_patcher
from tests import tiny_wan as tw

# kind -> (supported_models class, model_type, in_dim, extra unet_config, blocks)
KINDS = {
    "vace": ("WAN21_Vace", "vace", 16, {"vace_layers": 2, "vace_in_dim": 96}, 2),
    "camera": ("WAN21_Camera", "camera", 32, {}, 2),
    "camera-2.2": ("WAN22_Camera", "camera_2.2", 36, {}, 2),
    "s2v": ("WAN22_S2V", "s2v", 16, {"audio_inject_layers": [0, 1]}, 2),
    "humo": ("WAN21_HuMo", "humo", 16, {}, 2),
    "animate": ("WAN22_Animate", "animate", 36, {}, 5),
}


def wan_variant_config(kind: str) -> dict:
    _, model_type, in_dim, extra, depth = KINDS[kind]
    config = tw.wan_config("t2v", depth=depth)
    config.update(model_type=model_type, in_dim=in_dim, **extra)
    return config


def comfy_wan_variant(kind: str, seed: int = 0):
    comfy = import_comfy()
    return _model_patcher(getattr(comfy.supported_models, KINDS[kind][0]), wan_variant_config(kind), None, seed)
