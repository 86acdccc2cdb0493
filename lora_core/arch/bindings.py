"""Host bindings: canonical modules <-> a host's own parameter keys, for every family.

A host is described only by its parameter names (an iterable of keys) or its state dict (a mapping key ->
tensor, or key -> shape); shapes, when present, sharpen detection (widths, fused rows). The family decides
what the keys mean (registry.detect_host); this module only pairs names. Supported hosts:

* ComfyUI model (`ModelPatcher.model.state_dict()`): `diffusion_model.<canonical>.weight` (also
  `model.diffusion_model.` checkpoint keys and bare keys), any family;
* ComfyUI CLIP (`CLIP.cond_stage_model.state_dict()`): `<encoder>.transformer.<HF path>.weight` for every
  encoder it holds (clip_l, clip_g, clip_h, t5xxl, ...), components per the family;
* a diffusers denoiser (`UNet2DConditionModel`, `FluxTransformer2DModel`, ...): its own parameter names,
  paired with canonical modules (and fused rows) by the family;
* a transformers text encoder (CLIPTextModel(WithProjection), T5EncoderModel): `text_model.<...>.weight`
  (transformers 5: without `text_model.`) or `encoder.block...`, bound to the component you name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Union

from ..errors import LoraMatchError, LoraValueError
from . import registry
from .family import ArchSpec, ComponentSpec, ModuleDef, param_key
from .text_encoders import ENCODERS, TEXT_ENCODER_FAMILIES, TextEncoderSpec, canonical_te_path, te_kind, te_layer, \
    te_modules

HostParams = Union[Mapping[str, Any], Iterable[str]]

COMFY_CLIP_RE = re.compile(r"^([a-z0-9_]+?)\.transformer\.(.+)\.weight$")
_WHOLE = None


@dataclass
class HostBinding:
    """Canonical modules of one host and where each lives in the host's state dict.

    `modules`: (component, path) -> ModuleDef; `host_pieces`: (component, path) -> ((host key, canonical row
    start, host row start, length or None), ...) (usually one whole piece); `targets`: (component, path) ->
    the primary host key (kept for callers that need only that); `params`: (component, path, param) -> host key
    for non-weight parameters (biases), so generic `diffusion_model.X.bias` names resolve. `component_specs`:
    component -> ComponentSpec; `te_specs`: component -> encoder; `te_layers`: component -> layers present;
    `unbound`: host weight keys no module covers."""

    host: str
    arch: Optional[ArchSpec]
    config: Any = None
    family: Any = None
    modules: dict = field(default_factory=dict)
    host_pieces: dict = field(default_factory=dict)
    targets: dict = field(default_factory=dict)
    kinds: dict = field(default_factory=dict)
    blocks: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    component_specs: dict = field(default_factory=dict)
    te_specs: dict = field(default_factory=dict)
    te_layers: dict = field(default_factory=dict)
    unbound: list = field(default_factory=list)

    def __post_init__(self):
        if self.family is None and self.arch is not None:
            self.family = self.arch.family

    @property
    def unet(self):
        """The UNet config of a UNet host (SD callers); None for other families."""
        return self.config if self.family is not None and self.family.denoiser == "unet" else None

    @unet.setter
    def unet(self, value):
        self.config = value

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(sorted({c for c, _ in self.modules}))

    @property
    def diffusers(self) -> dict:
        """canonical denoiser path -> the family's diffusers module name(s) for it (SD: LDM -> diffusers)."""
        if self.family is None or self.config is None:
            return {}
        names = self.family.diffusers_names(self.config)
        present = {p for c, p in self.modules if not c.startswith("te")}
        return {p: n for p, n in names.items() if p in present}

    def host_key(self, component: str, path: str) -> Optional[str]:
        return self.targets.get((component, path))

    def target_of(self, host_key: str) -> Optional[tuple[str, str]]:
        """(component, canonical path) of a host weight key, or None."""
        reverse = self.__dict__.get("_reverse")
        if reverse is None:
            reverse = self.__dict__["_reverse"] = {k: c for c, pieces in self.host_pieces.items()
                                                   for k, *_ in pieces}
        return reverse.get(host_key)

    def aliases_of(self, component: str, module: ModuleDef):
        """Writer aliases of a denoiser module (the family's)."""
        return self.family.aliases(module, self.config, self.arch) if self.family is not None else ()

    def add(self, component: str, module: ModuleDef, pieces: tuple) -> None:
        key = (component, module.path)
        self.modules[key] = module
        self.host_pieces[key] = pieces
        self.targets[key] = pieces[0][0]
        self.kinds[key] = module.kind
        self.blocks[key] = module.block


