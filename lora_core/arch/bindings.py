"""Host bindings: canonical targets <-> a host's own parameter keys, plus architecture detection.

A host is described only by its parameter names (an iterable of keys) or by its state dict
(a mapping key -> tensor, or key -> shape); shapes, when present, sharpen detection (context dim,
linear proj_in) but the mapping itself needs names only. Supported hosts:

* ComfyUI model (`ModelPatcher.model.state_dict()`): `diffusion_model.<ldm>.weight`
  (also accepts `model.diffusion_model.` checkpoint keys and bare LDM keys);
* ComfyUI CLIP (`CLIP.cond_stage_model.state_dict()`): `clip_l.transformer.<hf>.weight`,
  `clip_g.…`, `clip_h.…`. SD1: clip_l = te1. SD2: clip_h = te1. SDXL: clip_l = te1, clip_g = te2;
* diffusers `UNet2DConditionModel`: `<diffusers path>.weight`;
* transformers `CLIPTextModel` / `CLIPTextModelWithProjection`: `text_model.<…>.weight`
  (transformers 5: `<…>.weight` without `text_model.`), bound to a component you name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Union

from ..errors import LoraMatchError
from .layouts import ARCHS, SD1, SD2, SDXL, TEXT_ENCODER_FAMILIES, ArchSpec, TextEncoderSpec, UNetSpec
from .text_encoders import canonical_te_path, te_kind, te_layer, te_modules
from .unet import spec_from_diffusers_keys, spec_from_ldm_keys, unet_modules

HostParams = Union[Mapping[str, Any], Iterable[str]]

COMFY_UNET_PREFIXES = ("diffusion_model.", "model.diffusion_model.", "")
COMFY_CLIP_RE = re.compile(r"^(clip_[lgh])\.transformer\.(.+)\.weight$")


@dataclass
class HostBinding:
    """Canonical targets of one host and where each lives in the host's state dict.

    `targets`: (component, canonical path) -> host weight key. `params`: (component, path, param)
    -> host key for non-weight parameters (biases), so generic `diffusion_model.X.bias` names resolve.
    `diffusers`: LDM path -> diffusers spellings (UNet only). `te_specs`: component -> encoder family.
    `te_layers`: component -> layers present. `unbound`: host `.weight` keys no target covers.
    """

    host: str
    arch: Optional[ArchSpec]
    unet: Optional[UNetSpec] = None
    targets: dict = field(default_factory=dict)
    kinds: dict = field(default_factory=dict)
    blocks: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    diffusers: dict = field(default_factory=dict)
    te_specs: dict = field(default_factory=dict)
    te_layers: dict = field(default_factory=dict)
    unbound: list = field(default_factory=list)

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(sorted({c for c, _ in self.targets}))

    def host_key(self, component: str, path: str) -> Optional[str]:
        return self.targets.get((component, path))

    def target_of(self, host_key: str) -> Optional[tuple[str, str]]:
        """(component, canonical path) of a host weight key, or None."""
        if not hasattr(self, "_reverse"):
            self._reverse = {v: k for k, v in self.targets.items()}
        return self._reverse.get(host_key)


def _keys_and_shapes(host_params: HostParams) -> tuple[list[str], Optional[dict]]:
    """Accept a list of keys, a state dict (key -> tensor) or a key -> shape mapping."""
    if isinstance(host_params, Mapping):
        shapes = {}
        for k, v in host_params.items():
            shape = getattr(v, "shape", v)
            if isinstance(shape, (tuple, list)) or hasattr(shape, "__len__"):
                shapes[k] = tuple(shape)
        return list(host_params.keys()), (shapes or None)
    return list(host_params), None


def _strip(keys: Iterable[str], prefix: str, shapes: Optional[dict]) -> tuple[dict, Optional[dict]]:
    """{unprefixed key: host key} and shapes under the unprefixed names."""
    mapping = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
    sub_shapes = {s: shapes[h] for s, h in mapping.items() if h in shapes} if shapes else None
    return mapping, sub_shapes


def _comfy_unet_prefix(keys: list[str]) -> Optional[str]:
    keyset = set(keys)
    for prefix in COMFY_UNET_PREFIXES:
        if f"{prefix}input_blocks.0.0.weight" in keyset:
            return prefix
    return None


def _bind_unet(binding: HostBinding, spec: UNetSpec, host_of) -> HostBinding:
    """Fill a binding's UNet targets; `host_of(module)` gives the host key prefix of a module or None."""
    for m in unet_modules(spec):
        host_prefix = host_of(m)
        if host_prefix is None:
            continue
        key = ("unet", m.ldm)
        binding.targets[key] = host_prefix + ".weight"
        binding.kinds[key] = m.kind
        binding.blocks[key] = m.block
        binding.diffusers[m.ldm] = m.diffusers
    return binding


