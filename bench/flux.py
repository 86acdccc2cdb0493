"""Flux.1 at full width and reduced depth for `python -m bench` (`--arch flux` alone; part of `make bench`).

Model: ComfyUI's own classes (`comfy.supported_models.Flux` -> `model_base.Flux`, what ComfyUI builds for a
Flux.1-dev checkpoint; comfy.model_detection's config) at Flux.1-dev's widths: hidden 3072 (24 heads x 128), MLP
12288, context 4096 (T5-XXL), vector 768 (CLIP-L), 16 latent channels, guidance embedding. Depth is reduced
(default 2 double + 4 single blocks of Flux.1-dev's 19 + 38, `--flux-depth`) so that a 2-core, 24 GB CPU machine
holds the model, one patched copy and the references. Every patched weight has Flux.1-dev's exact shape, so a
full model costs about 19/2 times the double-block work and 38/4 times the single-block work shown. Weights are
random and seeded (bench.models.fill_random), so every original can be regenerated for the restore check.

LoRAs, rank 32, fp16 factors from one seeded pool:
* kohya: the targets of sd-scripts' networks/lora_flux.py (every Linear inside DoubleStreamBlock and
  SingleStreamBlock, modulation included), `lora_unet_<path with _>.lora_down/lora_up.weight` + `.alpha`: one
  module per weight (fused qkv and linear1 whole).
* diffusers: the PEFT layout on diffusers' FluxTransformer2DModel (every Linear of its transformer_blocks and
  single_transformer_blocks, enumerated on diffusers' own class), `transformer.<path>.lora_A/lora_B.weight`, no
  alpha (diffusers / ai-toolkit files carry none): `attn.to_q/to_k/to_v` and `add_q/k/v_proj` land on row ranges
  of the fused `img_attn.qkv` / `txt_attn.qkv`, `to_q/to_k/to_v/proj_mlp` on row ranges of `linear1`, so the
  same weights get 52 modules (default depth) and the fused-row path is what is measured.
* both as a stack (rows of a fused weight covered by the kohya module and by one diffusers part each).

Block change: the single blocks x0.5 -- `SB*=0.5` in our named syntax; for core the file's patches are loaded
once and the single blocks' keys added at strength x 0.5 (what a block-weight pack has to do on core).

Reference: fp64 W0 + sum s * f * dW over every 61st row of every patched weight (every fused part has rows in
it), dW from the file's own tensors, the fused row offsets from core's own diffusers->Flux map
(`comfy.utils.flux_to_diffusers`), not from lora_core. Restore: every element of every patched weight is compared
with its original, regenerated from the seed.

Per-weight overhead (`overhead`): PatchEngine.apply time per written weight (planning apart) on the same
layouts at Flux.1-dev's full depth (19 + 38 blocks: 304 weights; 494 diffusers modules) and width 64, where every
kernel is a few microseconds of work: what is left is the per-weight Python and op dispatch, the cost that stays
when a GPU makes the math cheap. Both engine paths (per weight, the CPU default; same-shape batched, the CUDA
default), one CPU thread, and SD1.5's UNet layout (192 weights at 32 channels) by the same method in the same
run for comparison.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from . import cases as C
from . import models as M

FLUX_DEV_DEPTH = (19, 38)
CPU_DEPTH = (2, 4)
RANK = 32
ROW_STRIDE = 61
SEED = 1
OVERHEAD_WIDTH = (64, 2)   # hidden, heads of the per-weight-overhead model
BLOCKS = C.BlockChange("SB*={:g}", ".single_blocks.")
BLOCK_FACTOR = 0.5


def unet_config(depth: int, depth_single: int, hidden: int = 3072, heads: int = 24) -> dict:
    """comfy.model_detection's config for a Flux.1-dev checkpoint, with `depth` double and `depth_single` single
    blocks (and optionally another width, for the overhead model)."""
    head = hidden // heads
    return {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 768,
            "context_in_dim": 4096, "hidden_size": hidden, "mlp_ratio": 4.0, "num_heads": heads, "depth": depth,
            "depth_single_blocks": depth_single,
            "axes_dim": [16, 56, 56] if head == 128 else [head // 4, head * 3 // 8, head * 3 // 8],
            "theta": 10000, "qkv_bias": True, "guidance_embed": True}


def comfy_flux(config: dict, dtype: torch.dtype, device: torch.device):
    """ModelPatcher over ComfyUI's Flux model (no init pass, random seeded weights)."""
    from tests.comfy_host import import_comfy

    comfy = import_comfy()
    import comfy.model_patcher
    import comfy.supported_models

    model_config = comfy.supported_models.Flux(dict(config, dtype=dtype))
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device=device)
    model.to(dtype)
    M.fill_random(model, seed=SEED)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def kohya_layers(patcher) -> list[tuple[str, int, int]]:
    """(ComfyUI path, out, in) of every Linear inside the double and single blocks: sd-scripts' lora_flux.py
    targets (FLUX_TARGET_REPLACE_MODULE_DOUBLE/SINGLE, every Linear child, train_blocks="all")."""
    layers = []
    for name, module in patcher.model.diffusion_model.named_modules():
        if type(module).__name__ not in ("DoubleStreamBlock", "SingleStreamBlock"):
            continue
        for child_name, child in module.named_modules():
            if isinstance(child, torch.nn.Linear):
                layers.append((f"{name}.{child_name}", child.out_features, child.in_features))
    return layers


