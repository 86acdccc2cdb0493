"""Block analysis nodes: what a LoRA touches per block (with ‖ΔW‖ bars), a block sweep that feeds one KSampler
with a list of models, and a grid of the rendered images with difference heatmaps against the baseline.

Public contract: node ids, input names and widget order never change; new inputs go at the end.

Decisions:
* Sweep: entry 0 is the baseline "every block = base"; then, per UNet block the file touches on this model
  (layout order), "every block = base, this block = value" (base 1 / value 0 knocks one block out; base 0 /
  value 1 solos it). Or, with sweep = "vectors", one entry per line of `vectors` (a preset name such as
  `a1111/INS` or a vector in `mode` syntax). The sweep is model-only: text-encoder blocks are not patched.
* Grid: the first image is the baseline; every other tile shows its label, mean |Δ| to the baseline in %, and
  the share of pixels whose |Δ| exceeds `threshold` (A1111's "effective block" number). Heatmaps share one
  colour scale (the largest difference in the sweep), so tiles compare with each other.
* Block info: per block, the number of modules and file keys, and ‖ΔW‖_F at strength 1: sqrt of the summed
  squared Frobenius norms of the block's module deltas. With a model connected the deltas are computed on
  its current weights (every algorithm); without one, weight-independent adapters (LoRA/LoCon, LoHa, LoKr,
  full) are computed shape-only and weight-dependent ones (DoRA, OFT, (IA)3, GLoRA) are shown as n/a. A
  quantised weight whose values cannot be read as they are (packed GGUF storage) is treated the same way.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from lora_core import adapters
from lora_core.api import LoraRequest
from lora_core.arch import ARCHS, detect_lora, get_arch, layout_key_map
from lora_core.errors import LoraValueError
from lora_core.formats import parse_modules
from lora_core.io import lora_metadata_summary
from lora_core.weights import holds_values

from ._host import HostModels, load_lora, lora_names
from .block_weight import (CATEGORY, MODE_TIP, MODES, BlockSettings, USER, resolve_block_weights,
                           touched_blocks)
from .loader import MODEL_TIP, STRENGTH

AUTO = "auto"
TE_BLOCK_PREFIX = "TE"


# ------------------------------------------------------------------------------------------------ info

def _natural_shape(module) -> Optional[tuple]:
    """The shape a weight-independent adapter produces, from its own tensors (no model needed)."""
    try:
        return tuple(adapters.natural_shape(module))
    except Exception:
        return None


def _module_delta_norm(module, weight: Optional[torch.Tensor]) -> Optional[float]:
    if weight is not None:
        return float(torch.linalg.vector_norm(adapters.delta(module, weight)))
    if not adapters.is_additive(module):
        return None
    shape = _natural_shape(module)
    if shape is None:
        return None
    return float(torch.linalg.vector_norm(adapters.delta(module, torch.zeros(shape))))


def _info_arch(choice: str, lora_file):
    """The variant whose layout to show: the chosen one, else the one the file was made for
    (lora_core.arch.detect_lora: metadata, then the layout that resolves most of its modules)."""
    if choice != AUTO:
        return get_arch(choice)
    arch = detect_lora(lora_file)
    if arch is None:
        raise LoraValueError(f"cannot tell which model {lora_file.label} was made for from its metadata or keys; "
                             f"choose the architecture or connect the model")
    return arch


def block_info(lora_name: str, arch_choice: str = AUTO, model=None, clip=None) -> dict:
    """Per-block facts of a LoRA file: {"arch", "blocks": {block: {"modules", "keys", "norm", "unknown"}},
    "unmatched", "algorithms"}. Pure data; the node formats it."""
    lora_file = load_lora(lora_name)
    parsed = parse_modules(lora_file)
    weights: dict = {}
    if model is not None or clip is not None:
        host = HostModels(model, clip)
        key_map, arch = host.key_map, host.key_map.arch
        if model is not None:
            weights.update(model.model.state_dict())
        if clip is not None:
            weights.update(clip.cond_stage_model.state_dict())
        # A quantised layer's tensor is packed storage or a meta placeholder (ComfyUI-GGUF): its module gets the
        # shape-only norm, like a file without a model.
        weights = {k: v for k, v in weights.items() if holds_values(v)}
    else:
        arch = _info_arch(arch_choice, lora_file)
        key_map = layout_key_map(arch)
    per_block: dict = {}
    unmatched, algorithms = [], {}
    for name, module in parsed.modules.items():
        algo = module.algo + ("+dora" if module.dora_scale is not None else "")
        algorithms[algo] = algorithms.get(algo, 0) + 1
        target = key_map.resolve(name)
        if target is None:
            unmatched.append(name)
            continue
        entry = per_block.setdefault(target.block, {"modules": 0, "keys": 0, "sq": 0.0, "unknown": 0})
        entry["modules"] += 1
        entry["keys"] += len(module.source_keys) or 1
        weight = weights.get(target.host_key)
        norm = _module_delta_norm(module, weight.detach() if weight is not None else None)
        if norm is None:
            entry["unknown"] += 1
        else:
            entry["sq"] += norm * norm
    order = {b: i for i, b in enumerate(getattr(arch, "blocks", ()))}
    blocks = {}
    for block in sorted(per_block, key=lambda b: (order.get(b, len(order)), b)):
        entry = per_block[block]
        norm = math.sqrt(entry["sq"]) if entry["modules"] > entry["unknown"] else None
        blocks[block] = {"modules": entry["modules"], "keys": entry["keys"], "norm": norm,
                         "unknown": entry["unknown"]}
    return {"arch": arch, "blocks": blocks, "unmatched": unmatched, "algorithms": algorithms,
            "with_weights": bool(weights)}


def format_block_info(lora_name: str, info: dict) -> str:
    arch = info["arch"]
    lines = [f"LoRA: {lora_name}",
             f"  architecture: {getattr(arch, 'title', None) or getattr(arch, 'name', 'unknown')}"
             + ("" if info["with_weights"] else " (layout only: no model connected)"),
             "  algorithms: " + ", ".join(f"{a} x{n}" for a, n in sorted(info["algorithms"].items())),
             f"  {'block':<6} {'modules':>7} {'keys':>5}  ||dW||_F (strength 1)"]
    for block, entry in info["blocks"].items():
        norm = "n/a" if entry["norm"] is None else f"{entry['norm']:.4g}"
        if entry["unknown"] and entry["norm"] is not None:
            norm += f" (+{entry['unknown']} weight-dependent modules not counted)"
        elif entry["unknown"]:
            norm += " (weight-dependent adapters: connect a model)"
        lines.append(f"  {block:<6} {entry['modules']:>7} {entry['keys']:>5}  {norm}")
    if info["unmatched"]:
        lines.append(f"  unmatched modules: {len(info['unmatched'])}, e.g. {', '.join(info['unmatched'][:3])}")
    return "\n".join(lines)


def bar_chart(title: str, info: dict, width: int = 960, height: int = 360) -> torch.Tensor:
    """Per-block ‖ΔW‖ bars as a ComfyUI IMAGE: float tensor [1, H, W, 3] in 0..1 (matplotlib Agg, no pyplot
    state touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(info["blocks"])
    values = [entry["norm"] or 0.0 for entry in info["blocks"].values()]
    figure = Figure(figsize=(width / 100, height / 100), dpi=100)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    arch = info["arch"]
    other = set(arch.layout.other_blocks) if arch is not None else set()
    colours = ["#d9822b" if n.startswith(TE_BLOCK_PREFIX) else "#7a7a7a" if n in other else "#3b75af" for n in names]
    axes.bar(range(len(names)), values, color=colours)
    axes.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
    axes.set_ylabel("||ΔW||_F at strength 1")
    axes.set_title(title, fontsize=9)
    if not names:
        axes.text(0.5, 0.5, "no block matched", ha="center", va="center", transform=axes.transAxes)
    figure.tight_layout()
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return torch.from_numpy(rgba[..., :3].astype(np.float32) / 255.0).unsqueeze(0)


class LoRACoreBlockInfo:
    """Which blocks a LoRA touches, key counts per block, and ‖ΔW‖ per block as text and a bar chart."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora_name": (lora_names(), {"tooltip": "A file in models/loras."}),
                "arch": ([AUTO] + list(ARCHS), {"default": AUTO, "tooltip": "Block layout used when no model "
                         "is connected (auto: from the file's metadata or keys)."}),
            },
            "optional": {
                "model": ("MODEL", {"tooltip": "Resolve against this model and use its weights for ‖ΔW‖."}),
                "clip": ("CLIP", {"tooltip": "Include the text-encoder blocks, with this CLIP's weights."}),
            },
        }

    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("info", "chart")
    OUTPUT_TOOLTIPS = ("Blocks touched, modules and file keys per block, ‖ΔW‖_F per block.",
                       "The per-block ‖ΔW‖_F as a bar chart.")
    FUNCTION = "inspect"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Shows which blocks a LoRA file touches and how strongly (Frobenius norm of its strength-1 "
                   "delta per block). Useful before choosing a block vector.")

    def inspect(self, lora_name, arch, model=None, clip=None):
        info = block_info(lora_name, arch, model, clip)
        text = format_block_info(lora_name, info)
        return text, bar_chart(lora_name, info)


# ----------------------------------------------------------------------------------------------- sweep

class SweepWeights:
    """Factor `base` on every block except `overrides` (block -> factor): the sweep's block weights."""

    def __init__(self, base: float, overrides: Optional[dict] = None):
        self.base = float(base)
        self.overrides = dict(overrides or {})

    def factor(self, block_id: str, element: Optional[str] = None, path: Optional[str] = None) -> float:
        return self.overrides.get(block_id, self.base)

    def table(self) -> str:
        parts = [f"every block {self.base:g}"] + [f"{b} {v:g}" for b, v in self.overrides.items()]
        return "  " + ", ".join(parts)


def _settings_from_line(line: str, mode: str, seed: int, A: float, B: float) -> BlockSettings:
    group = line.partition("/")[0]
    if group in MODES or group == USER:
        return BlockSettings.from_widgets(mode, line, "", seed, A, B, False)
    return BlockSettings.from_widgets(mode, "custom", line, seed, A, B, False)


def sweep_entries(host: HostModels, lora_file, sweep: str, base: float, value: float, mode: str, vectors: str,
                  seed: int, A: float, B: float) -> list[tuple[str, object]]:
    """(label, block weights) per sweep image, baseline first. Every vector is resolved here, before any
    model is patched."""
    entries = [(f"baseline: all blocks {base:g}", SweepWeights(base))]
    if sweep == "blocks":
        unet_blocks = [b for b in touched_blocks(host.key_map, lora_file) if not b.startswith(TE_BLOCK_PREFIX)]
        if not unet_blocks:
            raise LoraValueError("the LoRA touches no block of this model's diffusion model, so there is nothing "
                                 "to sweep.")
        entries += [(f"{b} {value:g} (others {base:g})", SweepWeights(base, {b: value})) for b in unet_blocks]
    elif sweep == "vectors":
        lines = [line.strip() for line in (vectors or "").splitlines() if line.strip()]
        if not lines:
            raise LoraValueError("sweep 'vectors' needs one preset name or vector per line in `vectors`.")
        for line in lines:
            settings = _settings_from_line(line, mode, seed, A, B)
            weights = resolve_block_weights(host, lora_file, settings)
            entries.append((line, weights if weights is not None else SweepWeights(1.0)))
    else:
        raise LoraValueError(f"unknown sweep {sweep!r}: use 'blocks' or 'vectors'.")
    return entries


class LoRACoreBlockSweep:
    """A list of models, one per block setting, for one KSampler to render them all (OUTPUT_IS_LIST)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model (the sweep is model-only)."}),
            "lora_name": (lora_names(), {"tooltip": "A file in models/loras."}),
            "strength_model": ("FLOAT", {**STRENGTH, "tooltip": MODEL_TIP}),
            "sweep": (["blocks", "vectors"], {"default": "blocks", "tooltip": "blocks: one image per UNet block "
                      "the LoRA touches; vectors: one image per line of `vectors`."}),
            "base": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                               "tooltip": "Factor of every block not being swept (and of the baseline)."}),
            "value": ("FLOAT", {"default": 0.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                "tooltip": "Factor of the swept block (base 1, value 0: knock-out)."}),
            "mode": (list(MODES), {"default": "a1111", "tooltip": MODE_TIP}),
            "vectors": ("STRING", {"default": "", "multiline": True, "tooltip": "sweep 'vectors': one preset "
                        "name (a1111/INS, user/NAME) or vector in `mode` syntax per line."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": False,
                             "tooltip": "Seed for R/U tokens in `vectors`."}),
            "A": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
            "B": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("models", "labels")
    OUTPUT_IS_LIST = (True, True)
    OUTPUT_TOOLTIPS = ("One model per sweep entry, baseline first: connect to a KSampler.",
                       "One label per model, for the Sweep Grid.")
    FUNCTION = "sweep"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Block sweep for analysis: baseline then one variant per block (or per vector). A KSampler "
                   "fed with these models renders one image each; Sweep Grid lays them out with heatmaps.")

    def sweep(self, model, lora_name, strength_model, sweep, base, value, mode, vectors, seed, A, B):
        host = HostModels(model, None)
        lora_file = load_lora(lora_name)
        entries = sweep_entries(host, lora_file, sweep, base, value, mode, vectors, seed, A, B)
        plans = [host.plan([LoraRequest(lora_file, strength_model, 0.0, block_weights=w, name=lora_name)])
                 for _, w in entries]
        models = [host.apply(plan)[0] for plan in plans]
        return models, [label for label, _ in entries]


# ------------------------------------------------------------------------------------------------ grid

def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


LABEL_FONT_PX = 13


def _wrap(text: str, width: int, font, draw) -> list[str]:
    """Greedy word wrap of `text` to `width` pixels; a word wider than the tile is broken by characters."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if draw.textlength(candidate, font=font) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while draw.textlength(word, font=font) > width and len(word) > 1:
                cut = len(word)
                while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines or [""]


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)


