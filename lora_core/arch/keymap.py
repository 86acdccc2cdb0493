"""KeyMap: every module name a LoRA writer uses -> the canonical target and where it lands in the host.

Built once per model from one or more `HostBinding`s; `resolve` is a single dict lookup. The denoiser's
aliases come from its family (`Family.aliases`: ComfyUI, kohya, musubi, diffusers/PEFT, OneTrainer, LyCORIS,
XLabs, ... names, and names of *parts* of fused weights). Text-encoder aliases are generated here for every
encoder, from the component's kohya prefixes and diffusers prefix (HF path H, H- = H without CLIP's
`text_model.`; `_` = dots replaced; C = the ComfyUI attribute):

  <kohya prefix><H_>, <kohya prefix><H-_>, <diffusers prefix><H>, <diffusers prefix><H->,
  text_encoders.<C>.transformer.<H>                              (ComfyUI generic)

A `Target` is the canonical module as one alias sees it. Usually the alias is the whole module and the module is
one host weight (`pieces` None). Otherwise `pieces` say which rows of the LoRA module's output land on which rows
of which host tensor (a diffusers `to_q` is rows 0..h of ComfyUI's fused `qkv`; a kohya fused `qkv` is three
host weights of a diffusers model; rows split where element kinds differ, so block weights can address the parts
of a fused weight).
"""
from __future__ import annotations

import functools
import gc
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Optional

from .family import Piece, param_key, row_pieces
from .text_encoders import short_te_path, te_kind


@dataclass(frozen=True)
class Target:
    """A resolved LoRA module: canonical `(component, path)`, the host tensor it patches, block, element kind.

    `param` is "weight" except for non-weight parameters (`diffusion_model.X.bias`, RMSNorm `scale`).
    `pieces` (None: the whole module onto the whole `host_key`, row for row) map rows of the LoRA module's
    output to rows of host tensors; `module_rows` is how many output rows the LoRA module must have (0: as many
    as the host weight). `col_parts` are the canonical module's input-column parts (block weights can scale
    them apart)."""

    component: str
    path: str
    host_key: str
    block: str
    kind: str
    param: str = "weight"
    pieces: Optional[tuple[Piece, ...]] = None
    module_rows: int = 0
    col_parts: tuple = ()
    rows: int = 0          # the canonical module's rows when the family knows them

    @property
    def host_keys(self) -> tuple[str, ...]:
        if self.pieces is None:
            return (self.host_key,)
        return tuple(dict.fromkeys(p.host_key for p in self.pieces))

    @property
    def kinds(self) -> tuple[str, ...]:
        if self.pieces is None:
            return (self.kind,)
        return tuple(dict.fromkeys(p.kind for p in self.pieces))


def block_id(target: Target) -> str:
    """Block id of a target per its family's layout (TE1, IN04, DB03, ...)."""
    return target.block


def element_kind(target: Target) -> str:
    """Element kind of a target (attn1, attn2, ff, img_attn, linear1_mlp, te_attn, ...)."""
    return target.kind


def te_aliases(component_spec, path: str) -> list[str]:
    """Every writer's name for text-encoder module `path` of one component (see the module docstring)."""
    return list(_te_aliases(component_spec, path))


@functools.lru_cache(maxsize=1 << 16)
def _te_aliases(component_spec, path: str) -> tuple[str, ...]:
    # the same encoders (CLIP-L, T5-XXL, UMT5, ...) recur in many variants and hosts: their names are made once
    forms = dict.fromkeys([path, short_te_path(path)])
    if component_spec.encoder is not None and component_spec.encoder.kind == "llm" and path.startswith("model."):
        forms[path[len("model."):]] = None   # HF base-model names (Gemma2Model: kohya lora_te_layers_0_..., diffusers)
    names = []
    for form in forms:
        names += [p + form.replace(".", "_") for p in component_spec.kohya_prefixes]
        if component_spec.diffusers_prefix:
            names.append(component_spec.diffusers_prefix + form)
    if component_spec.encoder is not None:
        names.append(f"text_encoders.{component_spec.encoder.comfy_name}.transformer.{path}")
    return tuple(names)


class KeyMap:
    """Alias -> Target, plus the facts `explain_unmatched` needs. Build with `build_key_map`."""

    def __init__(self, aliases: dict, bindings: tuple, conflicts: list, module_targets: dict):
        self._aliases = aliases
        self.bindings = bindings
        self.conflicts = conflicts  # (alias, kept target, dropped target): should stay empty
        self.components = tuple(sorted({c for binding in bindings for c in binding.components}))
        self.arch = next((b.arch for b in bindings if b.arch is not None), None)
        self.family = self.arch.family if self.arch is not None else next(
            (b.family for b in bindings if b.family is not None), None)
        self.config = next((b.config for b in bindings if b.config is not None), None)
        self.te_layers = {c: n for b in bindings for c, n in b.te_layers.items()}
        self.te_specs = {c: s for b in bindings for c, s in b.te_specs.items()}
        self.component_specs = {c: s for b in bindings for c, s in b.component_specs.items()}
        self._module_targets = module_targets   # (component, path) -> whole Target
        self.absent: dict = {}   # component -> why its names resolve but it is not there (set by the host)
        self.targets = tuple(t for t in module_targets.values() if t.param == "weight")
        # modules whose tensor is a parameter other than a weight (RMSNorm `scale`, Wan's `modulation`)
        self.param_targets = tuple(t for t in module_targets.values() if t.param != "weight")

    def rebound(self, bindings: tuple) -> "KeyMap":
        """A KeyMap with these bindings over this one's alias table (shared, read-only): for bindings that are
        the same data as this map's except for the variant (registry.layout_key_map)."""
        return KeyMap(self._aliases, tuple(bindings), self.conflicts, self._module_targets)

    @property
    def unet(self):
        """The UNet config of a UNet host (kept for SD callers); None otherwise."""
        return self.config if self.family is not None and self.family.denoiser == "unet" else None

    @property
    def denoiser(self) -> Optional[str]:
        return self.family.denoiser if self.family is not None else None

    def resolve(self, name: str) -> Optional[Target]:
        """Target of a LoRA module name exactly as the file spells it, or None."""
        return self._aliases.get(name)

    def module_target(self, component: str, path: str) -> Optional[Target]:
        """The whole-module Target of a canonical module."""
        return self._module_targets.get((component, path))

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


