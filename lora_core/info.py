"""What a LoRA file is, without a model: format, algorithms, family and variant, rank / alpha per module group,
blocks with the size of their change, metadata (trigger words and tag frequencies, base model, training
settings); with a model (a checkpoint as `lora_core.checkpoint.WeightSource`), the loader's fit report.

`inspect_lora(lora) -> dict` (JSON-able; the command's `inspect --json`), `inspect_text(info)` for people,
`plot_blocks(info, path)` for a bar chart of per-block ||ΔW|| (matplotlib).

Per-module ||ΔW||_F is the change at strength 1: for a plain LoRA from its factors without forming ΔW
(``||s U D||² = s² Σ (UᵀU) ⊙ (D Dᵀ)``); for other weight-independent adapters (LoHa, LoKr, Tucker, diffs) from
the adapter's delta on a zero weight of its natural shape. Adapters whose change depends on the base weight
(DoRA, OFT, BOFT, GLoRA, (IA)³) have no size without a model and are counted under `needs_base`. A block's norm
is ``sqrt(Σ ||ΔW_m||²)`` over its modules.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Optional

import torch

from . import adapters
from .formats import parse_modules
from .io import _json, lora_metadata_summary
from .types import LoraFile, ModuleLora

TRAINING_KEYS = ("steps", "epochs", "num_train_images", "learning_rate", "unet_lr", "text_encoder_lr",
                 "optimizer", "lr_scheduler", "clip_skip", "mixed_precision", "seed", "noise_offset",
                 "min_snr_gamma", "resolution", "network_module", "network_args", "prediction_type", "trained_at",
                 "sd_model_name", "training_comment")


def module_norm(module: ModuleLora) -> Optional[float]:
    """||ΔW||_F of one module at strength 1, or None when it depends on the base weight."""
    if not adapters.is_additive(module):
        return None
    if module.algo == "lora" and "mid" not in module.tensors:
        up = module.tensors["up"].float().reshape(module.tensors["up"].shape[0], -1)
        down = module.tensors["down"].float().reshape(module.tensors["down"].shape[0], -1)
        rank = down.shape[0]
        scale = (module.alpha / rank) if module.alpha is not None else 1.0
        gram = (up.T @ up) * (down @ down.T)
        return abs(scale) * math.sqrt(max(float(gram.sum()), 0.0))
    shape = adapters.natural_shape(module)
    delta = adapters.delta(module, torch.zeros(shape, dtype=torch.float32))
    return float(torch.linalg.vector_norm(delta))


def _key_map_for(lora: LoraFile, arch=None):
    """(layout KeyMap, variant or None, family or None). When the variant cannot be told (SD1 vs SD2 by names
    alone, a tiny or pruned model), the family's layout still gives blocks and kinds."""
    from .arch import detect_lora, get_arch, layout_key_map
    from .convert import naming_arch
    from .errors import LoraMatchError

    spec = get_arch(arch) if arch else detect_lora(lora)
    if spec is not None:
        return layout_key_map(spec), spec, spec.family
    try:
        naming = naming_arch(lora)
    except LoraMatchError:
        return None, None, None
    return layout_key_map(naming), None, naming.family