def _keys_and_shapes(host_params: HostParams) -> tuple[list[str], Optional[dict]]:
    """Accept a list of keys, a state dict (key -> tensor) or a key -> shape mapping. Shapes of quantised
    tensors are their logical shapes (lora_core.weights)."""
    from ..weights import logical_shape

    if isinstance(host_params, Mapping):
        shapes = {}
        for k, v in host_params.items():
            shape = logical_shape(v) if hasattr(v, "shape") else v
            if isinstance(shape, (tuple, list)) or hasattr(shape, "__len__"):
                shapes[k] = tuple(shape)
        return list(host_params.keys()), (shapes or None)
    return list(host_params), None


def _note_unbound(binding: HostBinding, weight_keys: Iterable[str]) -> None:
    bound = {piece[0] for pieces in binding.host_pieces.values() for piece in pieces}
    binding.unbound = sorted(k for k in weight_keys if k not in bound)


def _bind_denoiser(binding: HostBinding, component: str, host_of) -> HostBinding:
    """Fill a binding's denoiser modules; `host_of(module)` gives its host pieces or None when absent."""
    for module in binding.family.modules(binding.config, binding.arch):
        pieces = host_of(module)
        if pieces:
            binding.add(component, module, pieces)
    binding.component_specs[component] = (binding.arch.components.get(component) if binding.arch is not None
                                          else ComponentSpec(component, ""))
    return binding


def _denoiser_of(host_params: HostParams, config: Optional[dict], config_name: str, what: str):
    keys, shapes = _keys_and_shapes(host_params)
    prefix, mapping, sub_shapes = registry.strip_denoiser_prefix(keys, shapes)
    if prefix is None:
        return keys, None, {}, None, None
    family, variant, structure = registry.detect_host(list(mapping), sub_shapes, config, config_name)
    return keys, (family, variant, structure), mapping, sub_shapes, prefix


def bind_comfy_model(host_params: HostParams, unet_config: Optional[dict] = None, arch: Optional[ArchSpec] = None,
                     config_name: str = "") -> HostBinding:
    """Bind a ComfyUI model state dict (`diffusion_model.<canonical>.weight`), any known family.

    `unet_config` (ComfyUI's `model.model_config.unet_config`) and `config_name` (the model config's class name,
    e.g. "SDXL", "FluxSchnell", "Chroma") are optional: without them the structure is read from the keys and
    shapes. Raises LoraMatchError when the keys hold no denoiser LoRA Core knows."""
    keys, found, mapping, _, _ = _denoiser_of(host_params, unet_config, config_name, "model")
    if found is None:
        known = ", ".join(f.title for f in registry.families())
        what = f" of a {config_name} model" if config_name else ""
        raise LoraMatchError(f"ComfyUI model state dict{what} holds no denoiser LoRA Core knows (no "
                             "`diffusion_model.input_blocks.0.0.weight`, no Flux `double_blocks`, no model of the "
                             f"other families): LoRA Core supports {known}; pass `model.model.state_dict()` of a "
                             "ModelPatcher of one of them")
    family, variant, structure = found
    binding = HostBinding("comfy_model", arch or variant, structure, family)
    component = family.denoiser

    def host_of(module: ModuleDef):
        host = mapping.get(param_key(module.path, module.param))
        return ((host, 0, 0, _WHOLE),) if host is not None else None

    _bind_denoiser(binding, component, host_of)
    for name, host in mapping.items():
        module_path, _, param = name.rpartition(".")
        key = (component, module_path)
        if key in binding.modules and param != binding.modules[key].param:
            binding.params[(component, module_path, param)] = host
    _note_unbound(binding, [h for n, h in mapping.items() if n.endswith(".weight")])
    return binding


