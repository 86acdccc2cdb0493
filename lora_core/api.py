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
from .engine import WeightPatch, check_strength
from .errors import LoraMatchError, LoraValueError
from .formats import ParsedLora, parse_modules
from .io import lora_metadata_summary
from .types import LoraFile, ModuleLora

log = logging.getLogger("lora_core")

UNET = "unet"
TEXT_ENCODERS = ("te1", "te2")

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


def _fit_check(report: LoadReport, total: int, label: str) -> None:
    """Refuse a LoRA that does not fit; warn loudly on a partial fit. Never silent."""
    if total == 0:
        raise LoraMatchError(f"{label}: the file holds no LoRA modules that LoRA Core can use "
                             f"({len(report.unused_keys)} unused keys). Is it a LoRA file?")
    matched = report.matched
    if matched == 0 or matched / total < MIN_MATCHED_SHARE:
        examples = "; ".join(f"{n}: {why}" for n, why in report.unmatched[:3])
        raise LoraMatchError(
            f"{label}: only {matched} of {total} LoRA modules match this {report.model_arch or 'model'} "
            f"model, so the LoRA was made for a different architecture. Pick a LoRA made for this base "
            f"model. Examples: {examples}")
    if report.unmatched:
        report.warnings.append(f"{len(report.unmatched)} of {total} modules did not match this model and were "
                               f"not applied (listed above).")
    if report.unused_keys:
        report.warnings.append(f"{len(report.unused_keys)} file keys were not understood and not applied.")


def plan_lora(request: LoraRequest, key_map, shapes: Mapping[str, torch.Size],
              components: Sequence[str]) -> tuple[dict[str, list[WeightPatch]], LoadReport]:
    """Resolve one LoRA against a model.

    `key_map` is a lora_core.arch KeyMap for the host; `shapes` maps host tensor keys to their shapes
    (used to refuse shape mismatches before anything is patched); `components` lists what the host has
    loaded right now (e.g. ("unet",) for a model-only load).
    """
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
            skip_reason[component] = "no CLIP connected" if component in TEXT_ENCODERS else "component not loaded"
            continue
        strength = strength_model if component == UNET else strength_clip
        if strength == 0.0:
            skipped[component] += 1
            skip_reason[component] = "strength 0"
            continue
        factor = 1.0
        if request.block_weights is not None:
            factor = request.block_weights.factor(target.block, target.kind, target.path)
        if factor == 0.0:
            report.zero_factor += 1
            continue
        weight_shape = shapes.get(target.host_key)
        if weight_shape is None:
            report.unmatched.append((name, f"maps to {target.host_key}, which this model does not have"))
            continue
        adapters.validate(module, weight_shape, target.host_key)
        patches.setdefault(target.host_key, []).append(WeightPatch(module, strength * factor))
        if module.bias_diff is not None:
            bias_key = _bias_key(target.host_key)
            if bias_key in shapes:
                patches.setdefault(bias_key, []).append(WeightPatch(module, strength * factor, "bias"))
            else:
                report.warnings.append(f"{name}: has a bias delta but {target.host_key} has no bias")
        report.applied[component] += 1
    report.skipped = {c: (n, skip_reason[c]) for c, n in skipped.items()}
    _fit_check(report, len(parsed.modules), label)
    for warning in report.warnings:
        log.warning("LoRA Core: %s: %s", label, warning)
    return patches, report


def _bias_key(weight_key: str) -> str:
    return weight_key[: -len(".weight")] + ".bias" if weight_key.endswith(".weight") else weight_key + ".bias"


def plan_stack(requests: Sequence[LoraRequest], key_map, shapes: Mapping[str, torch.Size],
               components: Sequence[str]) -> Plan:
    """One plan for a whole stack: per host tensor, every LoRA's patch in stack order (fused by the engine)."""
    merged: dict[str, list[WeightPatch]] = {}
    reports = []
    for request in requests:
        patches, report = plan_lora(request, key_map, shapes, components)
        for key, items in patches.items():
            merged.setdefault(key, []).extend(items)
        reports.append(report)
    return Plan(merged, reports)


class LoraPatcher:
    """LoRA on a plain PyTorch / diffusers model, without ComfyUI.

        patcher = LoraPatcher(unet=pipe.unet, text_encoder=pipe.text_encoder)
        report = patcher.apply([LoraRequest(read_lora_file("style.safetensors"), 0.8, 0.8)])
        ...                       # sample
        patcher.restore()         # bit-exact

    `apply` replaces whatever was applied before (only changed tensors are recomputed, from one backup);
    it validates everything first and patches all-or-nothing.
    """

    PREFIXES = {"unet": "unet.", "te1": "text_encoder.", "te2": "text_encoder_2."}

    def __init__(self, unet: Optional[torch.nn.Module] = None, text_encoder: Optional[torch.nn.Module] = None,
                 text_encoder_2: Optional[torch.nn.Module] = None, backup_device=None):
        from .arch import bind_diffusers_unet, bind_transformers_clip, build_key_map
        from .engine import PatchEngine

        tensors: dict[str, torch.Tensor] = {}
        bindings = []
        for component, module in (("unet", unet), ("te1", text_encoder), ("te2", text_encoder_2)):
            if module is None:
                continue
            prefix = self.PREFIXES[component]
            state = module.state_dict(keep_vars=True)
            tensors.update({prefix + k: v for k, v in state.items()})
            shapes = {k: v.shape for k, v in state.items()}
            if component == "unet":
                bindings.append(bind_diffusers_unet(shapes, key_prefix=prefix))
            else:
                bindings.append(bind_transformers_clip(shapes, component, key_prefix=prefix))
        if not bindings:
            raise LoraValueError("LoraPatcher needs at least one of unet, text_encoder, text_encoder_2.")
        self.key_map = build_key_map(*bindings)
        self.shapes = {k: v.shape for k, v in tensors.items()}
        self.engine = PatchEngine(tensors, backup_device=backup_device)

    def plan(self, requests: Sequence[LoraRequest]) -> Plan:
        return plan_stack(requests, self.key_map, self.shapes, self.key_map.components)

    def apply(self, requests: Sequence[LoraRequest]) -> Plan:
        plan = self.plan(requests)
        self.engine.apply(plan.patches)
        return plan

    def restore(self) -> None:
        self.engine.restore()
