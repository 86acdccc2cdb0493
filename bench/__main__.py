"""`make bench` / `python -m bench`: LoRA patch speed, memory and exactness on full-size SD1.5 and SDXL, and on
Flux.1 at full width with fewer blocks, and on Wan 2.1 T2V 1.3B at full size.

    python -m bench [--quick | --full] [--device cpu|cuda] [--arch sd15,sdxl,flux,wan] [--ranks 8,32,128]
                    [--stack 1,4,8]
                    [--impls core,nodes,engine,lorapatcher,diffusers (+ engine-batched, engine-perweight)]
                    [--flux-depth 2,4] [--wan-depth 30] [--out bench/results] [--threads N]

Compares, in one run and on the same machine: ComfyUI core, our nodes inside ComfyUI's ModelPatcher, the
standalone PatchEngine (on the ComfyUI modules), diffusers `fuse_lora`, and our LoraPatcher on the diffusers
model. Writes bench/results/bench-<device>-<time>.json and .md (or under $OUT when set). Not a test.

Default (`make bench`): SD1.5 over ranks 8/32/128 and 1/4/8 LoRAs with every implementation, and SDXL with
rank 32, 1 and 4 LoRAs; on a CPU the SDXL part runs the ComfyUI implementations only (a second, diffusers copy
of SDXL does not fit next to it in a small machine's memory, and the full grid takes hours on a CPU).
About 15 minutes on a 2-core CPU (833 s measured). `--full` runs the whole grid for both architectures.

Flux (bench/flux.py; `--arch flux` runs it alone): Flux.1-dev's widths built with ComfyUI's own classes, 2 double
+ 4 single blocks by default (`--flux-depth D,S`), fp32 on a CPU and bf16 on a GPU; a rank-32 kohya LoRA, a
rank-32 diffusers-named one (parts on the fused qkv / linear1 rows) and both stacked, through core, our nodes and
the engine (ComfyUI implementations only: no diffusers Flux copy next to it), then the engine's per-weight overhead
on Flux.1-dev's full block layout at width 64. `--quick` leaves Flux out unless `--arch` names it.

Wan (bench/wan.py; `--arch wan` runs it alone): Wan 2.1 T2V 1.3B built with ComfyUI's own classes at full size
(dim 1536, FFN 8960, all 30 blocks; `--wan-depth N` for fewer), fp32 on a CPU and bf16 on a GPU; a rank-32
musubi-tuner LoRA through core, our nodes and the engine; the block change is every block's cross-attention
x0.5. `--quick` leaves Wan out unless `--arch` names it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from . import cases as C
from . import models as M

HBM_BYTES_PER_S = 4.8e12   # H200
SAMPLE_TARGETS = 10


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="SD1.5 only, ranks 8/32, 1 and 4 LoRAs")
    p.add_argument("--full", action="store_true", help="the whole grid for SDXL too, also on a CPU")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--arch", default=None, help="comma list of sd15, sdxl, flux, wan")
    p.add_argument("--flux-depth", default=None, help="double,single blocks of the Flux case (default 2,4)")
    p.add_argument("--wan-depth", default=None, help="blocks of the Wan 2.1 1.3B case (default 30, all)")
    p.add_argument("--ranks", default=None, help="comma list, default 8,32,128")
    p.add_argument("--stack", default=None, help="comma list of LoRA counts, default 1,4,8")
    p.add_argument("--impls", default=None, help="default core,nodes,engine,lorapatcher,diffusers")
    p.add_argument("--dtype", default=None, help="model dtype: fp32, bf16, fp16 (default: CPU fp32 for SD1.5 "
                                                 "and bf16 for SDXL; GPU fp16)")
    p.add_argument("--no-forward", action="store_true", help="skip the sampling-speed check")
    p.add_argument("--out", default=os.environ.get("OUT") or "bench/results")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--repeat", type=int, default=1, help="run each case N times, keep the fastest of each phase "
                                                         "(a shared CPU is noisy)")
    args = p.parse_args(argv)
    # SDXL on a CPU gets a smaller case unless the grid was asked for (see the module docstring)
    args.light_sdxl = (args.device == "cpu" and not args.full and args.ranks is None and args.stack is None
                       and args.impls is None)
    args.arch = (args.arch or ("sd15" if args.quick else "sd15,sdxl,flux,wan")).split(",")
    args.ranks = [int(r) for r in (args.ranks or ("8,32" if args.quick else "8,32,128")).split(",")]
    args.stack = [int(n) for n in (args.stack or ("1,4" if args.quick else "1,4,8")).split(",")]
    args.impls = (args.impls or "core,nodes,engine,lorapatcher,diffusers").split(",")
    return args


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def model_dtype(args, arch: str) -> torch.dtype:
    """SD: fp16 on a GPU; on a CPU fp32 for SD1.5 and bf16 for SDXL (memory). Flux: bf16 on a GPU (Flux.1's own
    dtype); fp32 on a CPU, where 2 + 4 full-width blocks fit in 24 GB with a patched copy and the error against
    fp64 then shows each implementation's arithmetic instead of bf16's rounding."""
    if args.dtype:
        return DTYPES[args.dtype]
    if arch in ("flux", "wan"):
        return torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.device == "cuda":
        return torch.float16
    return torch.float32 if arch == "sd15" else torch.bfloat16


def strengths(n: int) -> tuple[list[float], list[float]]:
    """First strengths, then the same stack after the user moves the first LoRA's slider."""
    first = [round(1.0 - 0.1 * i, 2) for i in range(n)]
    return first, [0.5] + first[1:]