def bind_comfy_model(host_params: HostParams, unet_config: Optional[dict] = None,
                     arch: Optional[ArchSpec] = None) -> HostBinding:
    """Bind a ComfyUI model state dict (`diffusion_model.<ldm>.weight`).

    `unet_config` (ComfyUI's `model.model_config.unet_config`) is optional: without it the structure
    is read from the keys. Raises LoraMatchError when the keys hold no LDM UNet.
    """
    keys, shapes = _keys_and_shapes(host_params)
    prefix = _comfy_unet_prefix(keys)
    if prefix is None:
        raise LoraMatchError("ComfyUI model state dict has no `diffusion_model.input_blocks.0.0.weight`: "
                             "not an SD1/SD2/SDXL UNet (pass `model.model.state_dict()` of a ModelPatcher)")
    ldm, ldm_shapes = _strip(keys, prefix, shapes)
    spec = UNetSpec.from_comfy_config(unet_config) if unet_config else spec_from_ldm_keys(ldm, ldm_shapes)
    binding = HostBinding("comfy_model", arch or detect_arch(host_params), spec)

    def host_of(m):
        return ldm[m.ldm + ".weight"][:-len(".weight")] if m.ldm + ".weight" in ldm else None

    _bind_unet(binding, spec, host_of)
    for name, host in ldm.items():
        module, _, param = name.rpartition(".")
        if param != "weight" and ("unet", module) in binding.targets:
            binding.params[("unet", module, param)] = host
    _note_unbound(binding, [h for n, h in ldm.items() if n.endswith(".weight")])
    return binding


def bind_diffusers_unet(host_params: HostParams, arch: Optional[ArchSpec] = None,
                        key_prefix: str = "") -> HostBinding:
    """Bind a diffusers `UNet2DConditionModel` state dict (`down_blocks.0.resnets.0.conv1.weight`).

    `key_prefix` namespaces the host keys (e.g. "unet.") when several modules share one tensor mapping."""
    keys, shapes = _keys_and_shapes(host_params)
    spec = spec_from_diffusers_keys(keys, shapes)
    if spec is None:
        raise LoraMatchError("diffusers UNet state dict has no `conv_in.weight`: not a UNet2DConditionModel")
    keyset = set(keys)
    binding = HostBinding("diffusers_unet", arch or detect_arch(host_params), spec)

    def host_of(m):
        found = next((d for d in m.diffusers if d + ".weight" in keyset), None)
        return key_prefix + found if found is not None else None

    _bind_unet(binding, spec, host_of)
    _note_unbound(binding, [key_prefix + k for k in keys if k.endswith(".weight")])
    return binding


def _te_components(comfy_names: set[str]) -> dict[str, str]:
    """ComfyUI CLIP attribute -> component. Two encoders (SDXL): clip_l = te1, clip_g = te2."""
    if {"clip_l", "clip_g"} <= comfy_names:
        return {"clip_l": "te1", "clip_g": "te2"}
    return {name: "te1" for name in comfy_names}


