"""Reasons for LoRA module names that a KeyMap did not resolve.

Each rule reads the name (dotted or kohya-underscored), compares what it addresses with the model the KeyMap was
built for, and says what the LoRA was probably made for. In order: another family's marker (a Flux key on an SD
model), a text-encoder prefix (an encoder this model does not have, a layer past its depth), the host family's
own denoiser rules (a block past the model's depth, ...), an unknown prefix.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Optional

from . import registry
from .text_encoders import ENCODERS

if TYPE_CHECKING:
    from .keymap import KeyMap

# Text-encoder prefixes writers use -> the encoder they address when the host does not name them itself.
TE_PREFIXES = (
    ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te3_", "te3"), ("lora_te_", "te1"),
    ("text_encoder_2.", "te2"), ("text_encoder_3.", "te3"), ("text_encoder.", "te1"),
    ("text_encoders.clip_g.", "clip_g"), ("text_encoders.clip_l.", "clip_l"), ("text_encoders.clip_h.", "clip_h"),
    ("text_encoders.t5xxl.", "t5"), ("lora_prior_te_", "te1"),
)
DENOISER_PREFIXES = ("lora_unet_", "lycoris_", "model.diffusion_model.", "diffusion_model.", "unet.base_model.model.",
                     "transformer.base_model.model.", "base_model.model.", "unet.", "transformer.", "lora_transformer_",
                     "")
# Models no family describes yet: their key marks, so a user still learns what the file is for (on any host) ...
FOREIGN = (
    (re.compile(r"^lora_prior_unet_"), "Stable Cascade prior key: this LoRA was made for Stable Cascade"),
)
# ... and marks that tell only on a UNet host (a DiT host has these prefixes itself).
FOREIGN_ON_UNET = (
    (re.compile(r"^(lora_transformer_|transformer\.)"), "DiT transformer key (`transformer.` / `lora_transformer_`): "
     "this LoRA was made for a DiT model (SD3, Flux, Wan, ...), not an SD UNet"),
)
ENCODER_KEY = re.compile(r"^text_encoders\.([a-z0-9_]+?)\.transformer\.")


def _num(pattern: str, text: str) -> Optional[int]:
    m = re.search(pattern, text)
    return int(m.group(1)) if m else None


def _host_title(km: "KeyMap") -> str:
    if km.arch is not None:
        return km.arch.title
    return km.family.title if km.family is not None else "this model"


def _foreign_family(km: "KeyMap", name: str) -> Optional[str]:
    shared = km.family.shares_names_with if km.family is not None else ()   # (Flux.2 on Flux.1's block names)
    for family in registry.families():
        if family is km.family or family.name in shared or (
                km.family is not None and family.name in km.family.confusable_with):
            continue   # (a family whose names this host shares marks nothing here)
        for pattern, words in family.markers:
            if re.search(pattern, name):
                return (f"{name!r}: {words} key: this LoRA was made for {family.title}, not {_host_title(km)}. "
                        f"Load it on a {family.title} model")
    unet = km.family is None or km.family.denoiser == "unet"
    for rx, reason in FOREIGN + (FOREIGN_ON_UNET if unet else ()):
        if rx.search(name):
            return f"{name!r}: {reason}"
    return None


def _te_component(km: "KeyMap", name: str) -> tuple[Optional[str], str]:
    """(component a text-encoder name addresses, the rest of the name), from the host's own prefixes first."""
    own = []
    for component, spec in km.component_specs.items():
        if not spec.is_text_encoder:
            continue
        own += [(p, component) for p in spec.kohya_prefixes]
        if spec.diffusers_prefix:
            own.append((spec.diffusers_prefix, component))
        if spec.encoder is not None:
            own.append((f"text_encoders.{spec.encoder.comfy_name}.", component))
    for prefix, component in sorted(own, key=lambda item: -len(item[0])) + list(TE_PREFIXES):
        if name.startswith(prefix):
            comfy_to_component = {"clip_l": "te1", "clip_h": "te1", "clip_g": "te2"}
            return comfy_to_component.get(component, component), name[len(prefix):]
    m = ENCODER_KEY.match(name)   # ComfyUI's generic name of any encoder LoRA Core knows (qwen25_7b, ...)
    if m and m.group(1) in ENCODERS:
        return "encoder:" + m.group(1), name[m.end():]
    return None, name