def pick_sample(targets: list) -> list:
    """A spread of targets (UNet down/mid/up and each text encoder) whose fp64 reference stays cheap."""
    small = [t for t in targets if t.out_features * t.in_features <= 1280 * 1280 * 4]
    by_component: dict = {}
    for t in small:
        by_component.setdefault(t.component, []).append(t)
    sample = []
    for component, items in by_component.items():
        want = SAMPLE_TARGETS if component == "unet" else 3
        step = max(1, len(items) // want)
        sample.extend(items[::step][:want])
    return sample


class Reference:
    """fp64 expected weights of the sample targets: W0 + Σ s_i · f · ΔW_i (ΔW cached per case)."""

    def __init__(self, loras, sample):
        self.loras, self.sample = loras, sample
        self.deltas = {(l.name, t.kohya): M.reference_delta(l, t) for l in loras for t in sample}

    def expected(self, w0: torch.Tensor, target, strengths, out_factor=1.0) -> torch.Tensor:
        ref = w0.double().reshape(target.out_features, -1).clone()
        factor = C.out_block_factor(target) if out_factor != 1.0 else 1.0
        for lora, s in zip(self.loras, strengths):
            ref += (s * factor) * self.deltas[(lora.name, target.kohya)]
        return ref

    def snapshot(self, env) -> dict:
        return {t.kohya: env.live(t).detach().to("cpu", copy=True) for t in self.sample}

    def error(self, env, originals, strengths, out_factor=1.0) -> dict:
        worst, floor = 0.0, 0.0
        for t in self.sample:
            live = env.live(t).detach().to("cpu", torch.float64).reshape(t.out_features, -1)
            ref = self.expected(originals[t.kohya], t, strengths, out_factor)
            worst = max(worst, (live - ref).abs().max().item())
            floor = max(floor, (ref.to(originals[t.kohya].dtype).double() - ref).abs().max().item())
        return {"max_abs_err": worst, "rounding_floor": floor}

    def restored(self, env, originals) -> tuple[float, bool]:
        """(max |W - original|, every sampled weight bit-equal to its original)."""
        lives = [(env.live(t).detach().to("cpu"), originals[t.kohya]) for t in self.sample]
        return (max((live - orig).abs().max().item() for live, orig in lives),
                all(torch.equal(live, orig) for live, orig in lives))


def run_case(impl_factory, env, loras, reference, clock, device, repeat: int = 1) -> dict:
    """The case `repeat` times; times are the fastest per phase, checks must hold in every run."""
    rows = [run_case_once(impl_factory, env, loras, reference, clock, device) for _ in range(max(1, repeat))]
    best = rows[0]
    for row in rows[1:]:
        for step in ("patch", "strength", "blocks", "restore", "again"):
            for phase, value in row.get(step, {}).items():
                if phase not in ("keys_rewritten", "allocated"):
                    best[step][phase] = min(best[step][phase], value)
        for key in ("err_patch", "err_strength", "err_blocks"):
            if row[key]["max_abs_err"] > best[key]["max_abs_err"]:
                best[key] = row[key]
        best["restore_exact"] = best["restore_exact"] and row["restore_exact"]
        best["restore_max_abs_diff"] = max(best["restore_max_abs_diff"], row["restore_max_abs_diff"])
    best["repeats"] = len(rows)
    return best


def run_case_once(impl_factory, env, loras, reference, clock, device) -> dict:
    s1, s2 = strengths(len(loras))
    originals = reference.snapshot(env)
    mem0 = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    impl = impl_factory()
    row: dict = {"impl": impl.name}
    row["patch"] = impl.patch(clock, loras, s1)
    row["err_patch"] = reference.error(env, originals, s1)
    row["held_bytes"] = impl.held_bytes()
    if device.type == "cuda":
        row["held_bytes_cuda"] = torch.cuda.memory_allocated() - mem0
    row["side_branches"] = impl.side_branches()
    row["strength"] = impl.repatch(clock, s2)
    row["err_strength"] = reference.error(env, originals, s2)
    row["blocks"] = impl.repatch(clock, s2, C.OUT_FACTOR)
    row["err_blocks"] = reference.error(env, originals, s2, C.OUT_FACTOR)
    row["restore"] = impl.restore(clock)
    row["restore_max_abs_diff"], row["restore_exact"] = reference.restored(env, originals)
    if hasattr(impl, "again"):
        row["again"] = impl.again(clock)
        _, exact = reference.restored(env, originals)
        row["restore_exact"] = row["restore_exact"] and exact
    if hasattr(impl, "unload"):
        impl.unload()
    del impl
    C.free()
    return row


def warm_up(makers, impls, env, loras, reference, clock, device, results: dict, **labels) -> None:
    """One pass of every implementation before the timed runs: the first run in a process pays one-off costs
    (fresh memory pages, kernel and allocator warm-up, key maps built once per process) that would otherwise land
    on whichever implementation runs first. Its times are kept as the first-in-process figures
    (results["first"]; the timed rows are the warm ones)."""
    for name in impls:
        try:
            row = run_case_once(makers[name], env, loras, reference, clock, device)
        except Exception:  # a failing implementation is reported by its timed run
            C.free()
            continue
        row.update(labels, loras=len(loras))
        results.setdefault("first", []).append(row)
        log("  first in process: " + summary(row))


def total(phases: dict) -> float:
    return sum(v for k, v in phases.items() if k in ("load", "patch", "restore"))


def comfy_forward_check(env, loras, clock, device, dtype) -> dict:
    """UNet forward time unpatched vs patched by the engine and by our nodes: patching leaves no side branch."""
    unet = env.patcher.model.diffusion_model
    arch_is_xl = env.patcher.model.model_config.unet_config.get("adm_in_channels") is not None
    size = 64 if device.type == "cuda" else 32
    x = torch.randn(1, 4, size, size, device=device, dtype=dtype)
    t = torch.tensor([500.0], device=device)
    context = torch.randn(1, 77, 2048 if arch_is_xl else 768, device=device, dtype=dtype)
    kwargs = {"y": torch.randn(1, 2816, device=device, dtype=dtype)} if arch_is_xl else {}

    def forward():
        with torch.no_grad():
            return unet(x, timesteps=t, context=context, **kwargs)

    def best_of(n=3):
        forward()
        return min(clock(forward)[1] for _ in range(n))

    result = {"unpatched_s": best_of()}
    engine = C.EngineImpl(env)
    engine.patch(clock, loras, [1.0] * len(loras))
    result["engine_patched_s"] = best_of()
    engine.restore(clock)
    nodes = C.NodesImpl(env)
    nodes.patch(clock, loras, [1.0] * len(loras))
    result["nodes_patched_s"] = best_of()
    nodes.restore(clock)
    result["unpatched_again_s"] = best_of()
    return result


def bench_arch(args, arch: str, device: torch.device, clock, results: dict) -> None:
    dtype = model_dtype(args, arch)
    targets = M.kohya_targets(arch)
    sample = pick_sample(targets)
    factory = M.LoraFactory(targets)
    floor_bytes = sum(t.out_features * t.in_features for t in targets) * torch.finfo(dtype).bits // 8 * 2
    meta = {"arch": arch, "dtype": str(dtype).replace("torch.", ""), "targets": len(targets),
            "patched_params": sum(t.out_features * t.in_features for t in targets),
            "floor_bytes": floor_bytes, "floor_s_h200": floor_bytes / HBM_BYTES_PER_S}
    results["archs"][arch] = meta
    ranks, stack, impls = args.ranks, args.stack, args.impls
    if arch == "sdxl" and args.light_sdxl:
        ranks, stack, impls = [32], [1, 4], [i for i in impls if i in ("core", "nodes", "engine")]
    case_list = [(r, n) for r in ranks for n in stack]
    comfy_impls = [i for i in ("core", "nodes", "engine", "engine-batched", "engine-perweight") if i in impls]
    diffusers_impls = [i for i in ("lorapatcher", "diffusers") if i in impls]

    if comfy_impls:
        log(f"[{arch}] building ComfyUI model + CLIP ({meta['dtype']}, {device})")
        env = C.ComfyEnv(*M.comfy_models(arch, dtype, device), device)
        makers = {"core": lambda: C.CoreImpl(env), "nodes": lambda: C.NodesImpl(env),
                  "engine": lambda: C.EngineImpl(env),
                  "engine-batched": lambda: C.EngineImpl(env, batch_same_shape=True),
                  "engine-perweight": lambda: C.EngineImpl(env, batch_same_shape=False)}
        first = [factory.make(0, ranks[0])]
        warm_up(makers, comfy_impls, env, first, Reference(first, sample), clock, device, results, arch=arch,
                rank=ranks[0])
        for rank, n in case_list:
            loras = [factory.make(i, rank) for i in range(n)]
            reference = Reference(loras, sample)
            for name in comfy_impls:
                row = run_case(makers[name], env, loras, reference, clock, device, args.repeat)
                row.update(arch=arch, rank=rank, loras=n)
                results["rows"].append(row)
                log(summary(row))
            del reference
        if not args.no_forward and "engine" in comfy_impls:
            loras = [factory.make(0, 32 if 32 in ranks else ranks[0])]
            results["forward"][arch] = comfy_forward_check(env, loras, clock, device, dtype)
            log(f"[{arch}] forward: {results['forward'][arch]}")
        del env, makers   # the lambdas hold the env too: one implementation's model alive at a time
        C.free()

    if diffusers_impls:
        log(f"[{arch}] building diffusers UNet + transformers CLIP ({meta['dtype']}, {device})")
        env = C.DiffusersEnv(arch, M.diffusers_models(arch, dtype, device), device)
        makers = {"lorapatcher": lambda: C.LoraPatcherImpl(env), "diffusers": lambda: C.DiffusersImpl(env)}
        first = [factory.make(0, ranks[0])]
        warm_up(makers, diffusers_impls, env, first, Reference(first, sample), clock, device, results, arch=arch,
                rank=ranks[0])
        for rank, n in case_list:
            loras = [factory.make(i, rank) for i in range(n)]
            reference = Reference(loras, sample)
            for name in diffusers_impls:
                try:
                    row = run_case(makers[name], env, loras, reference, clock, device, args.repeat)
                except Exception as error:  # a reference library failing must not lose the other numbers
                    row = {"impl": name, "error": f"{type(error).__name__}: {error}"}
                    C.free()
                row.update(arch=arch, rank=rank, loras=n)
                results["rows"].append(row)
                log(summary(row))
        del env, makers
        C.free()


def bench_flux(args, device: torch.device, clock, results: dict) -> None:
    """Flux.1 at full width, reduced depth (bench/flux.py): kohya, diffusers-named and both stacked, one run."""
    from . import flux as F

    dtype = model_dtype(args, "flux")
    depth = F.parse_depth(args.flux_depth)
    config = F.unet_config(*depth)
    impls = [i for i in args.impls if i in ("core", "nodes", "engine", "engine-batched", "engine-perweight")]
    started = time.perf_counter()
    log(f"[flux] building ComfyUI Flux.1-dev at full width, {depth[0]} double + {depth[1]} single blocks "
        f"({str(dtype)[6:]}, {device})")
    env = C.ComfyEnv(F.comfy_flux(config, dtype, device), None, device, blocks=F.BLOCKS)
    layers = F.kohya_layers(env.patcher)
    meta = F.meta(config, dtype, layers)
    results["archs"]["flux"] = meta
    log(f"[flux] {meta['depth_text']}; {meta['width']}; {meta['targets']} patched weights, "
        f"{meta['patched_params'] / 1e6:.0f} M parameters")
    factory = F.FluxLoras(config, layers, F.diffusers_layers(config))
    originals = M.Originals(env.patcher.model, F.SEED)
    kohya, diffusers = factory.kohya(0), factory.diffusers(1)
    cases = [("kohya", [kohya]), ("diffusers", [diffusers])] + ([] if args.quick else [("kohya+diffusers",
                                                                                      [kohya, diffusers])])
    makers = {"core": lambda: C.CoreImpl(env), "nodes": lambda: C.NodesImpl(env), "engine": lambda: C.EngineImpl(env),
              "engine-batched": lambda: C.EngineImpl(env, batch_same_shape=True),
              "engine-perweight": lambda: C.EngineImpl(env, batch_same_shape=False)}
    warm = F.FluxReference([kohya], originals)
    warm_up(makers, impls, env, [kohya], warm, clock, device, results, arch="flux", rank=F.RANK, names="kohya")
    del warm
    for names, loras in cases:
        reference = F.FluxReference(loras, originals)
        for name in impls:
            row = run_case(makers[name], env, loras, reference, clock, device, args.repeat)
            row.update(arch="flux", rank=F.RANK, loras=len(loras), names=names,
                       modules=sum(len(lora.parts) for lora in loras))
            results["rows"].append(row)
            log(summary(row))
        del reference
    del env, makers
    C.free()
    log("[flux] engine per-weight overhead: Flux.1-dev's full block layout at width 64")
    results["overhead"]["flux"] = F.overhead(clock, device, dtype, repeat=3 if args.quick else 5, log=log)
    meta["wall_s"] = time.perf_counter() - started
    log(f"[flux] {meta['wall_s']:.0f} s")


def bench_wan(args, device: torch.device, clock, results: dict) -> None:
    """Wan 2.1 T2V 1.3B at full width (bench/wan.py): a rank-32 musubi LoRA through core, our nodes and the engine:
    patch, strength change, block change (cross-attention x0.5), restore, in one run."""
    from . import wan as W

    dtype = model_dtype(args, "wan")
    config = W.unet_config(W.parse_depth(args.wan_depth))
    impls = [i for i in args.impls if i in ("core", "nodes", "engine", "engine-batched", "engine-perweight")]
    started = time.perf_counter()
    log(f"[wan] building ComfyUI Wan 2.1 T2V 1.3B, {config['num_layers']} blocks ({str(dtype)[6:]}, {device})")
    env = C.ComfyEnv(W.comfy_wan(config, dtype, device), None, device, blocks=W.BLOCKS)
    layers = W.musubi_layers(env.patcher)
    meta = W.meta(config, dtype, layers)
    results["archs"]["wan"] = meta
    log(f"[wan] {meta['depth_text']}; {meta['width']}; {meta['targets']} patched weights, "
        f"{meta['patched_params'] / 1e6:.0f} M parameters")
    originals = M.Originals(env.patcher.model, W.SEED)
    lora = W.WanLoras(layers).musubi(0)
    makers = {"core": lambda: C.CoreImpl(env), "nodes": lambda: C.NodesImpl(env), "engine": lambda: C.EngineImpl(env),
              "engine-batched": lambda: C.EngineImpl(env, batch_same_shape=True),
              "engine-perweight": lambda: C.EngineImpl(env, batch_same_shape=False)}
    reference = W.WanReference([lora], originals)
    warm_up(makers, impls, env, [lora], reference, clock, device, results, arch="wan", rank=W.RANK, names="musubi")
    for name in impls:
        row = run_case(makers[name], env, [lora], reference, clock, device, args.repeat)
        row.update(arch="wan", rank=W.RANK, loras=1, names="musubi", modules=len(lora.parts))
        results["rows"].append(row)
        log(summary(row))
    del reference, env, makers
    C.free()
    meta["wall_s"] = time.perf_counter() - started
    log(f"[wan] {meta['wall_s']:.0f} s")


def machine_name() -> str:
    """The CPU as the OS names it (/proc/cpuinfo on Linux), its family/model numbers, and the memory size."""
    name, family, model, mem_kb = platform.processor() or platform.machine(), "", "", 0
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name" and name in ("", platform.machine(), platform.processor()):
                    name = value
                elif key == "cpu family" and not family:
                    family = value
                elif key == "model" and not model:
                    model = value
        with open("/proc/meminfo") as info:
            mem_kb = int(info.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    details = [f"family {family} model {model}"] if family else []
    details += [f"{os.cpu_count()} CPUs"] + ([f"{mem_kb / 2**20:.0f} GB RAM"] if mem_kb else [])
    return f"{name} ({', '.join(details)}), {platform.machine()}"


def log(text: str) -> None:
    print(text, flush=True)


def summary(row: dict) -> str:
    if "error" in row:
        return f"  {row['impl']:<11} r{row['rank']:<3} x{row['loras']}: FAILED {row['error']}"
    names = f" {row['names']}" if row.get("names") else ""
    return (f"  {row['impl']:<11} r{row['rank']:<3} x{row['loras']}{names}: patch {total(row['patch']):.3f}s "
            f"strength {total(row['strength']):.3f}s blocks {total(row['blocks']):.3f}s "
            f"restore {total(row['restore']):.3f}s err {row['err_patch']['max_abs_err']:.2e} "
            f"exact {row['restore_exact']}"
            + (f"; after restore: patch {row['again']['patch']:.3f}s ({row['again']['allocated']} new "
               f"allocations)" if row.get("again") else ""))


def add_ratios(results: dict) -> None:
    by_case: dict = {}
    for row in results["rows"]:
        if "error" not in row:
            by_case.setdefault((row["arch"], row["rank"], row["loras"], row.get("names")), {})[row["impl"]] = row
    for (arch, rank, n, names), impls in by_case.items():
        floor = results["archs"][arch]["floor_s_h200"]
        single = {}
        for row in impls.values():
            for base in ("core", "diffusers"):
                if base in impls:
                    for step in ("patch", "strength", "blocks", "restore"):
                        denominator = total(impls[base][step])
                        if denominator > 0:
                            row.setdefault("ratios", {})[f"{step}/{base}"] = total(row[step]) / denominator
            if results["device"] == "cuda":
                row["floor_fraction"] = floor / row["patch"]["patch"]
        for row in impls.values():
            one = next((r for r in results["rows"] if r.get("arch") == arch and r.get("rank") == rank
                        and r.get("loras") == 1 and r["impl"] == row["impl"] and "error" not in r
                        and (names is None or r.get("names") in names.split("+"))), None)
            if one is not None and n > 1:
                row["vs_one_lora"] = total(row["patch"]) / total(one["patch"])
        del single


def markdown(results: dict) -> str:
    lines = [f"# LoRA patch benchmark ({results['device']}, {results['when']})", "",
             f"torch {results['torch']}, {results['threads']} threads, {results['machine']}", ""]
    for arch, meta in results["archs"].items():
        lines.append(f"- {arch}: {meta['targets']} kohya targets, {meta['patched_params'] / 1e6:.1f} M patched "
                     f"params, {meta['dtype']}; H200 floor {meta['floor_s_h200'] * 1e3:.2f} ms"
                     + (f"; full width ({meta['width']}), {'reduced ' if arch == 'flux' else ''}depth: "
                        f"{meta['depth_text']}; {meta['wall_s']:.0f} s"
                        if arch in ("flux", "wan") else ""))
    lines += ["", "Times in seconds: load = LoRA mapping/host-side work, patch = weight math; re-patch and restore "
              "totals include every phase. err = max |W - fp64 reference| over sampled targets "
              "(rounding floor of the dtype in brackets).", "",
              "| arch | rank | LoRAs | impl | load | patch | total | ÷core | ÷diffusers | n÷1 | strength re-patch | ÷core "
              "| block re-patch | ÷core | restore | held MB | err (floor) | restore exact | side branches |"
              + (" floor frac |" if results["device"] == "cuda" else ""),
              "|" + "---|" * (19 + (results["device"] == "cuda"))]
    for row in results["rows"]:
        if "error" in row:
            label = f"{row['arch']} {row['names']}" if row.get("names") else row["arch"]
            lines.append(f"| {label} | {row['rank']} | {row['loras']} | {row['impl']} | failed: "
                         f"{row['error'][:80]} |")
            continue
        r = row.get("ratios", {})
        fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else "–"  # noqa: E731
        err = row["err_patch"]
        arch = f"{row['arch']} {row['names']}" if row.get("names") else row["arch"]
        cells = [arch, row["rank"], row["loras"], row["impl"], fmt(row["patch"].get("load")),
                 fmt(row["patch"]["patch"]), fmt(total(row["patch"])), fmt(r.get("patch/core")),
                 fmt(r.get("patch/diffusers")), fmt(row.get("vs_one_lora")), fmt(total(row["strength"])),
                 fmt(r.get("strength/core")), fmt(total(row["blocks"])), fmt(r.get("blocks/core")),
                 fmt(total(row["restore"])), f"{row.get('held_bytes_cuda', row['held_bytes']) / 2**20:.0f}",
                 f"{err['max_abs_err']:.1e} ({err['rounding_floor']:.1e})", row["restore_exact"],
                 row["side_branches"]]
        if results["device"] == "cuda":
            cells.append(fmt(row.get("floor_fraction")))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if results.get("first"):
        lines += ["", "First patch in the process (the untimed pass before the rows above: fresh memory, key maps "
                      "and caches built once per process) against the warm figures above, same case, seconds. "
                      "The engine keeps its backup memory across a restore (engine.BackupPool): `after restore` "
                      "is its patch on that memory, then `restore(release=True)`.", "",
                  "| arch | rank | LoRAs | impl | first: load | first: patch | first total | warm total | "
                  "first ÷ warm | first ÷ core's first | engine after restore |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in results["first"]:
            warm = next((r for r in results["rows"] if "error" not in r and r["impl"] == row["impl"]
                         and r["arch"] == row["arch"] and r["rank"] == row["rank"] and r["loras"] == row["loras"]
                         and r.get("names") == row.get("names")), None)
            core = next((r for r in results["first"] if r["impl"] == "core" and r["arch"] == row["arch"]), None)
            fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else "–"  # noqa: E731
            arch = f"{row['arch']} {row['names']}" if row.get("names") else row["arch"]
            again = row.get("again")
            cells = [arch, row["rank"], row["loras"], row["impl"], fmt(row["patch"].get("load")),
                     fmt(row["patch"]["patch"]), fmt(total(row["patch"])),
                     fmt(total(warm["patch"])) if warm else "–",
                     fmt(total(row["patch"]) / total(warm["patch"])) if warm else "–",
                     fmt(total(row["patch"]) / total(core["patch"])) if core else "–",
                     f"{again['patch']:.3f} ({again['allocated']} allocations)" if again else "–"]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if results["forward"]:
        lines += ["", "UNet forward after patching (s, best of 3):", ""]
        for arch, fwd in results["forward"].items():
            lines.append(f"- {arch}: " + ", ".join(f"{k} {v:.4f}" for k, v in fwd.items()))
    for arch, over in results.get("overhead", {}).items():
        lines += ["", f"{arch}: engine per-weight overhead, µs per written weight of PatchEngine.apply (planning "
                      f"in brackets): Flux.1-dev's {over['depth'][0]} + {over['depth'][1]} blocks at width "
                      f"{over['width']}, SD1.5's UNet layout at 32 channels; {over['threads']} thread(s), best of "
                      f"{over['repeat']}:", "",
                  "| LoRA | engine path | modules | weights | first patch | strength change | block change | weights "
                  "rewritten by the block change | restore |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in over["rows"]:
            lines.append(f"| {r['names']} | {r['path']} | {r['modules']} | {r['patch_weights']} | "
                         f"{r['patch_us']:.1f} ({r['patch_plan_us']:.1f}) | {r['strength_us']:.1f} "
                         f"({r['strength_plan_us']:.1f}) | {r['blocks_us']:.1f} ({r['blocks_plan_us']:.1f}) | "
                         f"{r['blocks_weights']} | {r['restore_us']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        log("--device cuda but no CUDA device is visible")
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    clock = C.Clock(device)
    results = {"device": args.device, "when": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "machine": machine_name(),
               "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
               "args": {k: v for k, v in vars(args).items()}, "archs": {}, "rows": [], "forward": {},
               "overhead": {}}
    started = time.perf_counter()
    for arch in args.arch:
        if arch == "flux":
            bench_flux(args, device, clock, results)
        elif arch == "wan":
            bench_wan(args, device, clock, results)
        else:
            bench_arch(args, arch, device, clock, results)
    add_ratios(results)
    results["wall_s"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{args.device}-{'quick-' if args.quick else ''}{time.strftime('%Y%m%d-%H%M%S')}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str))
    table = markdown(results)
    (out / f"{stem}.md").write_text(table)
    log(table)
    log(f"wrote {out / stem}.json and .md in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
