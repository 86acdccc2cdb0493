"""Public entry points: resolve LoRA files against a model and build one patch plan for a whole stack.

The flow is file -> ParsedLora (formats) -> targets (arch KeyMap) -> WeightPatches with strength x block
factor -> a plan {host tensor key: [WeightPatch, ...]} that the engine (or ComfyUI's ModelPatcher, through
nodes/_patches.py) applies. A LoadReport travels with every LoRA: nothing is dropped silently.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch

from . import adapters
from .engine import WeightPatch, check_overflow, check_strength
from .errors import LoraMatchError, LoraValueError
from .formats import ParsedLora, parse_modules
from .io import lora_metadata_summary
from .types import LoraFile, ModuleLora

log = logging.getLogger("lora_core")

UNET = "unet"


def is_text_encoder(component: str) -> bool:
    """Text-encoder components are te1, te2, ...; everything else is the denoiser (unet / transformer)."""
    return component.startswith("te")


# Below this share of matched modules a LoRA is refused: it was made for another model (an SDXL LoRA on
# SD1.5 matches almost nothing). Between this and 100% the load goes on with a loud warning.
MIN_MATCHED_SHARE = 0.5


@dataclass
class LoraRequest:
    """One LoRA of a stack: the file, its two strengths and optional block weights (lora_core.blocks)."""

    lora: LoraFile
    strength_model: float = 1.0
    strength_clip: float = 1.0
    block_weights: Optional[object] = None  # lora_core.blocks.BlockWeights
    name: Optional[str] = None

    @property
    def label(self) -> str:
        return self.name or self.lora.label


@dataclass
class LoadReport:
    """What happened to one LoRA file: shown by the nodes, logged to the console."""

    name: str
    writer: str = ""
    model_arch: str = ""
    algorithms: Counter = field(default_factory=Counter)
    ranks: Counter = field(default_factory=Counter)
    alphas: Counter = field(default_factory=Counter)
    strengths: dict = field(default_factory=dict)
    applied: Counter = field(default_factory=Counter)        # component -> modules patched
    skipped: dict = field(default_factory=dict)              # component -> (count, why)
    zero_factor: int = 0                                     # modules whose block factor is 0
    unmatched: list = field(default_factory=list)            # (module name, reason)
    unused_keys: list = field(default_factory=list)          # (file key, reason)
    metadata: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)

    @property
    def matched(self) -> int:
        return sum(self.applied.values()) + sum(n for n, _ in self.skipped.values()) + self.zero_factor

    def text(self, max_list: int = 12) -> str:
        lines = [f"LoRA: {self.name}"]
        if self.writer:
            lines.append(f"  format: {self.writer}; model: {self.model_arch or 'unknown'}")
        if self.algorithms:
            lines.append("  algorithms: " + ", ".join(f"{a} x{n}" for a, n in sorted(self.algorithms.items())))
        if self.ranks:
            lines.append("  rank: " + ", ".join(str(r) for r in sorted(self.ranks)))
        if self.alphas:
            lines.append("  alpha: " + ", ".join(f"{a:g}" for a in sorted(self.alphas)))
        if self.strengths:
            lines.append("  strength: " + ", ".join(f"{k} {v:g}" for k, v in self.strengths.items()))
        applied = ", ".join(f"{c} {n}" for c, n in sorted(self.applied.items())) or "none"
        lines.append(f"  applied modules: {applied}")
        for component, (count, why) in sorted(self.skipped.items()):
            lines.append(f"  not applied: {component} {count} ({why})")
        if self.zero_factor:
            lines.append(f"  skipped by block factor 0: {self.zero_factor}")
        for label, items in (("unmatched modules", self.unmatched), ("unused file keys", self.unused_keys)):
            if items:
                lines.append(f"  {label}: {len(items)}")
                lines.extend(f"    {name}: {why}" for name, why in items[:max_list])
                if len(items) > max_list:
                    lines.append(f"    ... and {len(items) - max_list} more")
        for key in ("base_model", "trigger_words", "title", "output_name"):
            value = self.metadata.get(key)
            if value:
                shown = ", ".join(value) if isinstance(value, (list, tuple)) else str(value)
                lines.append(f"  {key.replace('_', ' ')}: {shown}")
        lines.extend(f"  WARNING: {w}" for w in self.warnings)
        return "\n".join(lines)


@dataclass
class Plan:
    """Patches for every host tensor plus one report per LoRA, in stack order."""

    patches: dict[str, list[WeightPatch]]
    reports: list[LoadReport]

    def text(self) -> str:
        return "\n\n".join(r.text() for r in self.reports) if self.reports else "No LoRA applied."


def _describe_modules(parsed: ParsedLora, report: LoadReport) -> None:
    for module in parsed.modules.values():
        report.algorithms[module.algo + ("+dora" if module.dora_scale is not None else "")] += 1
        down = module.tensors.get("down")
        if down is not None:
            report.ranks[int(down.shape[0])] += 1
        if module.alpha is not None:
            report.alphas[float(module.alpha)] += 1


def _made_for(lora, arch, report: LoadReport) -> str:
    """The sentence 'This LoRA was made for X; the model is Y.' (with a leading space) when the file names
    (metadata) or resembles (keys, shapes) another variant than the model's, else ""."""
    if lora is None:
        return ""
    from .arch import detect_lora, registry

    file_arch = detect_lora(lora)
    made_for = file_arch.title if file_arch is not None and file_arch is not arch else None
    if file_arch is None:   # no variant fits its shapes: its key marks may still name the family
        family = registry.family_of_marks(parse_modules(lora).modules)
        if family is not None and family is not getattr(arch, "family", None):
            made_for = family.title
    if made_for is None:
        return ""
    return f" This LoRA was made for {made_for}; the model is {report.model_arch or 'another model'}."