def _fit(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if image.shape[0] == height and image.shape[1] == width:
        return image
    resized = torch.nn.functional.interpolate(image.permute(2, 0, 1)[None], size=(height, width),
                                              mode="bilinear", align_corners=False)
    return resized[0].permute(1, 2, 0)


def _heat(diff: torch.Tensor, scale: float) -> torch.Tensor:
    import matplotlib

    colour_map = matplotlib.colormaps["inferno"]
    normalised = (diff / scale).clamp(0, 1).cpu().numpy() if scale > 0 else np.zeros(diff.shape)
    return torch.from_numpy(colour_map(normalised)[..., :3].astype(np.float32))


def grid_image(images: list, labels: list, columns: int = 0, heatmap: bool = True,
               threshold: float = 0.05) -> tuple[torch.Tensor, str]:
    """Lay out the sweep images (first = baseline) with labels and heatmaps; returns (IMAGE, summary)."""
    from PIL import Image, ImageDraw

    cells = [frame[..., :3].float() for batch in images for frame in batch]
    if not cells:
        raise LoraValueError("Sweep Grid got no images: connect the IMAGE output of the decoder.")
    names = [str(x) for x in labels]
    if len(names) != len(cells):
        if len(names) == len(images):  # batched images: one label per batch
            names = [f"{names[i]} #{j}" if len(batch) > 1 else names[i]
                     for i, batch in enumerate(images) for j in range(len(batch))]
        else:
            names = (names + [f"image {i}" for i in range(len(names), len(cells))])[:len(cells)]
    height, width = cells[0].shape[0], cells[0].shape[1]
    cells = [_fit(c, height, width) for c in cells]
    base = cells[0]
    diffs = [(c - base).abs().mean(dim=-1) for c in cells]
    scale = max([float(d.max()) for d in diffs[1:]] + [0.0])
    summary, bodies, captions = [], [], []
    for name, cell, diff in zip(names, cells, diffs):
        mean = float(diff.mean()) * 100.0
        effective = float((diff > threshold).float().mean()) * 100.0
        captions.append(name if cell is base else f"{name} | d {mean:.2f}% | >{threshold:g}: {effective:.1f}%")
        summary.append(f"{name}: mean |diff| {mean:.3f}%, pixels over {threshold:g}: {effective:.2f}%")
        bodies.append(torch.cat([cell] + ([_heat(diff, scale)] if heatmap else []), dim=0))
    # The label band grows with the text (wrapped to the tile width at a readable size), never the other way
    # round: 64 px tiles get a taller band, not an unreadable font.
    font = _font(LABEL_FONT_PX)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(caption, width - 4, font, measure) for caption in captions]
    line_h = LABEL_FONT_PX + 3
    band = 4 + line_h * max(len(lines) for lines in wrapped)
    tiles = []
    for lines, body in zip(wrapped, bodies):
        tile = Image.new("RGB", (width, band + body.shape[0]), "white")
        tile.paste(Image.fromarray(_to_uint8(body)), (0, band))
        draw = ImageDraw.Draw(tile)
        for i, line in enumerate(lines):
            draw.text((2, 2 + i * line_h), line, fill="black", font=font)
        tiles.append(tile)
    columns = int(columns) if columns and columns > 0 else math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    tile_w, tile_h = tiles[0].size
    sheet = Image.new("RGB", (columns * tile_w, rows * tile_h), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % columns) * tile_w, (i // columns) * tile_h))
    array = np.asarray(sheet).astype(np.float32) / 255.0
    return torch.from_numpy(array).unsqueeze(0), "\n".join(summary)


def _one(value, default):
    """INPUT_IS_LIST hands every widget over as a list: take its first value."""
    if isinstance(value, list):
        return value[0] if value else default
    return default if value is None else value


class LoRACoreSweepGrid:
    """Assemble a sweep's images (a list) into one labelled grid with difference heatmaps vs the baseline."""

    INPUT_IS_LIST = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The decoded images of the sweep (a list; baseline first)."}),
                "columns": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": "Tiles per row (0: auto)."}),
                "heatmap": ("BOOLEAN", {"default": True, "tooltip": "Draw |image - baseline| under each tile."}),
                "threshold": ("FLOAT", {"default": 0.05, "min": 0.0, "max": 1.0, "step": 0.005,
                                        "tooltip": "A pixel counts as changed when its mean |diff| exceeds this."}),
            },
            "optional": {
                "labels": ("STRING", {"forceInput": True, "tooltip": "The sweep's labels output."}),
            },
        }

    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("grid", "summary")
    FUNCTION = "assemble"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Lays out a block sweep: labels, mean |diff| to the baseline and the share of changed pixels "
                   "per tile, and a heatmap on one shared colour scale.")

    def assemble(self, images, columns=None, heatmap=None, threshold=None, labels=None):
        images = images if isinstance(images, list) else [images]
        return grid_image(images, labels or [], _one(columns, 0), bool(_one(heatmap, True)),
                          float(_one(threshold, 0.05)))


NODE_CLASS_MAPPINGS = {
    "LoRACoreBlockInfo": LoRACoreBlockInfo,
    "LoRACoreBlockSweep": LoRACoreBlockSweep,
    "LoRACoreSweepGrid": LoRACoreSweepGrid,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoRACoreBlockInfo": "LoRA Block Info (LoRA Core)",
    "LoRACoreBlockSweep": "LoRA Block Sweep (LoRA Core)",
    "LoRACoreSweepGrid": "Sweep Grid (LoRA Core)",
}