def _whole_pieces(host_pieces) -> bool:
    return len(host_pieces) == 1 and host_pieces[0][1] == 0 and host_pieces[0][2] == 0 and host_pieces[0][3] is None


def build_key_map(*bindings) -> KeyMap:
    """One KeyMap over all given host bindings (e.g. ComfyUI model + ComfyUI CLIP).

    The first binding to claim an alias keeps it; clashes are recorded in `KeyMap.conflicts`."""
    # Tens of thousands of small objects, none of them garbage: the cyclic collector's passes over every live
    # object (a model's state dict included) would cost more than building them.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _build_key_map(bindings)
    finally:
        if collecting:
            gc.enable()


def _build_key_map(bindings) -> KeyMap:
    aliases: dict[str, Target] = {}
    conflicts: list = []
    module_targets: dict = {}

    setdefault = aliases.setdefault

    def add(alias: str, target: Target) -> None:
        kept = aliases.setdefault(alias, target)
        if kept is not target and kept != target:
            conflicts.append((alias, kept, target))

    for binding in bindings:
        for (component, path), module in binding.modules.items():
            host_pieces = binding.host_pieces[(component, path)]
            spec = binding.component_specs.get(component)
            whole = _target(component, module, host_pieces, None, 0)
            module_targets[(component, path)] = whole
            if component.startswith("te") and spec is not None:
                for alias in _te_aliases(spec, path):
                    add(alias, whole)
                continue
            if module.param != "weight":
                # ComfyUI names non-weight parameters by their full key (`diffusion_model.<path>.scale`)
                add(f"diffusion_model.{param_key(path, module.param)}", whole)
                add(param_key(path, module.param), whole)
            cache: dict = {}
            for alias in binding.aliases_of(component, module):
                pieces = alias.pieces
                if pieces is None:
                    target = whole
                else:
                    target = cache.get(pieces)
                    if target is None:
                        target = cache[pieces] = _target(component, module, host_pieces, pieces, alias.rows)
                if target is None:
                    continue
                kept = setdefault(alias.name, target)   # add(), inlined: the loop runs once per alias
                if kept is not target and kept != target:
                    conflicts.append((alias.name, kept, target))
        for (component, path, param), host_key in binding.params.items():
            weight_target = module_targets.get((component, path))
            block = weight_target.block if weight_target else ""
            kind = weight_target.kind if weight_target else "other"
            add(f"diffusion_model.{path}.{param}", Target(component, path, host_key, block, kind, param))
    return KeyMap(aliases, tuple(bindings), conflicts, module_targets)


def _target(component: str, module, host_pieces, alias_pieces, alias_rows: int) -> Optional[Target]:
    """The Target of one alias of `module` on this host (None when the alias covers no host rows)."""
    first_key = host_pieces[0][0]
    plain = alias_pieces is None and not module.parts and _whole_pieces(host_pieces)
    if plain:
        return Target(component, module.path, first_key, module.block, module.kind, module.param,
                      col_parts=module.col_parts, rows=module.rows)
    rows = module.rows
    if rows <= 0:
        # a weight of unknown size can only be addressed whole
        if alias_pieces is None and _whole_pieces(host_pieces):
            return Target(component, module.path, first_key, module.block, module.kind, module.param,
                          col_parts=module.col_parts, rows=module.rows)
        return None
    canon_hosts = tuple((key, c, h, n if n is not None else rows) for key, c, h, n in host_pieces)
    alias = alias_pieces if alias_pieces is not None else ((0, 0, rows),)
    found = row_pieces(alias, canon_hosts, module)
    if not found:
        return None
    pieces = tuple(Piece(*p) for p in found)
    module_rows = alias_rows or sum(n for _, _, n in alias)
    primary = pieces[0].host_key
    identity = (len({p.host_key for p in pieces}) == 1 and module_rows == rows and alias_pieces is None
                and _whole_pieces(host_pieces) and len({p.kind for p in pieces}) == 1)
    if identity:
        return Target(component, module.path, primary, module.block, module.kind, module.param,
                      col_parts=module.col_parts, rows=rows)
    return Target(component, module.path, primary, module.block, module.kind, module.param, pieces, module_rows,
                  module.col_parts, rows)