def _fit_check(report: LoadReport, total: int, label: str, lora=None, arch=None) -> None:
    """Refuse a LoRA that does not fit; warn loudly on a partial fit. Never silent."""
    if total == 0:
        raise LoraMatchError(f"{label}: the file holds no LoRA modules that LoRA Core can use "
                             f"({len(report.unused_keys)} unused keys). Is it a LoRA file?")
    matched = report.matched
    examples = "; ".join(f"{n}: {why}" for n, why in report.unmatched[:3])
    if matched == 0 or matched / total < MIN_MATCHED_SHARE:
        made_for = _made_for(lora, arch, report)
        raise LoraMatchError(
            f"{label}: only {matched} of {total} LoRA modules match this {report.model_arch or 'model'} "
            f"model, so the LoRA was made for a different architecture.{made_for} Pick a LoRA made for this base "
            f"model. Examples: {examples}")
    if report.unmatched and lora is not None and arch is not None:
        # A partial fit through names two families share (diffusers' `transformer_blocks.N.attn.to_q` is Flux's,
        # SD3's and Qwen-Image's) of a file whose module names are another family's: refused like a misfit.
        from .arch import detect_lora

        by_keys = detect_lora(lora, use_metadata=False)
        if by_keys is not None and by_keys.family is not arch.family:
            raise LoraMatchError(
                f"{label}: {matched} of {total} LoRA modules match this {report.model_arch or 'model'} model only "
                f"through names both families use; the file's module names are those of {by_keys.title}. This "
                f"LoRA was made for {by_keys.title}; the model is {report.model_arch or 'another model'}. Pick a "
                f"LoRA made for this base model. Examples: {examples}")
    if lora is not None and arch is not None:
        # Families whose blocks coincide in names and shapes (Flux.1 and HunyuanVideo): a file decisively the
        # other family's is refused even when every module fits.
        from .arch import registry

        other = registry.confusable_family(lora, arch)
        if other is not None:
            model = report.model_arch or "model"
            why = ("its metadata names it" if registry.arch_of_metadata(lora.metadata) is other else
                   "its module names and block depths are that family's")
            raise LoraMatchError(
                f"{label}: its modules fit this {model} model by name and shape ({other.family.title} and "
                f"{arch.family.title} share their block names), but {why}. This LoRA was made for {other.title}; "
                f"the model is {model}. Pick a LoRA made for this base model.")
    if report.unmatched:
        report.warnings.append(f"{len(report.unmatched)} of {total} modules did not match this model and were "
                               f"not applied (listed above).")
    if report.unused_keys:
        report.warnings.append(f"{len(report.unused_keys)} file keys were not understood and not applied.")