def bind_diffusers(host_params: HostParams, arch: Optional[ArchSpec] = None, key_prefix: str = "") -> HostBinding:
    """Bind a diffusers denoiser state dict (UNet2DConditionModel, FluxTransformer2DModel, ...).

    `key_prefix` namespaces the host keys (e.g. "transformer.") when several modules share one tensor mapping."""
    keys, shapes = _keys_and_shapes(host_params)
    found = registry.detect_diffusers(keys, shapes)
    if found is None:
        raise LoraMatchError("diffusers state dict is not a denoiser LoRA Core knows (no `conv_in.weight` of a "
                             "UNet2DConditionModel, no `x_embedder` + `single_transformer_blocks` of a "
                             "FluxTransformer2DModel)")
    family, variant, structure = found
    binding = HostBinding("diffusers_" + family.denoiser, arch or variant, structure, family)
    keyset = set(keys)
    by_canonical: dict = {}
    for dif_key, (canonical, pieces, _param) in family.diffusers_host_pieces(structure, binding.arch).items():
        if dif_key not in keyset:
            continue
        entries = by_canonical.setdefault(canonical, [])
        if pieces is None:
            if not entries:   # a module with two diffusers spellings: the first one present wins
                entries.append((key_prefix + dif_key, 0, 0, _WHOLE))
        else:
            entries.extend((key_prefix + dif_key, c, h, n) for c, h, n in pieces)

    def host_of(module: ModuleDef):
        entries = by_canonical.get(module.path)
        return tuple(entries) if entries else None

    _bind_denoiser(binding, family.denoiser, host_of)
    _note_unbound(binding, [key_prefix + k for k in keys if k.endswith(".weight")])
    return binding


def bind_diffusers_unet(host_params: HostParams, arch: Optional[ArchSpec] = None, key_prefix: str = "") -> HostBinding:
    """Bind a diffusers `UNet2DConditionModel` state dict (`down_blocks.0.resnets.0.conv1.weight`)."""
    keys, _ = _keys_and_shapes(host_params)
    if "conv_in.weight" not in set(keys):
        raise LoraMatchError("diffusers UNet state dict has no `conv_in.weight`: not a UNet2DConditionModel")
    return bind_diffusers(host_params, arch, key_prefix)


# ------------------------------------------------------------------------------------------- text encoders

def _add_te(binding: HostBinding, component: str, path: str, host_key: str) -> None:
    block = component.upper()
    spec = binding.component_specs.get(component)
    if spec is not None and spec.block:
        block = spec.block
    binding.add(component, ModuleDef(path, block, te_kind(path)), ((host_key, 0, 0, _WHOLE),))


def _te_component_spec(arch: Optional[ArchSpec], component: str, encoder: TextEncoderSpec) -> ComponentSpec:
    if arch is not None and component in arch.components and arch.components[component].encoder is not None:
        spec = arch.components[component]
        if spec.encoder.comfy_name == encoder.comfy_name:
            return spec
        return ComponentSpec(component, spec.block, encoder, spec.kohya_prefixes, spec.diffusers_prefix)
    index = component[2:] or "1"
    kohya = ("lora_te_", "lora_te1_") if index == "1" else (f"lora_te{index}_",)
    if encoder.comfy_name == "clip_g":
        kohya += ("lora_prior_te_",)
    diffusers = "text_encoder." if index == "1" else f"text_encoder_{index}."
    return ComponentSpec(component, component.upper(), encoder, kohya, diffusers)


