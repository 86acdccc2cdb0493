"""Architectures as data: one module per family (lora_core/arch/families/), host bindings, the alias KeyMap.

Typical use (ComfyUI host, in nodes/):

    from lora_core.arch import bind_comfy_model, bind_comfy_clip, build_key_map
    model_binding = bind_comfy_model(model.model.state_dict(), model.model.model_config.unet_config)
    km = build_key_map(model_binding, bind_comfy_clip(clip.cond_stage_model.state_dict(), model_binding.arch))
    t = km.resolve("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k")
    t.host_key, t.block, t.kind   # 'diffusion_model.input_blocks.4.1....attn2.to_k.weight', 'IN04', 'attn2'
    km.resolve("transformer.transformer_blocks.0.attn.to_q").pieces   # on a Flux model: rows 0..h of the fused qkv

`ArchSpec` is one variant of a family (SD1, SD2, SDXL, Flux.1-dev, Chroma, ...): its components, block layout
(`arch.layout`), metadata strings (`arch.metadata`) and structural config.
"""
from .bindings import (
    HostBinding,
    bind_comfy_clip,
    bind_comfy_model,
    bind_diffusers,
    bind_diffusers_unet,
    bind_layout,
    bind_transformers_clip,
    detect_arch,
    detect_arch_or_raise,
    guess_te_family,
)
from .families.flux import CHROMA, FLUX_DEV, FLUX_FILL, FLUX_KONTEXT, FLUX_SCHNELL, FluxSpec
from .families.sd import (
    ELEMENT_KINDS,
    MID,
    OTHER,
    SD1,
    SD2,
    SDXL,
    UNetModule,
    UNetSpec,
    block_of_ldm_path,
    diffusers_to_ldm,
    ldm_to_diffusers,
    spec_from_diffusers_keys,
    spec_from_ldm_keys,
    unet_modules,
)
from .family import Alias, ArchSpec, BlockLayout, ComponentSpec, Family, ModuleDef, Part, Piece
from .keymap import KeyMap, Target, block_id, build_key_map, element_kind
from .registry import ARCHS, arch_of_clip, arch_of_metadata, detect_lora, families, get_arch
from .text_encoders import (CLIP_L, OPENCLIP_G, OPENCLIP_H, T5_XXL, TextEncoderSpec, canonical_te_path, te_kind,
                            te_layer, te_modules)


def layout_key_map(arch) -> KeyMap:
    """KeyMap of a full-size variant (an ArchSpec or a name) from data alone, built once per process."""
    from . import registry

    return registry.layout_key_map(get_arch(arch).name)


__all__ = [
    "ARCHS", "SD1", "SD2", "SDXL", "FLUX_DEV", "FLUX_SCHNELL", "FLUX_KONTEXT", "FLUX_FILL", "CHROMA", "CLIP_L",
    "OPENCLIP_H", "OPENCLIP_G", "T5_XXL", "ELEMENT_KINDS", "MID", "OTHER", "Alias", "ArchSpec", "BlockLayout",
    "ComponentSpec", "Family", "FluxSpec", "ModuleDef", "Part", "Piece", "TextEncoderSpec", "UNetSpec", "UNetModule",
    "HostBinding", "KeyMap", "Target", "get_arch", "families", "detect_lora", "arch_of_clip", "arch_of_metadata",
    "block_of_ldm_path", "block_id", "element_kind", "unet_modules", "ldm_to_diffusers", "diffusers_to_ldm",
    "spec_from_ldm_keys", "spec_from_diffusers_keys", "te_modules", "te_kind", "te_layer", "canonical_te_path",
    "bind_comfy_model", "bind_comfy_clip", "bind_diffusers", "bind_diffusers_unet", "bind_transformers_clip",
    "bind_layout", "detect_arch", "detect_arch_or_raise", "guess_te_family", "build_key_map", "layout_key_map",
]
