"""Mixing and export: merge N LoRAs (each with its strengths and block weights) into one kohya-format file.

Two modes, chosen per call:

* ``exact``  Every target's change is stored without loss. Plain low-rank sources (kohya/PEFT/diffusers LoRA,
  LoCon, Tucker-LoCon) are concatenated along the rank: ``up = (s1 f1 a1/r1 U1 | s2 f2 a2/r2 U2 | ...)``,
  ``down = (D1 ; D2 ; ...)``, ``alpha = total rank`` (scale 1). A target touched by any other algorithm
  (LoHa, LoKr, full/norm diffs) stores the summed change as a full ``diff`` instead: ComfyUI (like
  A1111) keeps one adapter per module name, so the target's whole change goes into that one tensor.
  Algorithms whose change depends on the base weight (DoRA, OFT, BOFT, GLoRA, (IA)^3, set) are stored as the
  exact ``diff`` of the base weights you pass (``base_weights``: the nodes pass the connected MODEL/CLIP);
  without base weights they are refused with an error that says so. Such a diff is exact for that base model.
* ``svd``  Per target the change ΔW (fp32) is reduced to its top singular directions: ``rank`` caps the
  rank, ``energy`` (0 < e <= 1) keeps the fewest directions whose squared singular values reach that share
  of the total, both together take the smaller. Low-rank sources are factored without ever building ΔW
  (QR of the concatenated factors, SVD of the small core), so the result is the exact truncated SVD.
  Conv kernels are flattened to (out, in*k*k); singular values are split evenly (sqrt) between up and down;
  ``alpha = rank`` (scale 1). Bias deltas (``diff_b``) are always stored exactly.

Output naming (what ComfyUI core, A1111/Forge and kohya read): ``lora_unet_<LDM path with _>``,
``lora_te_text_model_encoder_layers_<...>`` for the single text encoder of SD1/SD2, ``lora_te1_`` /
``lora_te2_`` on SDXL. Text-encoder modules outside the encoder layers' attention/MLP linears (embeddings,
norms, text_projection), for which kohya has no name that ComfyUI maps, use ComfyUI's generic name
``text_encoders.<clip_l|clip_g|clip_h>.transformer.<HF path>``. A kohya conv LoRA stores down as
(r, in, k, k) and up as (out, r, 1, 1); without a model connected the shape comes from the source tensors,
so a LoHa/LoKr conv delta that only exists flattened is written 2-D (loaders reshape it to the weight).

The metadata is kohya's (``ss_*``) and SAI's model spec (``modelspec.*``), plus ``lora_core.sources``: JSON
with the mode, rank/energy and every source's name, strengths and block weights.

Public API: ``merge_loras``, ``resize_lora``, ``save_mix``, ``detect_lora_arch``, ``output_name``,
``build_metadata``, ``cached_layout_key_map``, ``MixResult`` / ``LayerResult``.
"""
from __future__ import annotations

import datetime
import functools
import json
import math
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch

from . import adapters
from .api import LoraRequest, plan_stack
from .arch import ArchSpec, KeyMap, Target, get_arch, layout_key_map
from .arch import registry
from .arch.text_encoders import kohya_names
from .engine import WeightPatch, check_strength, patch_weight
from .errors import LoraMatchError, LoraValueError
from .formats import parse_modules
from .io import lora_metadata_summary, save_lora_file
from .types import LoraFile, ModuleLora

MODES = ("exact", "svd")
F32 = torch.float32

# Dense SVDs of matrices larger than this (smaller side) use torch.svd_lowrank when only a rank is asked for.
_LOWRANK_SVD_MIN_SIDE = 1536


# ------------------------------------------------------------------------------------------- results

@dataclass
class LayerResult:
    """One exported module: how it is stored and how much of its change was kept."""

    name: str              # output module name, e.g. lora_unet_input_blocks_1_1_proj_in
    component: str
    path: str
    storage: str           # "lowrank" or "diff" ("bias" when only a bias delta was exported)
    rank: int              # stored rank (0 for a diff)
    full_rank: int         # rank of the change before reduction (summed source ranks, or matrix rank bound)
    kept_energy: float     # share of ||ΔW||² kept (1.0 when stored exactly)
    patches: int           # how many source modules contributed
    bias: bool = False