def bind_comfy_clip(host_params: HostParams, arch: Optional[ArchSpec] = None) -> HostBinding:
    """Bind a ComfyUI CLIP `cond_stage_model` state dict (`clip_l.transformer.<hf>.weight`, `t5xxl...`).

    `arch` (the connected model's variant) decides which encoder is te1, te2, ...; without it the encoders the
    CLIP holds decide (registry.arch_of_clip)."""
    keys, _ = _keys_and_shapes(host_params)
    found = {m.group(1): None for k in keys for m in [COMFY_CLIP_RE.match(k)] if m and m.group(1) in ENCODERS}
    if not found:
        raise LoraMatchError("ComfyUI CLIP state dict has no `<encoder>.transformer.*.weight` key of a known encoder "
                             f"({'/'.join(sorted(ENCODERS))}; e.g. clip_l/clip_g/clip_h): pass "
                             "`clip.cond_stage_model.state_dict()` of a CLIP object")
    names = set(found)
    variant = arch or registry.arch_of_clip(names)
    family = variant.family if variant is not None else registry.families()[0]
    components = family.clip_components(names, variant) or {n: "te1" for n in names}
    binding = HostBinding("comfy_clip", variant)
    binding.family = variant.family if variant is not None else None
    for name, component in components.items():
        if name in names:
            binding.component_specs[component] = _te_component_spec(variant, component, ENCODERS[name])
            binding.te_specs[component] = ENCODERS[name]
    bound = set()
    for k in keys:
        m = COMFY_CLIP_RE.match(k)
        if not m or m.group(1) not in components:
            continue
        component = components[m.group(1)]
        _add_te(binding, component, canonical_te_path(m.group(2), ENCODERS[m.group(1)]), k)
        bound.add(k)
    _count_te_layers(binding)
    _note_unbound(binding, [k for k in keys if k.endswith(".weight") and k not in bound])
    return binding


def guess_te_family(host_params: HostParams) -> Optional[TextEncoderSpec]:
    """CLIP-L / OpenCLIP-H / OpenCLIP-G / T5-XXL from hidden size (shapes) or layer count; None if unclear."""
    keys, shapes = _keys_and_shapes(host_params)
    if any(k.startswith(("encoder.block.", "shared.")) for k in keys):
        return ENCODERS["t5xxl"]
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
                           family: Optional[TextEncoderSpec] = None, key_prefix: str = "",
                           arch: Optional[ArchSpec] = None) -> HostBinding:
    """Bind a transformers text encoder state dict (CLIPTextModel(WithProjection), T5EncoderModel) as
    `component` ("te1", "te2", ...).

    `key_prefix` namespaces the host keys (e.g. "text_encoder_2.") so two encoders can share one mapping.
    `family` (CLIP_L, T5_XXL, ...) names the encoder for ComfyUI-style aliases; it is guessed from shapes / layer
    count when omitted. `arch` gives the variant's kohya prefixes for the component (Flux's T5 = te2:
    `lora_te3_`)."""
    if not re.fullmatch(r"te\d", component or ""):
        raise LoraValueError(f"component must be 'te1', 'te2', ... , got {component!r}")
    keys, _ = _keys_and_shapes(host_params)
    spec = family or guess_te_family(host_params)
    binding = HostBinding("transformers_te", arch)
    binding.family = arch.family if arch is not None else None
    if spec is not None:
        binding.component_specs[component] = _te_component_spec(arch, component, spec)
        binding.te_specs[component] = spec
    else:
        binding.component_specs[component] = ComponentSpec(component, component.upper(), None,
                                                           ("lora_te_", "lora_te1_") if component == "te1" else
                                                           (f"lora_te{component[2:]}_",),
                                                           "text_encoder." if component == "te1" else
                                                           f"text_encoder_{component[2:]}.")
    bound = set()
    for k in keys:
        if not k.endswith(".weight"):
            continue
        path = canonical_te_path(k[:-len(".weight")], spec)
        if path.startswith(("text_model.", "encoder.", "shared", "model.")) or path == "text_projection":
            _add_te(binding, component, path, key_prefix + k)
            bound.add(key_prefix + k)
    if not bound:
        raise LoraMatchError("transformers text-encoder state dict has no `text_model.*.weight` / "
                             "`encoder.block.*.weight` key: not a CLIPTextModel or T5EncoderModel")
    _count_te_layers(binding)
    _note_unbound(binding, [key_prefix + k for k in keys if k.endswith(".weight") and key_prefix + k not in bound])
    return binding


