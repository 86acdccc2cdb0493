"""Reasons for LoRA module names that a KeyMap did not resolve.

Each rule reads the name (dotted or kohya-underscored), compares what it addresses with the model the
KeyMap was built for, and says what the LoRA was probably made for. Rules are tried in order.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Optional

from .layouts import ARCHS

if TYPE_CHECKING:
    from .keymap import KeyMap

# Text-encoder prefixes a writer uses -> the component they address ("t5" for SD3/Flux T5).
TE_PREFIXES = (
    ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te3_", "t5"), ("lora_te_", "te1"),
    ("text_encoder_2.", "te2"), ("text_encoder_3.", "t5"), ("text_encoder.", "te1"),
    ("text_encoders.clip_g.", "clip_g"), ("text_encoders.clip_l.", "clip_l"), ("text_encoders.clip_h.", "clip_h"),
    ("text_encoders.t5xxl.", "t5"), ("lora_prior_te_", "te1"),
)
UNET_PREFIXES = ("lora_unet_", "lycoris_", "model.diffusion_model.", "diffusion_model.", "unet.base_model.model.",
                 "base_model.model.", "unet.", "")
UNET_WORDS = re.compile(r"^(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block|conv_in|"
                        r"conv_out|conv_norm_out|time_embed|time_embedding|label_emb|add_embedding|out)[._]")
FOREIGN = (
    (re.compile(r"double_blocks|single_blocks|single_transformer_blocks"), "Flux-style key (double/single blocks): this LoRA was made for Flux/Chroma, not an SD UNet"),
    (re.compile(r"joint_blocks|context_block|x_block"), "SD3 MMDiT key (joint_blocks): this LoRA was made for SD3/SD3.5"),
    (re.compile(r"^(lora_transformer_|transformer\.)"), "DiT transformer key (`transformer.` / `lora_transformer_`): this LoRA was made for a DiT model (SD3, Flux, ...), not an SD UNet"),
    (re.compile(r"^lora_prior_unet_"), "Stable Cascade prior key: this LoRA was made for Stable Cascade"),
)


def _num(pattern: str, text: str) -> Optional[int]:
    m = re.search(pattern, text)
    return int(m.group(1)) if m else None


def _te_component(name: str) -> tuple[Optional[str], str]:
    for prefix, component in TE_PREFIXES:
        if name.startswith(prefix):
            comfy_to_component = {"clip_l": "te1", "clip_h": "te1", "clip_g": "te2"}
            return comfy_to_component.get(component, component), name[len(prefix):]
    return None, name


def _explain_te(km: "KeyMap", name: str, component: str, rest: str) -> str:
    if component == "t5":
        return f"{name!r}: T5 text-encoder key: this LoRA was made for SD3/Flux; this model has no T5 encoder"
    te_components = [c for c in km.components if c != "unet"]
    if not te_components:
        return (f"{name!r}: text-encoder key, but no text encoder is in this key map (model-only load): "
                "connect the CLIP to apply this part of the LoRA")
    if component not in te_components:
        if component == "te2":
            return (f"{name!r}: lora_te2_/text_encoder_2 key on a model with one text encoder: this LoRA was made "
                    "for SDXL (CLIP-L + OpenCLIP-G); its second-encoder part cannot apply here")
        return f"{name!r}: key for {component}, but this model has only {', '.join(te_components)}"
    spec = km.te_specs.get(component)
    family = spec.family if spec else "CLIP"
    layers = km.te_layers.get(component, 0)
    layer = _num(r"layers[._](\d+)[._]", rest)
    if layer is not None and layer >= layers:
        return (f"{name!r}: text-encoder key for layer {layer}, but {component} ({family}) has {layers} layers "
                f"(0-{layers - 1}): this LoRA was made for a deeper encoder (e.g. OpenCLIP-G of SDXL, 32 layers)")
    return (f"{name!r}: names no module of {component} ({family}); known modules are HF CLIP names such as "
            "text_model.encoder.layers.N.self_attn.q_proj")


def _explain_unet(km: "KeyMap", name: str, rest: str) -> str:
    spec = km.unet
    arch = km.arch.name if km.arch else "this"
    if spec is None:
        return f"{name!r}: UNet key, but no UNet is in this key map (CLIP-only): load it with the model"
    down = _num(r"(?:down|up)_blocks[._](\d+)", rest)
    if down is not None and down >= spec.levels:
        word = "down_blocks" if "down_blocks" in rest else "up_blocks"
        return (f"{name!r}: UNet key for {word}.{down}, but this model has {spec.levels} levels "
                f"({word}.0-{spec.levels - 1}): this LoRA was made for a UNet with at least {down + 1} levels "
                "(SD1.x/SD2.x have 4, SDXL 3)")
    for word, count in (("input_blocks", spec.num_input_blocks), ("output_blocks", spec.num_output_blocks)):
        idx = _num(word + r"[._](\d+)", rest)
        if idx is not None and idx >= count:
            return (f"{name!r}: UNet key for {word}.{idx}, but this model has {word}.0-{count - 1}: "
                    f"this LoRA was made for a bigger UNet (SD1.x/SD2.x have {word}.0-11, SDXL 0-8)")
    attn = re.search(r"(down|up)_blocks[._](\d+)[._]attentions[._](\d+)", rest)
    if attn and not _diffusers_level_has_attention(spec, attn.group(1), int(attn.group(2))):
        where = f"{attn.group(1)}_blocks.{attn.group(2)}"
        return (f"{name!r}: UNet key for {where}.attentions.{attn.group(3)}, but this model has no attention in "
                f"{where} (SDXL has none at its 320-channel level): this LoRA was made for SD1.x/SD2.x")
    ldm_attn = re.search(r"(input|output)_blocks[._](\d+)[._]1[._](transformer_blocks|proj_in|proj_out|norm)", rest)
    if ldm_attn:
        depths = spec.input_block_depths() if ldm_attn.group(1) == "input" else spec.output_block_depths()
        if depths[int(ldm_attn.group(2))] == 0:
            where = f"{ldm_attn.group(1)}_blocks.{ldm_attn.group(2)}"
            return (f"{name!r}: attention key for {where}, but {where} has no attention in this {arch} model: "
                    "this LoRA was made for a different architecture")
    t = _num(r"transformer_blocks[._](\d+)", rest)
    deepest = max([*spec.transformer_depth, spec.transformer_depth_middle, *spec.transformer_depth_output, 0])
    if t is not None and t >= deepest:
        return (f"{name!r}: key for transformer_blocks.{t}, but no attention in this {arch} model has more than "
                f"{deepest} transformer blocks: this LoRA was made for a deeper UNet (SDXL has 10)")
    return (f"{name!r}: UNet-style key that names no module of this {arch} UNet; check the LoRA's base "
            "model (or the module is not a weight, e.g. a bias-only or buffer key)")


def _diffusers_level_has_attention(spec, side: str, index: int) -> bool:
    if side == "down":
        start = sum(spec.num_res_blocks[:index])
        return any(spec.transformer_depth[start:start + spec.num_res_blocks[index]])
    level = spec.levels - 1 - index
    out = spec.output_block_depths()
    start = sum(n + 1 for n in list(reversed(spec.num_res_blocks))[:index])
    return any(out[start:start + spec.num_res_blocks[level] + 1])


def explain(km: "KeyMap", name: str) -> str:
    target = km.resolve(name)
    if target is not None:
        return f"{name!r} resolves to {target.component}:{target.path} ({target.block})"
    for rx, reason in FOREIGN:
        if rx.search(name):
            return f"{name!r}: {reason}"
    component, rest = _te_component(name)
    if component is not None:
        return _explain_te(km, name, component, rest)
    for prefix in UNET_PREFIXES:
        if name.startswith(prefix) and UNET_WORDS.match(name[len(prefix):]):
            return _explain_unet(km, name, name[len(prefix):])
    known = ", ".join(ARCHS)
    return (f"{name!r}: unknown prefix: not a naming this library knows for {known} (kohya lora_unet_/lora_te*_, "
            "diffusers unet./text_encoder., PEFT base_model.model., ComfyUI diffusion_model./text_encoders.)")
