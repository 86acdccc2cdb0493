"""Wan 2.1 T2V 1.3B at full width for `python -m bench` (`--arch wan` alone; part of `make bench`).

Model: ComfyUI's own classes (`comfy.supported_models.WAN21_T2V` -> `model_base.WAN21` over comfy/ldm/wan/model.py's
WanModel, what ComfyUI builds for a Wan 2.1 T2V 1.3B file; comfy.model_detection's `head.modulation` config) at
the 1.3B's sizes: dim 1536 (12 heads x 128), FFN 8960, text 4096 (UMT5-XXL), 16 latent channels in and out, and
its 30 blocks by default (`--wan-depth N` runs fewer; every patched weight keeps the 1.3B's exact shape, so a
full model costs 30 / N times what is shown). Weights are random and seeded (bench.models.fill_random), so every
original can be regenerated for the restore check.

LoRA: musubi-tuner's layout (networks/lora_wan.py: `WAN_TARGET_REPLACE_MODULES = ["WanAttentionBlock"]`, every
Linear child, prefix `lora_unet`; the default exclude patterns take nothing inside a block's Linears), rank 32,
`lora_unet_blocks_N_self_attn_q.lora_down/lora_up.weight` + `.alpha`, fp16 factors from one seeded pool: 10
modules per block (self_attn q/k/v/o, cross_attn q/k/v/o, ffn.0, ffn.2).

Block change: every block's cross-attention x0.5 -- `B*.cross_attn=0.5` in our named syntax; for core the file's
patches are loaded once and the cross-attention keys added at strength x 0.5 (what a block-weight pack has to do
on core). Reference and restore check: bench/flux.py's (fp64 rows, every 61st row of every patched weight; exact
restore over every element).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import cases as C
from . import flux as F
from . import models as M

WAN_13B = {"dim": 1536, "heads": 12, "depth": 30, "ffn": 8960, "text_dim": 4096}
RANK = 32
SEED = 1
BLOCKS = C.BlockChange("B*.cross_attn={:g}", ".cross_attn.")
BLOCK_FACTOR = 0.5


def unet_config(depth: int = WAN_13B["depth"]) -> dict:
    """comfy.model_detection's config for a Wan 2.1 T2V 1.3B file (num_heads = dim / 128), with `depth` blocks."""
    return {"image_model": "wan2.1", "dim": WAN_13B["dim"], "out_dim": 16, "num_heads": WAN_13B["dim"] // 128,
            "ffn_dim": WAN_13B["ffn"], "num_layers": depth, "patch_size": (1, 2, 2), "freq_dim": 256,
            "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6, "in_dim": 16,
            "model_type": "t2v"}


def comfy_wan(config: dict, dtype: torch.dtype, device: torch.device):
    """ModelPatcher over ComfyUI's Wan 2.1 model (no init pass, random seeded weights)."""
    from tests.comfy_host import import_comfy

    comfy = import_comfy()
    import comfy.model_patcher
    import comfy.supported_models

    model_config = comfy.supported_models.WAN21_T2V(dict(config, dtype=dtype))
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device=device)
    model.to(dtype)
    M.fill_random(model, seed=SEED)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def musubi_layers(patcher) -> list[tuple[str, int, int]]:
    """(ComfyUI path, out, in) of every Linear inside the WanAttentionBlocks (musubi-tuner's lora_wan targets)."""
    layers = []
    for name, module in patcher.model.diffusion_model.named_modules():
        if type(module).__name__ != "WanAttentionBlock":
            continue
        for child_name, child in module.named_modules():
            if isinstance(child, torch.nn.Linear):
                layers.append((f"{name}.{child_name}", child.out_features, child.in_features))
    return layers


class WanLoras:
    """musubi-named Wan LoRAs: fp16 factor views into one seeded random pool (no RAM per LoRA); dW entries ~5% of
    W's (fill_random draws W ~ N(0, 1/fan_in))."""

    def __init__(self, layers: list, pool_values: int = 1 << 25, seed: int = 7):
        self.layers = layers
        self.pool = M._pool(torch.float16, "cpu", seed, pool_values)

    def musubi(self, index: int, rank: int = RANK) -> F.FluxLora:
        tensors, parts = {}, []
        cursor = (index * 104_729 * 97) % self.pool.numel()
        alpha = 0.05 / math.sqrt(WAN_13B["dim"]) * math.sqrt(rank)
        for path, out_f, in_f in self.layers:
            down, up, cursor = F.FluxLoras._factors(self, self.pool, cursor, rank, out_f, in_f)
            name = "lora_unet_" + path.replace(".", "_")
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
            tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
            parts.append(F.Part(f"diffusion_model.{path}.weight", 0, up, down, alpha / rank))
        return F.FluxLora(f"musubi{index}_r{rank}", "musubi", rank, tensors, parts)


class WanReference(F.FluxReference):
    """bench/flux.py's reference, with the Wan case's block change (cross-attention x factor)."""

    def error(self, env, originals, strengths, out_factor=1.0) -> dict:
        worst, floor = 0.0, 0.0
        for key in self.keys:
            got = F.live(env, key).detach()[self.rows[key].to(env.device)].to("cpu", torch.float64)
            ref = originals[key].double()
            factor = out_factor if BLOCKS.selects(key) else 1.0
            for lora, s in zip(self.loras, strengths):
                delta = self.deltas.get((lora.name, key))
                if delta is not None:
                    ref += (s * factor) * delta
            worst = max(worst, (got - ref).abs().max().item())
            floor = max(floor, (ref.to(originals[key].dtype).double() - ref).abs().max().item())
        return {"max_abs_err": worst, "rounding_floor": floor}


def meta(config: dict, dtype: torch.dtype, layers: list) -> dict:
    params = sum(o * i for _, o, i in layers)
    floor_bytes = params * torch.finfo(dtype).bits // 8 * 2
    depth = config["num_layers"]
    return {"arch": "wan", "dtype": str(dtype).replace("torch.", ""), "targets": len(layers),
            "patched_params": params, "floor_bytes": floor_bytes, "floor_s_h200": floor_bytes / 4.8e12,
            "depth": depth,
            "depth_text": (f"all {depth} blocks" if depth == WAN_13B["depth"]
                           else f"{depth} of the 1.3B's {WAN_13B['depth']} blocks"),
            "width": f"dim {config['dim']}, ffn {config['ffn_dim']}, text {WAN_13B['text_dim']}"}


def parse_depth(text: Optional[str]) -> int:
    """`--wan-depth N` (default: the 1.3B's 30 blocks)."""
    if not text:
        return WAN_13B["depth"]
    depth = int(text)
    if not 1 <= depth <= WAN_13B["depth"]:
        raise SystemExit(f"--wan-depth {text}: 1-{WAN_13B['depth']} blocks")
    return depth