def inspect_lora(lora: LoraFile, arch=None, model=None) -> dict:
    """Everything `lora-core inspect` shows, as a JSON-able dict (see the module docstring). `arch` forces a
    variant ("sdxl", "flux", ...); `model` is a WeightSource (a checkpoint) for the fit report."""
    from .arch import registry

    parsed = parse_modules(lora)
    key_map, spec, family = _key_map_for(lora, arch)
    info: dict = {"path": lora.path, "format": parsed.writer, "tensors": len(lora.tensors),
                  "modules": len(parsed.modules)}
    algos: Counter = Counter()
    for module in parsed.modules.values():
        algos[module.algo + ("+dora" if module.dora_scale is not None else "")] += 1
    info["algorithms"] = dict(sorted(algos.items()))
    info["family"] = family.name if family is not None else None
    info["family_title"] = family.title if family is not None else None
    info["variant"] = spec.name if spec is not None else None
    info["variant_title"] = spec.title if spec is not None else None
    info["layout"] = key_map.arch.name if key_map is not None else None
    info["variant_source"] = ("metadata" if spec is not None and registry.arch_of_metadata(lora.metadata) is spec
                              else "keys" if spec is not None else None)

    groups: dict = {}
    block_norm2: dict = {}
    block_modules: Counter = Counter()
    needs_base: Counter = Counter()
    unmatched = []
    order = {b: i for i, b in enumerate(key_map.arch.blocks)} if key_map is not None else {}
    for name, module in parsed.modules.items():
        target = key_map.resolve(name) if key_map is not None else None
        if target is None:
            unmatched.append([name, key_map.explain_unmatched(name) if key_map is not None else
                              "the file's model family is unknown"])
            component, kind, block = "?", "?", "?"
        else:
            component, kind, block = target.component, target.kind, target.block
        group = groups.setdefault((component, kind), {"component": component, "kind": kind, "modules": 0,
                                                      "algorithms": Counter(), "ranks": Counter(),
                                                      "alphas": Counter()})
        group["modules"] += 1
        group["algorithms"][module.algo] += 1
        down = module.tensors.get("down")
        if down is not None:
            group["ranks"][int(down.shape[0])] += 1
        if module.alpha is not None:
            group["alphas"][float(module.alpha)] += 1
        norm = module_norm(module)
        block_modules[block] += 1
        if norm is None:
            needs_base[block] += 1
        else:
            block_norm2[block] = block_norm2.get(block, 0.0) + norm * norm
    info["groups"] = [{**g, "algorithms": dict(g["algorithms"]),
                       "ranks": {str(k): v for k, v in sorted(g["ranks"].items())},
                       "alphas": {f"{k:g}": v for k, v in sorted(g["alphas"].items())}}
                      for g in groups.values()]
    info["blocks"] = [{"block": b, "modules": block_modules[b],
                       "norm": math.sqrt(block_norm2[b]) if b in block_norm2 else None,
                       "needs_base": needs_base.get(b, 0)}
                      for b in sorted(block_modules, key=lambda b: (order.get(b, len(order)), b))]
    info["unmatched"] = unmatched
    info["unused_keys"] = [list(x) for x in parsed.unused]
    summary = lora_metadata_summary(lora)
    frequencies = _tag_frequencies(lora.metadata)
    info["metadata"] = {
        "base_model": summary.get("base_model", ""),
        "base_model_source": summary.get("base_model_source", ""),
        "title": summary.get("title"),
        "trigger_words": summary.get("trigger_words", []),
        "tag_frequencies": frequencies,
        "rank": summary.get("rank"), "alpha": summary.get("alpha"),
        "training": {k: summary[k] for k in TRAINING_KEYS if k in summary},
    }
    info["raw_metadata_keys"] = sorted(lora.metadata)
    if model is not None:
        info["fit"] = fit_report(lora, model)
    return info


def _tag_frequencies(metadata) -> list:
    """[[tag, count], ...] over every dataset folder of kohya's ss_tag_frequency, most frequent first."""
    frequency = _json(metadata.get("ss_tag_frequency"))
    counts: Counter = Counter()
    if isinstance(frequency, dict):
        for tags in frequency.values():
            if isinstance(tags, dict):
                for tag, count in tags.items():
                    if isinstance(count, (int, float)) and str(tag).strip():
                        counts[str(tag).strip()] += int(count)
    return [[t, c] for t, c in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]


def fit_report(lora: LoraFile, model) -> dict:
    """The loader's report of this LoRA on a model (a WeightSource): applied per component, unmatched with
    reasons, warnings, and the text the loader prints. A LoRA that does not fit gives `error` instead."""
    from .api import LoraRequest, plan_lora
    from .checkpoint import bind_source
    from .errors import LoraMatchError

    key_map = bind_source(model)
    try:
        _, report = plan_lora(LoraRequest(lora, 1.0, 1.0), key_map, model.shapes, key_map.components)
    except LoraMatchError as error:
        return {"fits": False, "model": key_map.arch.title if key_map.arch else None, "error": str(error)}
    return {"fits": not report.unmatched, "model": report.model_arch, "applied": dict(report.applied),
            "skipped": {c: list(v) for c, v in report.skipped.items()},
            "unmatched": [list(x) for x in report.unmatched], "unused_keys": [list(x) for x in report.unused_keys],
            "warnings": list(report.warnings), "text": report.text()}