def _add_te_target(binding: HostBinding, component: str, path: str, host_key: str) -> None:
    key = (component, path)
    binding.targets[key] = host_key
    binding.kinds[key] = te_kind(path)
    binding.blocks[key] = "TE1" if component == "te1" else "TE2"


def bind_comfy_clip(host_params: HostParams, arch: Optional[ArchSpec] = None) -> HostBinding:
    """Bind a ComfyUI CLIP `cond_stage_model` state dict (`clip_l.transformer.<hf>.weight`, ...)."""
    keys, _ = _keys_and_shapes(host_params)
    found = {m.group(1): None for k in keys for m in [COMFY_CLIP_RE.match(k)] if m}
    if not found:
        raise LoraMatchError("ComfyUI CLIP state dict has no `clip_l/clip_g/clip_h.transformer.*.weight` key: "
                             "pass `clip.cond_stage_model.state_dict()` of an SD1/SD2/SDXL CLIP")
    components = _te_components(set(found))
    binding = HostBinding("comfy_clip", arch or detect_arch(host_params))
    bound = set()
    for k in keys:
        m = COMFY_CLIP_RE.match(k)
        if not m:
            continue
        component = components[m.group(1)]
        _add_te_target(binding, component, canonical_te_path(m.group(2)), k)
        binding.te_specs[component] = TEXT_ENCODER_FAMILIES[m.group(1)]
        bound.add(k)
    _count_te_layers(binding)
    _note_unbound(binding, [k for k in keys if k.endswith(".weight") and k not in bound])
    return binding


def guess_te_family(host_params: HostParams) -> Optional[TextEncoderSpec]:
    """CLIP-L / OpenCLIP-H / OpenCLIP-G from hidden size (shapes) or layer count; None if unclear."""
    keys, shapes = _keys_and_shapes(host_params)
    if shapes:
        for k, shape in shapes.items():
            if k.endswith("embeddings.token_embedding.weight"):
                hits = [s for s in TEXT_ENCODER_FAMILIES.values() if s.hidden_size == shape[-1]]
                if hits:
                    return hits[0]
    layers = {te_layer(canonical_te_path(k)) for k in keys} - {None}
    hits = [s for s in TEXT_ENCODER_FAMILIES.values() if len(layers) in (s.num_layers, s.lora_layers)]
    return hits[0] if len(hits) == 1 else None


def bind_transformers_clip(host_params: HostParams, component: str = "te1",
                           family: Optional[TextEncoderSpec] = None, key_prefix: str = "") -> HostBinding:
    """Bind a transformers `CLIPTextModel` / `CLIPTextModelWithProjection` state dict as `component`.

    `key_prefix` namespaces the host keys (e.g. "text_encoder_2.") so two encoders can share one mapping.

    `family` (CLIP_L / OPENCLIP_H / OPENCLIP_G) names the encoder for ComfyUI-style aliases
    (`text_encoders.clip_l.transformer.…`); it is guessed from shapes / layer count when omitted.
    """
    if component not in ("te1", "te2"):
        from ..errors import LoraValueError
        raise LoraValueError(f"component must be 'te1' or 'te2', got {component!r}")
    keys, _ = _keys_and_shapes(host_params)
    binding = HostBinding("transformers_clip", None)
    bound = set()
    for k in keys:
        if not k.endswith(".weight"):
            continue
        path = canonical_te_path(k[:-len(".weight")])
        if path.startswith("text_model.") or path == "text_projection":
            _add_te_target(binding, component, path, key_prefix + k)
            bound.add(key_prefix + k)
    if not bound:
        raise LoraMatchError("transformers CLIP state dict has no `text_model.*.weight` key: not a CLIPTextModel")
    family = family or guess_te_family(host_params)
    if family is not None:
        binding.te_specs[component] = family
    _count_te_layers(binding)
    _note_unbound(binding, [key_prefix + k for k in keys if k.endswith(".weight") and key_prefix + k not in bound])
    return binding


