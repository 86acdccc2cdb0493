"""KeyMap: every module name a LoRA writer uses -> the canonical target and its host weight key.

Built once per model from one or more `HostBinding`s; `resolve` is a single dict lookup.

Aliases generated for every UNet target (LDM path P, diffusers path D; `_` = dots replaced):
  lora_unet_<P_>, diffusion_model.<P>, model.diffusion_model.<P>        (kohya LDM, ComfyUI, checkpoint)
  lora_unet_<D_>, lycoris_<D_>                                         (kohya SD1 diffusers, SimpleTuner)
  <D>, unet.<D>, base_model.model.<D>, unet.base_model.model.<D>       (diffusers / PEFT)
  <D'>, unet.<D'> with D' = D with `.to_x` -> `.processor.to_x`, `to_out.0` -> `to_out` (old processors)
  diffusion_model.<P>.<param>                                          (ComfyUI generic, non-weight params)
For every text-encoder target (HF path H, H- = H without `text_model.`; C = clip_l/clip_g/clip_h):
  te1: lora_te_<H_>, lora_te1_<H_>, lora_te_<H-_>, lora_te1_<H-_>, text_encoder.<H>, text_encoder.<H->
  te2: lora_te2_<H_>, lora_te2_<H-_>, text_encoder_2.<H>, text_encoder_2.<H->
  both: text_encoders.<C>.transformer.<H>                              (ComfyUI generic)
  OpenCLIP-G also: lora_prior_te_<H_>  (Stable Cascade's prior TE is the same encoder; ComfyUI maps it)
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Optional

from .bindings import HostBinding
from .layouts import TE_BLOCK, ArchSpec, block_of_ldm_path
from .text_encoders import te_kind

TE_KOHYA_PREFIXES = {"te1": ("lora_te_", "lora_te1_"), "te2": ("lora_te2_",)}
TE_DIFFUSERS_PREFIXES = {"te1": "text_encoder.", "te2": "text_encoder_2."}


@dataclass(frozen=True)
class Target:
    """A resolved LoRA module: canonical `(component, path)`, the host key it patches, block, kind.

    `param` is "weight" except for ComfyUI's generic non-weight names (`diffusion_model.X.bias`).
    """

    component: str
    path: str
    host_key: str
    block: str
    kind: str
    param: str = "weight"


def block_id(target: Target) -> str:
    """Block id of a target per the layout: TE1/TE2, IN00.., M00, OUT00.., OTHER."""
    if target.component in TE_BLOCK:
        return TE_BLOCK[target.component]
    return block_of_ldm_path(target.path)


def element_kind(target: Target) -> str:
    """Element kind of a target (attn1, attn2, ff, proj, norm, resnet_conv, emb, te_attn, ...)."""
    return target.kind


def _unet_aliases(path: str, diffusers: tuple[str, ...]) -> list[str]:
    under = path.replace(".", "_")
    names = [f"lora_unet_{under}", f"diffusion_model.{path}", f"model.diffusion_model.{path}"]
    for d in diffusers:
        d_under = d.replace(".", "_")
        names += [f"lora_unet_{d_under}", f"lycoris_{d_under}", d, f"unet.{d}",
                  f"base_model.model.{d}", f"unet.base_model.model.{d}"]
        processor = d.replace(".to_", ".processor.to_")
        if processor.endswith(".to_out.0"):
            processor = processor[:-2]
        if processor != d:
            names += [processor, f"unet.{processor}"]
    return names


def _te_aliases(component: str, path: str, comfy_name: Optional[str]) -> list[str]:
    short = path[len("text_model."):] if path.startswith("text_model.") else path
    forms = dict.fromkeys([path, short])  # transformers 5 drops `text_model.`
    names = []
    kohya = TE_KOHYA_PREFIXES[component] + (("lora_prior_te_",) if comfy_name == "clip_g" else ())
    for form in forms:
        names += [p + form.replace(".", "_") for p in kohya]
        names.append(TE_DIFFUSERS_PREFIXES[component] + form)
    if comfy_name:
        names.append(f"text_encoders.{comfy_name}.transformer.{path}")
    return names


class KeyMap:
    """Alias -> Target, plus the facts `explain_unmatched` needs. Build with `build_key_map`."""

    def __init__(self, aliases: dict, bindings: tuple, conflicts: list):
        self._aliases = aliases
        self.bindings = bindings
        self.conflicts = conflicts  # (alias, kept target, dropped target): should stay empty
        self.components = tuple(sorted({b for binding in bindings for b in binding.components}))
        self.arch: Optional[ArchSpec] = next((b.arch for b in bindings if b.arch is not None), None)
        self.unet = next((b.unet for b in bindings if b.unet is not None), None)
        self.te_layers = {c: n for b in bindings for c, n in b.te_layers.items()}
        self.te_specs = {c: s for b in bindings for c, s in b.te_specs.items()}
        self.targets = tuple(dict.fromkeys(t for t in aliases.values() if t.param == "weight"))

    def resolve(self, name: str) -> Optional[Target]:
        """Target of a LoRA module name exactly as the file spells it, or None."""
        return self._aliases.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._aliases

    def __len__(self) -> int:
        return len(self._aliases)

    @property
    def aliases(self) -> Mapping[str, Target]:
        """Read-only view of every alias."""
        return MappingProxyType(self._aliases)

    def aliases_of(self, target: Target) -> list[str]:
        return [a for a, t in self._aliases.items() if t == target]

    def explain_unmatched(self, name: str) -> str:
        """Why `name` did not resolve, in words a user can act on."""
        from .explain import explain

        return explain(self, name)


def build_key_map(*bindings: HostBinding) -> KeyMap:
    """One KeyMap over all given host bindings (e.g. ComfyUI model + ComfyUI CLIP).

    The first binding to claim an alias keeps it; clashes are recorded in `KeyMap.conflicts`.
    """
    aliases: dict[str, Target] = {}
    conflicts: list = []

    def add(alias: str, target: Target) -> None:
        kept = aliases.setdefault(alias, target)
        if kept != target:
            conflicts.append((alias, kept, target))

    for binding in bindings:
        for (component, path), host_key in binding.targets.items():
            block = binding.blocks.get((component, path)) or block_id(Target(component, path, host_key, "", ""))
            if component == "unet":
                target = Target(component, path, host_key, block, binding.kinds.get((component, path), "other"))
                for alias in _unet_aliases(path, tuple(binding.diffusers.get(path, ()))):
                    add(alias, target)
            else:
                kind = binding.kinds.get((component, path)) or te_kind(path)
                target = Target(component, path, host_key, block, kind)
                spec = binding.te_specs.get(component)
                for alias in _te_aliases(component, path, spec.comfy_name if spec else None):
                    add(alias, target)
        for (component, path, param), host_key in binding.params.items():
            weight_target = aliases.get(f"diffusion_model.{path}")
            block = weight_target.block if weight_target else block_of_ldm_path(path)
            kind = weight_target.kind if weight_target else "other"
            add(f"diffusion_model.{path}.{param}", Target(component, path, host_key, block, kind, param))
    return KeyMap(aliases, tuple(bindings), conflicts)


def layout_key_map(arch: "ArchSpec | str") -> KeyMap:
    """KeyMap of the full-size architecture from data alone (ComfyUI-style host keys, no weights).

    For inspecting a LoRA file without a model: which block / kind each of its modules is."""
    from .bindings import bind_layout
    from .layouts import get_arch

    spec = get_arch(arch) if isinstance(arch, str) else arch
    return build_key_map(bind_layout(spec))