def bind_layout(arch: ArchSpec, components: Optional[Iterable[str]] = None) -> HostBinding:
    """A binding of the full-size variant built from data alone, with ComfyUI-style host keys: lets a LoRA file
    be inspected (blocks, kinds, aliases) with no model loaded. `components` limits it (e.g. the text
    encoders only, for a model-only load that should still recognise text-encoder names)."""
    wanted = set(components) if components is not None else None
    binding = HostBinding("layout", arch, arch.config, arch.family)
    denoiser = arch.family.denoiser
    if wanted is None or denoiser in wanted:
        _bind_denoiser(binding, denoiser,
                       lambda m: ((f"diffusion_model.{param_key(m.path, m.param)}", 0, 0, _WHOLE),))
    for component, spec in arch.components.items():
        if not spec.is_text_encoder or (wanted is not None and component not in wanted):
            continue
        binding.component_specs[component] = spec
        binding.te_specs[component] = spec.encoder
        for path, _kind in te_modules(spec.encoder):
            _add_te(binding, component, path, f"{spec.encoder.comfy_name}.transformer.{path}.weight")
    _count_te_layers(binding)
    return binding


def _count_te_layers(binding: HostBinding) -> None:
    for component in binding.te_specs.keys() | {c for c, _ in binding.modules if c.startswith("te")}:
        layers = {te_layer(p) for c, p in binding.modules if c == component} - {None}
        binding.te_layers[component] = max(layers) + 1 if layers else 0


# ------------------------------------------------------------------------------------------- detection

def detect_arch(host_params: HostParams) -> Optional[ArchSpec]:
    """The variant of a host from its keys (+ shapes): a ComfyUI CLIP by the encoders it holds, a ComfyUI /
    checkpoint / bare denoiser, or a diffusers denoiser. None when it cannot tell (SD1 and SD2 UNets have
    identical names: without shapes they are None)."""
    keys, shapes = _keys_and_shapes(host_params)
    clip_names = {m.group(1) for k in keys for m in [COMFY_CLIP_RE.match(k)] if m and m.group(1) in ENCODERS}
    if clip_names:
        variant = registry.arch_of_clip(clip_names)
        if variant is not None:
            return variant
    prefix, mapping, sub_shapes = registry.strip_denoiser_prefix(keys, shapes)
    if prefix is not None:
        found = registry.detect_host(list(mapping), sub_shapes)
        if found is not None:
            return found[1]
    for prefix in ("", "unet.", "transformer."):
        sub = [k[len(prefix):] for k in keys if k.startswith(prefix)]
        sub_shapes = {k[len(prefix):]: v for k, v in (shapes or {}).items() if k.startswith(prefix)} or None
        found = registry.detect_diffusers(sub, sub_shapes) if sub else None
        if found is not None:
            return found[1]
    return None


def detect_arch_or_raise(host_params: HostParams, what: str = "model") -> ArchSpec:
    arch = detect_arch(host_params)
    if arch is None:
        raise LoraMatchError(f"cannot tell the architecture of this {what} from its keys: known are "
                             f"{', '.join(registry.ARCHS)}; pass a state dict with tensors (shapes) or name the "
                             "architecture explicitly")
    return arch