def inspect_text(info: dict) -> str:
    lines = [f"LoRA: {info['path']}",
             f"  format: {info['format']}; {info['modules']} modules, {info['tensors']} tensors",
             "  algorithms: " + (", ".join(f"{a} x{n}" for a, n in info["algorithms"].items()) or "none"),
             f"  model: {info['variant_title'] or 'variant unknown (pass --family)'}"
             + (f" ({info['family_title']} family, from {info['variant_source']})" if info["variant"] else
                f" ({info['family_title']} family by its names)" if info["family"] else "")]
    lines.append("  module groups (component / kind: modules, ranks, alphas):")
    for g in info["groups"]:
        ranks = ", ".join(f"{r} x{n}" for r, n in g["ranks"].items()) or "-"
        alphas = ", ".join(f"{a} x{n}" for a, n in g["alphas"].items()) or "-"
        lines.append(f"    {g['component']:<11} {g['kind']:<16} {g['modules']:>4}  rank {ranks}; alpha {alphas}")
    lines.append("  blocks touched (||ΔW|| at strength 1):")
    peak = max((b["norm"] or 0.0 for b in info["blocks"]), default=0.0) or 1.0
    for b in info["blocks"]:
        norm = b["norm"]
        bar = "#" * int(round(30 * (norm or 0.0) / peak))
        shown = f"{norm:10.4f}" if norm is not None else "         -"
        extra = f" (+{b['needs_base']} need the base model)" if b["needs_base"] else ""
        lines.append(f"    {b['block']:<7} {b['modules']:>4} modules {shown} {bar}{extra}")
    meta = info["metadata"]
    lines.append(f"  base model: {meta['base_model'] or 'unknown'}"
                 + (f" (from {meta['base_model_source']})" if meta["base_model_source"] else ""))
    if meta.get("title"):
        lines.append(f"  title: {meta['title']}")
    lines.append("  trigger words: " + (", ".join(meta["trigger_words"]) or "none recorded"))
    if meta["tag_frequencies"]:
        lines.append("  tag frequencies: " + ", ".join(f"{t} ({c})" for t, c in meta["tag_frequencies"][:15])
                     + (f", ... {len(meta['tag_frequencies']) - 15} more" if len(meta["tag_frequencies"]) > 15 else ""))
    for key, value in meta["training"].items():
        lines.append(f"  {key.replace('_', ' ')}: {value}")
    if info["unmatched"]:
        lines.append(f"  modules no layout of this family names: {len(info['unmatched'])}")
        lines.extend(f"    {n}: {why}" for n, why in info["unmatched"][:10])
    if info["unused_keys"]:
        lines.append(f"  unused keys: {len(info['unused_keys'])}")
        lines.extend(f"    {k}: {why}" for k, why in info["unused_keys"][:10])
    fit = info.get("fit")
    if fit is not None:
        lines.append("  fit on the model:")
        lines.append("    " + (fit.get("text") or fit.get("error", "")).replace("\n", "\n    "))
    return "\n".join(lines)


def plot_blocks(info: dict, path: str) -> str:
    """A bar chart of per-block ||ΔW|| as PNG. Raises ImportError when matplotlib is not installed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = [b for b in info["blocks"] if b["norm"] is not None]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(blocks) + 2), 3.5))
    ax.bar([b["block"] for b in blocks], [b["norm"] for b in blocks], color="#3b7dd8")
    ax.set_ylabel("||ΔW|| (strength 1)")
    ax.set_title(f"{info['path']} ({info['variant_title'] or 'unknown model'})", fontsize=9)
    ax.tick_params(axis="x", rotation=90, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