def diffusers_layers(config: dict) -> list[tuple[str, int, int]]:
    """(diffusers path, out, in) of every Linear in the transformer blocks of diffusers' FluxTransformer2DModel
    with the same shapes (built on the meta device)."""
    from diffusers import FluxTransformer2DModel

    head = config["hidden_size"] // config["num_heads"]
    with torch.device("meta"):
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=config["depth"], num_single_layers=config["depth_single_blocks"],
            attention_head_dim=head, num_attention_heads=config["num_heads"],
            joint_attention_dim=config["context_in_dim"], pooled_projection_dim=config["vec_in_dim"],
            guidance_embeds=True, axes_dims_rope=tuple(config["axes_dim"]))
    blocks = ("transformer_blocks.", "single_transformer_blocks.")
    return [(name, module.out_features, module.in_features) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.startswith(blocks)]


def core_diffusers_map(config: dict) -> dict:
    """ComfyUI's own map: diffusers weight name -> ComfyUI key, or (key, (dim, offset, rows)) for a fused part."""
    from tests.comfy_host import import_comfy

    import_comfy()
    import comfy.utils

    return comfy.utils.flux_to_diffusers(config, output_prefix="diffusion_model.")


@dataclass
class Part:
    """One low-rank module of a file as it lands on a host weight: rows row0.. of `key` get scale * up @ down."""

    key: str
    row0: int
    up: torch.Tensor
    down: torch.Tensor
    scale: float


@dataclass
class FluxLora:
    name: str
    names: str          # "kohya" / "diffusers"
    rank: int
    tensors: dict
    parts: list