def plan_lora(request: LoraRequest, key_map, shapes: Mapping[str, torch.Size],
              components: Sequence[str]) -> tuple[dict[str, list[WeightPatch]], LoadReport]:
    """Resolve one LoRA against a model.

    `key_map` is a lora_core.arch KeyMap for the host; `shapes` maps host tensor keys to their (logical) shapes
    (used to refuse shape mismatches before anything is patched); `components` lists what the host has loaded
    right now (e.g. ("unet",) for a model-only load)."""
    label = request.label
    strength_model = check_strength(request.strength_model, f"{label}: strength_model")
    strength_clip = check_strength(request.strength_clip, f"{label}: strength_clip")
    parsed = parse_modules(request.lora)
    arch = getattr(key_map, "arch", None)
    report = LoadReport(name=label, writer=parsed.writer, model_arch=getattr(arch, "title", None) or getattr(arch, "name", ""))
    report.unused_keys = list(parsed.unused)
    report.metadata = lora_metadata_summary(request.lora)
    report.strengths = {"model": strength_model, "clip": strength_clip}
    _describe_modules(parsed, report)

    patches: dict[str, list[WeightPatch]] = {}
    skipped: Counter = Counter()
    skip_reason: dict[str, str] = {}
    for name, module in parsed.modules.items():
        target = key_map.resolve(name)
        if target is None:
            report.unmatched.append((name, key_map.explain_unmatched(name)))
            continue
        component = target.component
        if component not in components:
            skipped[component] += 1
            skip_reason[component] = getattr(key_map, "absent", {}).get(component) or (
                "no CLIP connected" if is_text_encoder(component) else "component not loaded")
            continue
        strength = strength_clip if is_text_encoder(component) else strength_model
        if strength == 0.0:
            skipped[component] += 1
            skip_reason[component] = "strength 0"
            continue
        try:
            planned = _target_patches(request, module, target, strength, shapes, report)
        except LoraMatchError as error:   # a shape that does not fit: say which model the file was made for
            made_for = _made_for(request.lora, arch, report)
            if not made_for:
                raise
            raise LoraMatchError(f"{error}{made_for}") from None
        if planned is None:
            continue
        if not planned:
            report.zero_factor += 1
            continue
        for key, patch in planned:
            patches.setdefault(key, []).append(patch)
        report.applied[component] += 1
    report.skipped = {c: (n, skip_reason[c]) for c, n in skipped.items()}
    _fit_check(report, len(parsed.modules), label, request.lora, arch)
    for warning in report.warnings:
        log.warning("LoRA Core: %s: %s", label, warning)
    return patches, report


def _factor(request: LoraRequest, target, kind: str) -> float:
    if request.block_weights is None:
        return 1.0
    return float(request.block_weights.factor(target.block, kind, target.path))


def _target_patches(request: LoraRequest, module, target, strength: float, shapes, report):
    """[(host key, WeightPatch)] of one module on one target (weight, then its bias delta); [] when every block
    factor is 0; None when the target's tensor is missing (reported)."""
    out = []
    if target.pieces is None:
        weight_shape = shapes.get(target.host_key)
        if weight_shape is None:
            report.unmatched.append((module.name, f"maps to {target.host_key}, which this model does not have"))
            return None
        factor, cols = _factor(request, target, target.kind), None
        if target.col_parts and request.block_weights is not None:
            col_factors = [_factor(request, target, part.kind) for part in target.col_parts]
            if len(set(col_factors)) > 1:
                cols = tuple((part.start, part.length, f) for part, f in zip(target.col_parts, col_factors))
                factor = 1.0
            else:
                factor = col_factors[0]
        if factor == 0.0:
            return []
        adapters.validate(module, weight_shape, target.host_key)
        out.append((target.host_key, WeightPatch(module, strength * factor, cols=cols)))
    else:
        by_key: dict[tuple[str, float], list] = {}
        for piece in target.pieces:
            factor = _factor(request, target, piece.kind)
            if factor != 0.0:
                by_key.setdefault((piece.host_key, factor), []).append((piece.dst, piece.src, piece.length))
        if not by_key:
            return []
        for (key, factor), rows in by_key.items():
            weight_shape = shapes.get(key)
            if weight_shape is None:
                report.unmatched.append((module.name, f"maps to {key}, which this model does not have"))
                return None
            patch = WeightPatch(module, strength * factor, rows=tuple(rows), module_rows=target.module_rows)
            adapters.validate(module, torch.Size(patch.module_shape(weight_shape)), key)
            out.append((key, patch))
    if module.bias_diff is not None:
        for key, patch in list(out):
            bias_key = _bias_key(key)
            if bias_key in shapes:
                out.append((bias_key, WeightPatch(module, patch.strength, "bias", patch.rows, patch.module_rows)))
            else:
                report.warnings.append(f"{module.name}: has a bias delta but {key} has no bias")
    return out


def _bias_key(weight_key: str) -> str:
    return weight_key[: -len(".weight")] + ".bias" if weight_key.endswith(".weight") else weight_key + ".bias"