@dataclass
class MixResult:
    """A merged (or resized) LoRA in memory: kohya tensors + metadata, per-layer facts, per-source reports."""

    tensors: dict
    metadata: dict
    layers: list
    reports: list
    arch: ArchSpec
    mode: str
    rank: int = 0
    energy: float = 0.0
    warnings: list = field(default_factory=list)
    path: Optional[str] = None

    @property
    def max_rank(self) -> int:
        return max((layer.rank for layer in self.layers), default=0)

    def save(self, path, overwrite: bool = False) -> str:
        return save_mix(self, path, overwrite)

    def text(self, per_layer: bool = True) -> str:
        lines = [f"LoRA Core mix ({self.mode}): {len(self.layers)} modules for {self.arch.name}"]
        if self.path:
            lines.append(f"  saved: {self.path}")
        if self.mode == "svd":
            wanted = []
            if self.rank:
                wanted.append(f"rank <= {self.rank}")
            if self.energy:
                wanted.append(f"kept energy >= {self.energy:g}")
            lines.append("  target: " + " and ".join(wanted))
        stored = {"lowrank": 0, "diff": 0, "bias": 0}
        for layer in self.layers:
            stored[layer.storage] += 1
        lines.append("  stored: " + ", ".join(f"{k} {v}" for k, v in stored.items() if v))
        ranks = sorted({layer.rank for layer in self.layers if layer.storage == "lowrank"})
        if ranks:
            lines.append(f"  ranks: {ranks[0]}..{ranks[-1]}" if len(ranks) > 1 else f"  rank: {ranks[0]}")
        energies = [layer.kept_energy for layer in self.layers if layer.storage != "bias"]
        if energies:
            lines.append(f"  kept energy: min {min(energies):.4%}, mean {sum(energies) / len(energies):.4%}")
        for report in self.reports:
            lines.append("  source " + report.text().replace("\n", "\n  "))
        lines.extend(f"  WARNING: {w}" for w in self.warnings)
        if per_layer:
            lines.append("  per layer (name: stored rank / full rank, kept energy):")
            for layer in self.layers:
                if layer.storage == "lowrank":
                    lines.append(f"    {layer.name}: {layer.rank}/{layer.full_rank}, {layer.kept_energy:.4%}")
                else:
                    lines.append(f"    {layer.name}: {layer.storage}, {layer.kept_energy:.4%}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------- public API

def merge_loras(requests: Sequence[LoraRequest], *, mode: str = "exact", rank: int = 0, energy: float = 0.0,
                key_map: Optional[KeyMap] = None, arch: "ArchSpec | str | None" = None,
                shapes: Optional[Mapping[str, Sequence[int]]] = None,
                base_weights: Optional[Mapping[str, torch.Tensor]] = None,
                components: Optional[Sequence[str]] = None, save_dtype: Optional[torch.dtype] = None,
                title: Optional[str] = None, device: "torch.device | str | None" = None,
                source_notes: Optional[Sequence[Mapping]] = None) -> MixResult:
    """Merge `requests` (each a LoraRequest: file, strength_model, strength_clip, block_weights) into one LoRA.

    Applying the result at strength 1 equals applying every request with its strengths and block factors
    (exactly in ``exact`` mode, up to the kept rank in ``svd`` mode).

    * `key_map`: the host's KeyMap (nodes pass the connected MODEL/CLIP's); without one the full-size layout
      of `arch` is used (`arch` None or "auto": detected from the files' metadata and keys).
    * `shapes`: host tensor key -> shape (with a key map from a model); missing keys are read off the files.
    * `base_weights`: host tensor key -> base weight, needed only for weight-dependent adapters (DoRA, OFT, ...).
    * `save_dtype`: dtype of the written tensors; None keeps the widest float dtype of the sources.
    * `source_notes`: per request, extra JSON-able facts for its `lora_core.sources` entry (e.g. the block
      vector as the user typed it).
    """
    mode, rank, energy = _check_options(mode, rank, energy)
    if not requests:
        raise LoraValueError("nothing to merge: the LoRA list is empty. Add at least one LoRA.")
    if key_map is None:
        spec = _resolve_arch(arch, [r.lora for r in requests])
        key_map = cached_layout_key_map(spec.name)
    else:
        spec = key_map.arch or _resolve_arch(arch, [r.lora for r in requests])
    known = dict(shapes or {})
    known.update(_shapes_from_files(requests, key_map, known))
    plan = plan_stack(requests, key_map, known, tuple(components or key_map.components))
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = save_dtype or _widest_dtype(requests)

    tensors: dict[str, torch.Tensor] = {}
    layers: list[LayerResult] = []
    warnings: list[str] = []
    for target, weight_key, weight_patches, bias_key, bias_patches in _group_by_target(plan.patches, key_map,
                                                                                       warnings):
        name = output_name(target, key_map, spec)
        layer = None
        if weight_patches:
            base = base_weights.get(weight_key) if base_weights is not None else None   # a reference, no copy
            layer = _export_weight(name, target, weight_patches, tuple(known[weight_key]), base, mode, rank,
                                   energy, device, dtype, tensors)
            if layer is None:
                warnings.append(f"{name}: the sources cancel out (zero change); not written.")
        if bias_patches:
            bias = patch_weight(torch.zeros(tuple(known[bias_key]), dtype=F32, device=device), bias_patches)
            tensors[f"{name}.diff_b"] = bias.to("cpu", dtype)
            if layer is None:
                layer = LayerResult(name, target.component, target.path, "bias", 0, 0, 1.0, 0)
            layer.bias = True
            layer.patches += len(bias_patches)
        if layer is not None:
            layers.append(layer)
    if not tensors:
        raise LoraValueError("nothing to write: every module has strength 0, block factor 0 or zero change. "
                             "Raise a strength or a block weight.")
    result = MixResult(tensors, {}, layers, plan.reports, spec, mode, rank, energy, warnings)
    result.metadata = build_metadata(result, requests, title, source_notes)
    return result


def resize_lora(lora: LoraFile, *, rank: int = 0, energy: float = 0.0, name: Optional[str] = None,
                **kwargs) -> MixResult:
    """SVD rank reduction of one LoRA (any format; output kohya). Same options as `merge_loras`."""
    request = LoraRequest(lora, 1.0, 1.0, name=name)
    return merge_loras([request], mode="svd", rank=rank, energy=energy, **kwargs)


def save_mix(result: MixResult, path, overwrite: bool = False) -> str:
    """Write a MixResult atomically as .safetensors (never replacing a file unless `overwrite`)."""
    result.path = save_lora_file(path, result.tensors, result.metadata, overwrite=overwrite)
    return result.path


def output_name(target: Target, key_map: Optional[KeyMap] = None, arch: Optional[ArchSpec] = None) -> str:
    """The module name a merged file uses for a canonical target: kohya's, as sd-scripts writes it for the family
    (`lora_unet_<canonical path _>`; text encoders `<kohya prefix><HF path _>` where kohya and ComfyUI name the
    module, ComfyUI's generic `text_encoders.<encoder>.transformer.<HF path>` elsewhere)."""
    arch = arch or (key_map.arch if key_map is not None else None)
    if not target.component.startswith("te"):
        family = arch.family if arch is not None else (key_map.family if key_map is not None else None)
        custom = family.export_name(target) if family is not None else None
        return custom or "lora_unet_" + target.path.replace(".", "_")
    spec = (key_map.component_specs.get(target.component) if key_map is not None else None) or (
        arch.components.get(target.component) if arch is not None else None)
    encoder = spec.encoder if spec is not None else None
    if encoder is None:
        raise LoraMatchError(f"cannot name text-encoder module {target.path} ({target.component}): the "
                             f"encoder family is unknown. Connect the CLIP or choose the architecture.")
    if kohya_names(encoder, target.path) and spec.kohya_prefixes:
        return spec.kohya_prefixes[0] + target.path.replace(".", "_")
    return f"text_encoders.{encoder.comfy_name}.transformer.{target.path}"


def detect_lora_arch(loras: Sequence[LoraFile]) -> ArchSpec:
    """The variant a set of LoRA files was made for, from metadata or keys (lora_core.arch.detect_lora); refuses
    mixed or unknown ones."""
    found: dict[str, list[str]] = {}
    unknown: list[str] = []
    for lora in loras:
        spec = registry.detect_lora(lora)
        if spec is None:
            named = registry.named_base_model(lora.metadata) if registry.arch_of_metadata(lora.metadata) is None \
                and registry.family_of_metadata(lora.metadata) is None else None
            if named:
                known = ", ".join(f.title for f in registry.families())
                raise LoraMatchError(f"{lora.label} is a {named} LoRA; mixing supports {known} LoRAs.")
            unknown.append(lora.label)
        else:
            found.setdefault(spec.name, []).append(lora.label)
    families = {registry.ARCHS[name].family for name in found}
    if len(found) > 1 and (len(families) > 1 or not _interchangeable([registry.ARCHS[n] for n in found])):
        listed = "; ".join(f"{arch}: {', '.join(labels)}" for arch, labels in found.items())
        raise LoraMatchError(f"the LoRAs were made for different base models ({listed}). Merge only LoRAs "
                             f"of one architecture.")
    if not found:
        choices = ", ".join(a.layout_key for a in registry.ARCHS.values())
        raise LoraMatchError(f"cannot tell the base model of {', '.join(unknown)} from its metadata or keys. "
                             f"Choose the architecture ({choices}) or connect the model.")
    return registry.ARCHS[next(iter(found))]


def _interchangeable(archs: Sequence[ArchSpec]) -> bool:
    """Variants with one layout and the same components (Flux.1 dev / Kontext / Fill) merge into each other."""
    first = archs[0]
    return all(a.layout_key == first.layout_key and a.family is first.family for a in archs)


def build_metadata(result: MixResult, requests: Sequence[LoraRequest], title: Optional[str] = None,
                   source_notes: Optional[Sequence[Mapping]] = None) -> dict:
    """kohya + modelspec metadata (all strings) and the `lora_core.sources` record."""
    spec = result.arch
    title = title or "LoRA Core " + ("resize" if len(requests) == 1 and result.mode == "svd" else "merge")
    dim = str(result.max_rank)
    sources = {
        "mode": result.mode,
        "rank": result.rank if result.mode == "svd" else None,
        "energy": result.energy if result.mode == "svd" else None,
        "sources": [_describe_request(r, spec) for r in requests],
    }
    for entry, note in zip(sources["sources"], source_notes or ()):
        entry.update(note or {})
    info = spec.metadata
    meta = {
        "ss_network_module": info.get("ss_network_module", "networks.lora"),
        "ss_network_dim": dim,
        "ss_network_alpha": dim,   # alpha equals each module's rank: scale 1
        "ss_base_model_version": info["ss_base_model_version"],
        "ss_v2": str(spec.name == "SD2"),
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": _modelspec_architecture(spec, requests) + "/lora",
        "modelspec.implementation": info.get("modelspec.implementation", ""),
        "modelspec.title": title,
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "lora_core.sources": json.dumps(sources),
    }
    return meta


# ------------------------------------------------------------------------------------------- options

def _check_options(mode: str, rank, energy) -> tuple[str, int, float]:
    mode = str(mode).strip().lower()
    if mode not in MODES:
        raise LoraValueError(f"mode {mode!r} is unknown; use one of {', '.join(MODES)}.")
    try:
        rank = int(rank)
    except (TypeError, ValueError):
        raise LoraValueError(f"rank must be a whole number, got {rank!r}.") from None
    energy = check_strength(energy, "energy", None)
    if rank < 0:
        raise LoraValueError(f"rank is {rank}; use 0 (no cap) or a positive rank such as 32.")
    if not 0.0 <= energy <= 1.0:
        raise LoraValueError(f"energy is {energy}; use a share between 0 (off) and 1, e.g. 0.99.")
    if mode == "svd" and rank == 0 and energy == 0.0:
        raise LoraValueError("svd mode needs a target: set rank > 0 (e.g. 32) or energy in (0, 1] (e.g. 0.99).")
    return mode, rank, energy


def _resolve_arch(arch, loras: Sequence[LoraFile]) -> ArchSpec:
    if isinstance(arch, ArchSpec):
        return arch
    if arch is None or str(arch).strip().lower() in ("", "auto"):
        return detect_lora_arch(loras)
    return get_arch(str(arch))


def cached_layout_key_map(arch_name: str) -> KeyMap:
    """`layout_key_map` of a variant ("SD1", "SDXL", "Flux.1-dev", ...), built once per process (read-only)."""
    return layout_key_map(arch_name)


def _widest_dtype(requests: Sequence[LoraRequest]) -> torch.dtype:
    """The widest float dtype of the sources' factor tensors (alphas, often fp32 in fp16 files, do not count)."""
    order = [torch.bfloat16, torch.float16, torch.float32]
    found = {t.dtype for r in requests for t in r.lora.tensors.values() if t.dim() >= 2 and t.is_floating_point()}
    if not found or any(dtype not in order for dtype in found):   # fp64 / fp8 sources: write fp32
        return F32
    return max(found, key=order.index)


# ------------------------------------------------------------------------------------------- shapes

def _natural_shape(module: ModuleLora) -> Optional[tuple[int, ...]]:
    """The shape of the change a weight-independent adapter produces, read off its own tensors."""
    if module.algo not in ("lora", "loha", "lokr", "full", "norm", "set"):
        return None
    # adapters computes this for its own shape checks; an empty weight shape never fits, so only the
    # adapter's shape comes back.
    shape = adapters.natural_shape(module)
    return tuple(int(s) for s in shape)


def _host_layout_shape(shape: tuple[int, ...], target: Target, arch: Optional[ArchSpec]) -> tuple[int, ...]:
    """Give a flattened (out, in*k*k) change the conv shape of its target, from the layout alone (the family
    knows which modules are convolutions).

    LoHa / LoKr / diff files may store a conv change flat; ComfyUI refuses a `diff` whose shape differs from the
    weight's (it logs a shape mismatch and skips it), so the file must carry the kernel shape."""
    if len(shape) != 2 or target.component.startswith("te") or arch is None:
        return shape
    kernel = arch.family.conv_kernel(target, arch)
    if not kernel:
        return shape
    out, cols = shape
    if cols % (kernel * kernel):
        raise LoraMatchError(f"{target.path}: the LoRA's change has {cols} columns, which is not a {kernel}x{kernel} "
                             f"conv kernel of this architecture; it was made for a different model.")
    return (out, cols // (kernel * kernel), kernel, kernel)


def _strength_for(request: LoraRequest, target: Target) -> float:
    """The largest strength any part of the target gets (0: the module is not exported)."""
    strength = request.strength_clip if target.component.startswith("te") else request.strength_model
    if strength and request.block_weights is not None:
        strength *= max(abs(request.block_weights.factor(target.block, kind, target.path)) for kind in target.kinds)
    return float(strength)


def _shapes_from_files(requests: Sequence[LoraRequest], key_map: KeyMap,
                       known: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """Host key -> shape for every target the sources touch that `known` lacks (no model connected)."""
    found: dict[str, tuple[int, ...]] = {}
    for request in requests:
        for name, module in parse_modules(request.lora).modules.items():
            target = key_map.resolve(name)
            if target is None or target.host_key in known or _strength_for(request, target) == 0.0:
                continue
            shape = _natural_shape(module)
            if shape is None:
                raise LoraValueError(
                    f"{request.label}: module {name} is {module.algo}, whose change depends on the base model's "
                    f"weights. Connect the base MODEL and CLIP to the merge node (or merge it onto a model) so "
                    f"it can be exported as an exact diff.")
            if target.pieces is not None:   # a part of a fused weight: the weight has the canonical rows
                if target.module_rows and shape[0] != target.module_rows:
                    raise LoraMatchError(
                        f"{request.label}: module {name} has {shape[0]} rows, but in the full-size "
                        f"{key_map.arch.title if key_map.arch else 'layout'} it is a part of {target.path} with "
                        f"{target.module_rows}: the file is for a model of another size. Connect the base MODEL "
                        f"to the merge node so the layout follows it.")
                rows = target.rows or max(p.dst + p.length for p in target.pieces)
                shape = (rows, *shape[1:])
            _record_shape(found, target.host_key, _host_layout_shape(shape, target, key_map.arch), name)
            if module.bias_diff is not None and target.param == "weight":
                _record_shape(found, _bias_key(target.host_key), (shape[0],), name)
    return found


def _record_shape(found: dict, key: str, shape: tuple[int, ...], name: str) -> None:
    previous = found.get(key)
    if previous is None:
        found[key] = shape
        return
    if math.prod(previous) != math.prod(shape) or previous[0] != shape[0]:
        raise LoraMatchError(f"{name}: the sources disagree on the shape of {key} ({previous} vs {shape}); they "
                             f"were made for different models. Merge LoRAs of one base model.")
    if len(shape) > len(previous):   # a 4-D conv factor wins over a flattened one
        found[key] = shape


def _bias_key(weight_key: str) -> str:
    return weight_key[: -len(".weight")] + ".bias" if weight_key.endswith(".weight") else weight_key + ".bias"


# ------------------------------------------------------------------------------------------- grouping

def _group_by_target(patches: Mapping[str, list], key_map: KeyMap, warnings: list):
    """(target, weight key, weight patches, bias key, bias patches) per module, in layout order."""
    weight_targets = {t.host_key: t for t in key_map.targets}
    family = key_map.family
    if family is not None:   # parameters a family's common format names (Wan's `modulation`)
        weight_targets.update({t.host_key: t for t in key_map.param_targets if family.export_name(t)})
    grouped: dict[str, dict] = {}
    for key, items in patches.items():
        if key in weight_targets:
            grouped.setdefault(key, {})["weight"] = items
        elif key.endswith(".bias") and key[: -len(".bias")] + ".weight" in weight_targets:
            grouped.setdefault(key[: -len(".bias")] + ".weight", {})["bias"] = items
        else:
            warnings.append(f"{key}: no kohya module name for this tensor; its patch was not exported.")
    order = {k: i for i, k in enumerate(weight_targets)}
    for weight_key in sorted(grouped, key=lambda k: order.get(k, len(order))):
        parts = grouped[weight_key]
        yield (weight_targets[weight_key], weight_key, parts.get("weight", []), _bias_key(weight_key),
               parts.get("bias", []))


# ------------------------------------------------------------------------------------------- export

def _lowrank_run(patches: Sequence[WeightPatch], shape, device) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(U, D) with U @ D = Σ s_i ΔW_i (flattened) when every patch is a plain low-rank adapter, else None. A patch
    on part of a fused weight contributes its up rows at the rows it covers and zeros elsewhere (kohya stores a
    split-qkv LoRA the same way: one fused module with a block-structured up); column factors scale down."""
    ups, downs = [], []
    for patch in patches:
        factors = adapters.lowrank_factors(patch.module, torch.Size(patch.module_shape(shape)))
        if factors is None:
            return None
        up, down = factors
        up, down = up.to(device, F32), down.to(device, F32)
        if patch.rows is not None:
            placed = torch.zeros(shape[0], up.shape[1], dtype=F32, device=device)
            for dst, src, count in patch.rows:
                placed[dst:dst + count] = up[src:src + count]
            up = placed
        if patch.cols is not None:
            down = down.clone()
            per = down.shape[1] // (shape[1] if len(shape) > 1 else 1)
            for start, count, factor in patch.cols:
                down[:, start * per:(start + count) * per] *= factor
        ups.append(up * patch.strength)
        downs.append(down)
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def _dense_delta(name: str, patches: Sequence[WeightPatch], shape, base: Optional[torch.Tensor],
                 device) -> torch.Tensor:
    """Σ-in-order change of the weight as a dense fp32 matrix (engine semantics, so exact)."""
    dependent = [p.module for p in patches if not adapters.is_additive(p.module)]
    if dependent and base is None:
        module = dependent[0]
        algo = module.algo + ("+DoRA" if module.dora_scale is not None else "")
        raise LoraValueError(
            f"{name}: source module {module.name} is {algo}, whose change depends on the base model's weights. "
            f"Connect the base MODEL and CLIP to the merge node so it can be exported as an exact diff.")
    if not dependent:
        # Weight-independent adapters ignore W: their summed change is the engine's result on zeros (no
        # W + ΔW - W rounding).
        return patch_weight(torch.zeros(shape, dtype=F32, device=device), patches)
    original = base.detach().to(device, F32).reshape(shape)
    return patch_weight(original.clone(), patches).sub_(original)


def _export_weight(name: str, target: Target, patches, shape, base, mode, rank, energy, device, dtype,
                   tensors: dict) -> Optional[LayerResult]:
    run = _lowrank_run(patches, shape, device)
    if mode == "exact":
        if run is not None:
            up, down = run
            _store_lowrank(tensors, name, up, down, shape, dtype)
            full = up.shape[1]
            return LayerResult(name, target.component, target.path, "lowrank", full, full, 1.0, len(patches))
        diff = _dense_delta(name, patches, shape, base, device)
        if not torch.any(diff):
            return None
        tensors[f"{name}.diff"] = diff.to("cpu", dtype)
        return LayerResult(name, target.component, target.path, "diff", 0, min(shape[0], math.prod(shape[1:])),
                           1.0, len(patches))
    left, values, right = _top_svd(run, patches, name, shape, base, device, rank, energy)
    if values is None:
        return None
    kept_rank, kept_energy, full_rank = values
    _store_lowrank(tensors, name, left, right, shape, dtype)
    return LayerResult(name, target.component, target.path, "lowrank", kept_rank, full_rank, kept_energy,
                       len(patches))


def _store_lowrank(tensors: dict, name: str, up: torch.Tensor, down: torch.Tensor, shape, dtype) -> None:
    """kohya layout: down (r, in[, k, k]), up (out, r[, 1, 1]), alpha = r so the scale is 1."""
    r = down.shape[0]
    tensors[f"{name}.lora_up.weight"] = up.reshape(shape[0], r, *([1] * (len(shape) - 2))).to("cpu", dtype)
    tensors[f"{name}.lora_down.weight"] = down.reshape(r, *shape[1:]).to("cpu", dtype)
    tensors[f"{name}.alpha"] = torch.tensor(float(r), dtype=dtype)


def _top_svd(run, patches, name, shape, base, device, rank, energy):
    """(up, down, (kept rank, kept energy, full rank)) of the truncated SVD; values None when ΔW is zero."""
    out, cols = shape[0], math.prod(shape[1:])
    if run is not None and run[0].shape[1] < min(out, cols):
        left, s, right = _factored_svd(*run)
    else:
        matrix = run[0] @ run[1] if run is not None else _dense_delta(name, patches, shape, base, device)
        matrix = matrix.reshape(out, cols)
        left, s, right = _dense_svd(matrix, rank, energy)
        if s.numel() and s.shape[0] < min(out, cols):   # svd_lowrank: take the total from the matrix itself
            total = float(torch.linalg.matrix_norm(matrix).square())
            return _truncate(left, s, right, rank, energy, total, min(out, cols))
    total = float(s.square().sum())
    return _truncate(left, s, right, rank, energy, total, s.shape[0])


def _factored_svd(up: torch.Tensor, down: torch.Tensor):
    """SVD of up @ down (out x R times R x cols, R small) without forming it: orthonormal bases of both sides
    (thin SVDs; on CPU torch's QR is slower for these small tall matrices), then the SVD of the R x R core."""
    u_up, s_up, vh_up = torch.linalg.svd(up, full_matrices=False)
    u_down, s_down, vh_down = torch.linalg.svd(down.T, full_matrices=False)
    core = (s_up[:, None] * (vh_up @ vh_down.T)) * s_down[None, :]
    u, s, vh = torch.linalg.svd(core)
    return u_up @ u, s, vh @ u_down.T


def _dense_svd(matrix: torch.Tensor, rank: int, energy: float):
    side = min(matrix.shape)
    if energy == 0.0 and rank and side >= _LOWRANK_SVD_MIN_SIDE and rank * 4 < side:
        # Only the top `rank` directions are wanted: a randomized SVD is far cheaper on big weights.
        u, s, v = torch.svd_lowrank(matrix, q=min(side, rank + 16), niter=6)
        return u, s, v.T
    return torch.linalg.svd(matrix, full_matrices=False)


def _truncate(left, s, right, rank, energy, total, full_rank):
    if total <= 0.0 or s.numel() == 0 or float(s[0]) == 0.0:
        return None, None, None
    # Directions below float32 noise carry nothing; never store them.
    significant = int((s > s[0] * max(left.shape[0], right.shape[1]) * torch.finfo(F32).eps).sum())
    keep = max(1, significant)
    if energy > 0.0:
        cumulative = torch.cumsum(s.square(), 0) / total
        keep = min(keep, int((cumulative < energy - 1e-7).sum()) + 1)
    if rank:
        keep = min(keep, rank)
    root = s[:keep].sqrt()
    kept_energy = min(1.0, float(s[:keep].square().sum()) / total)
    return left[:, :keep] * root, (keep, kept_energy, int(min(full_rank, significant))), \
        root[:, None] * right[:keep]


# ------------------------------------------------------------------------------------------- metadata

def _modelspec_architecture(spec: ArchSpec, requests: Sequence[LoraRequest]) -> str:
    base = spec.metadata["modelspec.architecture"]
    if spec.name == "SD2":
        # Keep v-prediction SD2 (768-v) when a source says so.
        for request in requests:
            value = str(request.lora.metadata.get("modelspec.architecture", ""))
            if value.startswith("stable-diffusion-v2-768-v") or \
                    str(request.lora.metadata.get("ss_v_parameterization", "")) == "True":
                return "stable-diffusion-v2-768-v"
    return base


def _describe_request(request: LoraRequest, spec: ArchSpec) -> dict:
    entry = {"name": request.label, "strength_model": float(request.strength_model),
             "strength_clip": float(request.strength_clip)}
    title = request.lora.metadata.get("modelspec.title") or request.lora.metadata.get("ss_output_name")
    if title:
        entry["title"] = str(title)
    if request.block_weights is not None:
        entry["block_weights"] = describe_block_weights(request.block_weights, spec)
    return entry


def describe_block_weights(block_weights, spec: ArchSpec) -> dict:
    """A JSON-able record of a block-weight table (lora_core.blocks.BlockWeights): mode, vector as given, the
    factor of every block and any element-level overrides."""
    record: dict = {}
    for attr in ("mode", "vector"):
        value = getattr(block_weights, attr, None)
        if isinstance(value, str) and value:
            record[attr] = value
    factors = getattr(block_weights, "factors", None)
    if isinstance(factors, Mapping):
        record["factors"] = {block: float(value) for block, value in factors.items()}
    else:
        record["factors"] = {}
        for block in spec.blocks:
            try:
                record["factors"][block] = float(block_weights.factor(block))
            except Exception:   # a table that needs more than the block id: the summary is best effort
                continue
    for attr in ("element_factors", "sub_factors"):
        value = getattr(block_weights, attr, None)
        if value:
            record[attr] = json.loads(json.dumps(value, default=float))
    key_factors = getattr(block_weights, "key_factors", None)
    if key_factors:
        record["per_module_factors"] = len(key_factors)
    return record