class FluxLoras:
    """kohya- and diffusers-named Flux LoRAs: fp16 factor views into one seeded random pool (no RAM per LoRA).
    Magnitudes: dW entries ~5% of W's (~1/sqrt(3072)) for both layouts (alpha/rank for kohya; the diffusers
    factors, which have no alpha, are drawn from the pool scaled down instead)."""

    def __init__(self, config: dict, kohya: list, diffusers: list, pool_values: int = 1 << 25, seed: int = 7):
        self.config, self.kohya_layers, self.diffusers_layers = config, kohya, diffusers
        self.pool = M._pool(torch.float16, "cpu", seed, pool_values)
        self.core_map = core_diffusers_map(config)

    def _factors(self, pool, cursor, rank, rows, cols):
        views = []
        span = pool.numel()
        for shape in ((rank, cols), (rows, rank)):
            n = math.prod(shape)
            if cursor + n > span:
                cursor = (cursor + 977) % (span - n)
            views.append(pool[cursor:cursor + n].view(shape))
            cursor += n
        return views[0], views[1], cursor

    def target_delta(self) -> float:
        """Typical |dW| entry: 5% of a weight's (fill_random draws W ~ N(0, 1/fan_in), fan_in = hidden)."""
        return 0.05 / math.sqrt(self.config["hidden_size"])

    def kohya(self, index: int, rank: int = RANK) -> FluxLora:
        tensors, parts = {}, []
        cursor = (index * 104_729 * 97) % self.pool.numel()
        alpha = self.target_delta() * math.sqrt(rank)   # (up @ down) entries ~ sqrt(rank): alpha/rank * that
        for path, out_f, in_f in self.kohya_layers:
            down, up, cursor = self._factors(self.pool, cursor, rank, out_f, in_f)
            name = "lora_unet_" + path.replace(".", "_")
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
            tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
            parts.append(Part(f"diffusion_model.{path}.weight", 0, up, down, alpha / rank))
        return FluxLora(f"kohya{index}_r{rank}", "kohya", rank, tensors, parts)

    def diffusers(self, index: int, rank: int = RANK) -> FluxLora:
        pool = self.pool * math.sqrt(self.target_delta() / math.sqrt(rank))   # no alpha: scale 1
        tensors, parts = {}, []
        cursor = (index * 104_729 * 97) % pool.numel()
        for path, out_f, in_f in self.diffusers_layers:
            down, up, cursor = self._factors(pool, cursor, rank, out_f, in_f)
            tensors[f"transformer.{path}.lora_A.weight"], tensors[f"transformer.{path}.lora_B.weight"] = down, up
            host = self.core_map[f"{path}.weight"]
            key, row0 = (host, 0) if isinstance(host, str) else (host[0], host[1][1])
            parts.append(Part(key, row0, up, down, 1.0))
        return FluxLora(f"diffusers{index}_r{rank}", "diffusers", rank, tensors, parts)


def live(env, key: str) -> torch.Tensor:
    import comfy.utils

    return comfy.utils.get_attr(env.patcher.model, key)


class FluxReference:
    """fp64 expected rows (every ROW_STRIDE-th row of every patched weight, offset per weight) and the exact
    restore check over whole weights; same interface as bench.__main__.Reference."""

    def __init__(self, loras: list, originals: M.Originals, stride: int = ROW_STRIDE):
        self.loras, self.originals = loras, originals
        self.keys = sorted({part.key for lora in loras for part in lora.parts})
        self.rows, self.deltas = {}, {}
        for i, key in enumerate(self.keys):
            out_rows = originals.params[key][1].shape[0]
            self.rows[key] = torch.arange(i % stride, out_rows, stride)
        for lora in loras:
            for part in lora.parts:
                rows = self.rows[part.key]
                inside = ((rows >= part.row0) & (rows < part.row0 + part.up.shape[0])).nonzero().squeeze(1)
                if not inside.numel():
                    continue
                delta = self.deltas.get((lora.name, part.key))
                if delta is None:
                    delta = self.deltas[(lora.name, part.key)] = torch.zeros(len(rows), part.down.shape[1],
                                                                             dtype=torch.float64)
                delta[inside] += part.scale * (part.up[rows[inside] - part.row0].double() @ part.down.double())

    def snapshot(self, env) -> dict:
        return {key: live(env, key).detach()[self.rows[key].to(env.device)].to("cpu", copy=True) for key in self.keys}

    def error(self, env, originals, strengths, out_factor=1.0) -> dict:
        worst, floor = 0.0, 0.0
        for key in self.keys:
            got = live(env, key).detach()[self.rows[key].to(env.device)].to("cpu", torch.float64)
            ref = originals[key].double()
            factor = out_factor if BLOCKS.selects(key) else 1.0
            for lora, s in zip(self.loras, strengths):
                delta = self.deltas.get((lora.name, key))
                if delta is not None:
                    ref += (s * factor) * delta
            worst = max(worst, (got - ref).abs().max().item())
            floor = max(floor, (ref.to(originals[key].dtype).double() - ref).abs().max().item())
        return {"max_abs_err": worst, "rounding_floor": floor}

    def restored(self, env, originals) -> tuple[float, bool]:
        """(max |W - original|, bit-equal) over every element of every patched weight."""
        worst, exact = 0.0, True
        for key in self.keys:
            now, then = live(env, key).detach(), self.originals[key]
            if not torch.equal(now, then):
                exact = False
                worst = max(worst, (now.double() - then.double()).abs().max().item())
        return worst, exact