def plan_stack(requests: Sequence[LoraRequest], key_map, shapes: Mapping[str, torch.Size],
               components: Sequence[str], tensors: Optional[Mapping[str, torch.Tensor]] = None) -> Plan:
    """One plan for a whole stack: per host tensor, every LoRA's patch in stack order (fused by the engine).

    `tensors` (host key -> the live weight), when given, lets the plan refuse a stack whose result would not fit
    a weight's dtype (an fp16 weight overflows past 65504) before anything is patched (`check_overflow`)."""
    merged: dict[str, list[WeightPatch]] = {}
    reports = []
    for request in requests:
        patches, report = plan_lora(request, key_map, shapes, components)
        for key, items in patches.items():
            merged.setdefault(key, []).extend(items)
        reports.append(report)
    if tensors is not None:
        check_overflow(merged, tensors)
    return Plan(merged, reports)





class LoraPatcher:
    """LoRA on a plain PyTorch / diffusers model, without ComfyUI.

        patcher = LoraPatcher(unet=pipe.unet, text_encoder=pipe.text_encoder)            # SD1/SD2/SDXL
        patcher = LoraPatcher(transformer=pipe.transformer, text_encoder=pipe.text_encoder,
                              text_encoder_2=pipe.text_encoder_2)                         # Flux, ...
        report = patcher.apply([LoraRequest(read_lora_file("style.safetensors"), 0.8, 0.8)])
        ...                       # sample
        patcher.restore()         # bit-exact

    Keyword names are diffusers' pipeline attributes. `apply` replaces whatever was applied before (only
    changed tensors are recomputed, from one backup); it validates everything first and patches all-or-nothing.
    A fused LoRA module (kohya's Flux `img_attn.qkv`) lands on the split diffusers weights (`to_q`, `to_k`,
    `to_v`) it covers.
    """

    PREFIXES = {"unet": "unet.", "transformer": "transformer.", "te1": "text_encoder.", "te2": "text_encoder_2.",
                "te3": "text_encoder_3."}

    def __init__(self, unet: Optional[torch.nn.Module] = None, text_encoder: Optional[torch.nn.Module] = None,
                 text_encoder_2: Optional[torch.nn.Module] = None, backup_device=None, *,
                 transformer: Optional[torch.nn.Module] = None, text_encoder_3: Optional[torch.nn.Module] = None):
        from .arch import bind_diffusers, bind_transformers_clip, build_key_map
        from .engine import PatchEngine

        if unet is not None and transformer is not None:
            raise LoraValueError("LoraPatcher takes a unet or a transformer (the model's denoiser), not both.")
        tensors: dict[str, torch.Tensor] = {}
        bindings = []
        arch = None
        denoiser = unet if unet is not None else transformer
        if denoiser is not None:
            prefix = self.PREFIXES["unet" if unet is not None else "transformer"]
            state = denoiser.state_dict(keep_vars=True)
            tensors.update({prefix + k: v for k, v in state.items()})
            binding = bind_diffusers({k: v.shape for k, v in state.items()}, key_prefix=prefix)
            bindings.append(binding)
            arch = binding.arch
        for component, module in (("te1", text_encoder), ("te2", text_encoder_2), ("te3", text_encoder_3)):
            if module is None:
                continue
            prefix = self.PREFIXES[component]
            state = module.state_dict(keep_vars=True)
            tensors.update({prefix + k: v for k, v in state.items()})
            encoder = arch.text_encoders.get(component) if arch is not None else None
            bindings.append(bind_transformers_clip({k: v.shape for k, v in state.items()}, component, encoder,
                                                   key_prefix=prefix, arch=arch))
        if not bindings:
            raise LoraValueError("LoraPatcher needs at least one of unet / transformer, text_encoder, "
                                 "text_encoder_2, text_encoder_3.")
        self.key_map = build_key_map(*bindings)
        self.shapes = {k: v.shape for k, v in tensors.items()}
        self.engine = PatchEngine(tensors, backup_device=backup_device)

    def plan(self, requests: Sequence[LoraRequest]) -> Plan:
        return plan_stack(requests, self.key_map, self.shapes, self.key_map.components, self.engine.tensors)

    def apply(self, requests: Sequence[LoraRequest]) -> Plan:
        plan = self.plan(requests)
        self.engine.apply(plan.patches)
        return plan

    def restore(self, release: bool = False) -> None:
        """Original weights back, bit-exact. CPU backup memory stays for the next apply unless `release`
        (PatchEngine.restore)."""
        self.engine.restore(release=release)
