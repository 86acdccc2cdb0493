"""Architectures as data (SD1.x, SD2.x, SDXL): layouts, LDM <-> diffusers naming, host bindings, KeyMap.

Typical use (ComfyUI host, in nodes/):

    from lora_core.arch import bind_comfy_model, bind_comfy_clip, build_key_map
    km = build_key_map(bind_comfy_model(model.model.state_dict(), model.model.model_config.unet_config),
                       bind_comfy_clip(clip.cond_stage_model.state_dict()))
    t = km.resolve("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k")
    t.host_key, t.block, t.kind   # 'diffusion_model.input_blocks.4.1....attn2.to_k.weight', 'IN04', 'attn2'
"""
from .bindings import (
    HostBinding,
    bind_comfy_clip,
    bind_comfy_model,
    bind_diffusers_unet,
    bind_layout,
    bind_transformers_clip,
    detect_arch,
    detect_arch_or_raise,
    guess_te_family,
)
from .keymap import KeyMap, Target, block_id, build_key_map, element_kind, layout_key_map
from .layouts import (
    ARCHS,
    CLIP_L,
    COMPONENTS,
    ELEMENT_KINDS,
    MID,
    OPENCLIP_G,
    OPENCLIP_H,
    OTHER,
    SD1,
    SD2,
    SDXL,
    TE_BLOCK,
    ArchSpec,
    TextEncoderSpec,
    UNetSpec,
    block_of_ldm_path,
    get_arch,
)
from .text_encoders import canonical_te_path, te_kind, te_layer, te_modules
from .unet import UNetModule, diffusers_to_ldm, ldm_to_diffusers, spec_from_diffusers_keys, spec_from_ldm_keys, unet_modules

__all__ = [
    "ARCHS", "SD1", "SD2", "SDXL", "CLIP_L", "OPENCLIP_H", "OPENCLIP_G", "COMPONENTS", "ELEMENT_KINDS", "MID",
    "OTHER", "TE_BLOCK", "ArchSpec", "TextEncoderSpec", "UNetSpec", "UNetModule", "HostBinding", "KeyMap", "Target",
    "get_arch", "block_of_ldm_path", "block_id", "element_kind", "unet_modules", "ldm_to_diffusers",
    "diffusers_to_ldm", "spec_from_ldm_keys", "spec_from_diffusers_keys", "te_modules", "te_kind", "te_layer",
    "canonical_te_path", "bind_comfy_model", "bind_comfy_clip", "bind_diffusers_unet", "bind_transformers_clip",
    "bind_layout", "detect_arch", "detect_arch_or_raise", "guess_te_family", "build_key_map", "layout_key_map",
]