def meta(config: dict, dtype: torch.dtype, layers: list) -> dict:
    params = sum(o * i for _, o, i in layers)
    floor_bytes = params * torch.finfo(dtype).bits // 8 * 2
    return {"arch": "flux", "dtype": str(dtype).replace("torch.", ""), "targets": len(layers),
            "patched_params": params, "floor_bytes": floor_bytes, "floor_s_h200": floor_bytes / 4.8e12,
            "depth": config["depth"], "depth_single": config["depth_single_blocks"],
            "depth_text": f"{config['depth']} double + {config['depth_single_blocks']} single blocks of Flux.1-dev's "
                          f"{FLUX_DEV_DEPTH[0]} + {FLUX_DEV_DEPTH[1]}",
            "width": f"hidden {config['hidden_size']}, mlp {int(config['hidden_size'] * config['mlp_ratio'])}, "
                     f"context {config['context_in_dim']}, vec {config['vec_in_dim']}"}


# ------------------------------------------------------------------------------------- per-weight overhead

def _per_weight(env, files: list, vector: str, clock, repeat: int, log) -> list[dict]:
    """µs per written weight of PatchEngine.apply (and of planning) for each (label, tensors, modules) file on
    `env`: first patch at 1.0, strength change to 0.5, block change `vector` at 0.5, restore; best of `repeat`
    fresh engines after one warm-up, per weight and batched. One LoraFile per file for all its plans, as the
    nodes' file cache hands out (a re-plan gives the engine the same parsed modules)."""
    from lora_core.api import LoraRequest
    from lora_core.blocks import resolve_vector
    from lora_core.engine import PatchEngine
    from lora_core.types import LoraFile

    host = C._host_module().HostModels(env.patcher, None)
    blocks = resolve_vector(host.key_map.arch.name, "named", vector)
    rows = []
    for label, tensors, modules in files:
        file = LoraFile(None, tensors)

        def plan(strength, weights=None):
            return host.plan([LoraRequest(file, strength, strength, block_weights=weights, name=label)]).patches

        for batched in (False, True):
            best: dict = {}
            for attempt in range(repeat + 1):   # the first pass is a warm-up
                engine = PatchEngine(env.state_dict(), batch_same_shape=batched)
                steps = {}
                for step, args in (("patch", (1.0,)), ("strength", (0.5,)), ("blocks", (0.5, blocks))):
                    patches, load = clock(plan, *args)
                    counts, seconds = clock(engine.apply, patches)
                    steps[step] = (counts["written"], seconds, load)
                _, seconds = clock(engine.restore)
                steps["restore"] = (steps["patch"][0], seconds, 0.0)
                del engine
                if attempt == 0:
                    continue
                for step, (n, seconds, load) in steps.items():
                    best[f"{step}_weights"] = n
                    for slot, value in ((f"{step}_us", seconds), (f"{step}_plan_us", load)):
                        us = value / max(1, n) * 1e6
                        best[slot] = min(best.get(slot, us), us)
            row = {"names": label, "path": "batched" if batched else "per-weight", "modules": modules, **best}
            rows.append(row)
            log(f"  overhead {label:<16} {row['path']:<10}: apply {row['patch_us']:.1f} µs/weight first patch "
                f"({row['patch_weights']} weights), {row['strength_us']:.1f} strength, {row['blocks_us']:.1f} blocks "
                f"({row['blocks_weights']} weights), restore {row['restore_us']:.1f}; plan {row['patch_plan_us']:.1f} "
                f"/ {row['strength_plan_us']:.1f} / {row['blocks_plan_us']:.1f}")
    return rows