def _explain_te(km: "KeyMap", name: str, component: str, rest: str) -> str:
    te_components = [c for c in km.components if c.startswith("te")]
    encoders = {c: s.encoder for c, s in km.component_specs.items() if s.is_text_encoder and s.encoder is not None}
    if component.startswith("encoder:"):
        wanted = ENCODERS[component[len("encoder:"):]]
        held = ", ".join(f"{e.family} (`{e.comfy_name}`)" for e in encoders.values())
        return (f"{name!r}: {wanted.family} text-encoder key (`{wanted.comfy_name}`), but no {wanted.family} "
                f"encoder is connected{f' (the text encoders here: {held})' if held else ''}: this part applies "
                f"only with the CLIP of the model the LoRA was made for")
    t5_name = bool(re.search(r"(^|[._])(encoder[._]block|SelfAttention|DenseReluDense)", rest))
    if component == "t5" or (t5_name and not any(e.kind == "t5" for e in encoders.values())):
        return (f"{name!r}: T5 text-encoder key: this LoRA was made for a model with a T5 encoder (SD3, Flux, "
                f"Chroma); this model has no T5 encoder")
    if not te_components:
        return (f"{name!r}: text-encoder key, but no text encoder is in this key map (model-only load): "
                "connect the CLIP to apply this part of the LoRA")
    if component not in te_components:
        if component == "te2" and len(te_components) == 1:
            return (f"{name!r}: lora_te2_/text_encoder_2 key on a model with one text encoder: this LoRA was made "
                    "for SDXL (CLIP-L + OpenCLIP-G) or Flux (CLIP-L + T5); its second-encoder part cannot apply here")
        return f"{name!r}: key for {component}, but this model has only {', '.join(te_components)}"
    spec = km.te_specs.get(component)
    family = spec.family if spec else "CLIP"
    layers = km.te_layers.get(component, 0)
    layer = _num(r"(?:layers|block)[._](\d+)[._]", rest)
    if layer is not None and layer >= layers:
        return (f"{name!r}: text-encoder key for layer {layer}, but {component} ({family}) has {layers} layers "
                f"(0-{layers - 1}): this LoRA was made for a deeper encoder (e.g. OpenCLIP-G of SDXL, 32 layers)")
    example = {"t5": "encoder.block.N.layer.0.SelfAttention.q", "llm": "model.layers.N.self_attn.q_proj"}.get(
        spec.kind if spec is not None else "", "text_model.encoder.layers.N.self_attn.q_proj")
    return f"{name!r}: names no module of {component} ({family}); known modules are HF names such as {example}"


def explain(km: "KeyMap", name: str) -> str:
    target = km.resolve(name)
    if target is not None:
        return f"{name!r} resolves to {target.component}:{target.path} ({target.block})"
    foreign = _foreign_family(km, name)
    if foreign is not None:
        return foreign
    component, rest = _te_component(km, name)
    if component is not None:
        return _explain_te(km, name, component, rest)
    family = km.family
    if family is not None:
        words = tuple(family.denoiser_words())
        for prefix in DENOISER_PREFIXES:
            body = name[len(prefix):] if name.startswith(prefix) else None
            if body and words and re.match(r"(" + "|".join(map(re.escape, words)) + r")([._]|$)", body):
                reason = family.explain(km, name, body)
                if reason:
                    return reason
                break
    known = ", ".join(f.title for f in registry.families())
    return (f"{name!r}: unknown prefix: not a naming this library knows for {known} (kohya lora_unet_/lora_te*_, "
            "diffusers unet./transformer./text_encoder., PEFT base_model.model., ComfyUI diffusion_model./"
            "text_encoders.)")