def bind_layout(arch: ArchSpec) -> HostBinding:
    """A binding of the full-size architecture built from data alone, with ComfyUI-style host keys.

    Lets a LoRA file be inspected (blocks, kinds, aliases) with no model loaded."""
    binding = HostBinding("layout", arch, arch.unet)
    _bind_unet(binding, arch.unet, lambda m: "diffusion_model." + m.ldm)
    for component, spec in arch.text_encoders.items():
        for path, _kind in te_modules(spec):
            _add_te_target(binding, component, path, f"{spec.comfy_name}.transformer.{path}.weight")
        binding.te_specs[component] = spec
    _count_te_layers(binding)
    return binding


def _count_te_layers(binding: HostBinding) -> None:
    for component in binding.te_specs.keys() | {c for c, _ in binding.targets if c != "unet"}:
        layers = {te_layer(p) for c, p in binding.targets if c == component} - {None}
        binding.te_layers[component] = max(layers) + 1 if layers else 0


def _note_unbound(binding: HostBinding, weight_keys: Iterable[str]) -> None:
    bound = set(binding.targets.values())
    binding.unbound = sorted(k for k in weight_keys if k not in bound)


# ---------------------------------------------------------------------------------------------
# Architecture detection
# ---------------------------------------------------------------------------------------------

def _unet_spec_any(keys: list[str], shapes: Optional[dict]) -> Optional[UNetSpec]:
    prefix = _comfy_unet_prefix(keys)
    if prefix is not None:
        ldm, ldm_shapes = _strip(keys, prefix, shapes)
        return spec_from_ldm_keys(ldm, ldm_shapes)
    for prefix in ("", "unet."):
        if f"{prefix}conv_in.weight" in set(keys):
            dif, dif_shapes = _strip(keys, prefix, shapes)
            return spec_from_diffusers_keys(dif, dif_shapes)
    return None


# Detection rules, first match wins; each is (arch, test on the UNet spec). Data, not branches.
CONTEXT_DIMS = {768: SD1, 1024: SD2, 2048: SDXL}


def detect_arch(host_params: HostParams) -> Optional[ArchSpec]:
    """SD1 / SD2 / SDXL from a host's keys (+ shapes). None when it cannot tell.

    Rules: CLIP keys decide by encoder (clip_g -> SDXL, clip_h -> SD2, clip_l only -> SD1). For a
    UNet: a label_emb / add_embedding (size conditioning) means SDXL; else the cross-attention
    context width (768 SD1, 1024 SD2, 2048 SDXL); else a linear proj_in means SD2, a conv one SD1.
    Without shapes an SD1 and an SD2 UNet have identical key names: None.
    """
    keys, shapes = _keys_and_shapes(host_params)
    clip_names = {m.group(1) for k in keys for m in [COMFY_CLIP_RE.match(k)] if m}
    if "clip_g" in clip_names:
        return SDXL
    if "clip_h" in clip_names:
        return SD2
    if "clip_l" in clip_names:
        return SD1
    spec = _unet_spec_any(keys, shapes)
    if spec is None:
        return None
    if spec.adm_in_channels:
        return SDXL
    if spec.context_dim in CONTEXT_DIMS:
        return CONTEXT_DIMS[spec.context_dim]
    if spec.use_linear_in_transformer is not None:
        return SD2 if spec.use_linear_in_transformer else SD1
    return None


def detect_arch_or_raise(host_params: HostParams, what: str = "model") -> ArchSpec:
    arch = detect_arch(host_params)
    if arch is None:
        raise LoraMatchError(f"cannot tell the architecture of this {what} from its keys: known are "
                             f"{', '.join(ARCHS)}; pass a state dict with tensors (shapes) or name the "
                             "architecture explicitly")
    return arch