def _sd15_unet_file(patcher, rank: int, pool: torch.Tensor) -> tuple[dict, int]:
    """kohya LoRA on every Linear / 1x1 Conv2d of the SpatialTransformers (the bench's SD1.5 UNet targets), LDM
    names, fp16 factors from `pool`."""
    tensors, count, cursor = {}, 0, 0
    for name, module in patcher.model.diffusion_model.named_modules():
        if type(module).__name__ != "SpatialTransformer":
            continue
        for child_name, child in module.named_modules():
            conv = isinstance(child, torch.nn.Conv2d) and child.kernel_size == (1, 1)
            if not (isinstance(child, torch.nn.Linear) or conv):
                continue
            out_f, in_f = child.weight.shape[:2]
            key = "lora_unet_" + f"{name}.{child_name}".replace(".", "_")
            for role, shape in (("lora_down", (rank, in_f)), ("lora_up", (out_f, rank))):
                n = math.prod(shape)
                view = pool[cursor:cursor + n].view(shape)
                tensors[f"{key}.{role}.weight"] = view.view(*shape, 1, 1) if conv else view
                cursor += n
            tensors[f"{key}.alpha"] = torch.tensor(float(rank) * 0.05, dtype=torch.float32)
            count += 1
    return tensors, count


def overhead(clock, device: torch.device, dtype: torch.dtype, repeat: int = 5, log=print) -> dict:
    """The engine's per-weight overhead: PatchEngine.apply time per written weight on Flux.1-dev's full block
    layout (19 + 38 blocks, 304 weights) at width 64, where each kernel is a few microseconds of work, for the
    kohya and the diffusers layout; and, by the same method in the same run, on SD1.5's UNet layout (16
    transformer blocks, 192 weights) at 32 channels, for comparison. One CPU thread: no kernel at these widths
    is worth a second one, and OpenMP wake-ups on a shared machine would otherwise dominate the figure."""
    from tests import tiny_models

    hidden, heads = OVERHEAD_WIDTH
    config = unet_config(*FLUX_DEV_DEPTH, hidden=hidden, heads=heads)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    result = {"width": hidden, "depth": list(FLUX_DEV_DEPTH), "repeat": repeat, "threads": torch.get_num_threads(),
              "rows": []}
    try:
        env = C.ComfyEnv(comfy_flux(config, dtype, device), None, device, blocks=BLOCKS)
        factory = FluxLoras(config, kohya_layers(env.patcher), diffusers_layers(config))
        files = [(f"flux {lora.names}", lora.tensors, len(lora.parts))
                 for lora in (factory.kohya(0), factory.diffusers(1))]
        result["rows"] += _per_weight(env, files, BLOCKS.vector(BLOCK_FACTOR), clock, repeat, log)
        sd = tiny_models.comfy_sd15(model_channels=32, channel_mult=(1, 2, 4, 4))
        sd.model.to(device=device, dtype=dtype)
        env = C.ComfyEnv(sd, None, device)
        tensors, count = _sd15_unet_file(sd, RANK, factory.pool)
        result["rows"] += _per_weight(env, [("sd15 unet kohya", tensors, count)], C.SD_OUT_BLOCKS.vector(BLOCK_FACTOR),
                                      clock, repeat, log)
    finally:
        torch.set_num_threads(threads)
    return result


def parse_depth(text: Optional[str]) -> tuple[int, int]:
    """`--flux-depth D,S` (default CPU_DEPTH)."""
    if not text:
        return CPU_DEPTH
    depth, single = (int(v) for v in text.split(","))
    if not (1 <= depth <= FLUX_DEV_DEPTH[0] and 1 <= single <= FLUX_DEV_DEPTH[1]):
        raise SystemExit(f"--flux-depth {text}: 1-{FLUX_DEV_DEPTH[0]} double and 1-{FLUX_DEV_DEPTH[1]} single blocks")
    return depth, single
