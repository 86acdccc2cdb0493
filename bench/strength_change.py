"""Where ComfyUI spends the time of a strength change: `python -m bench.strength_change [--device cuda]`.

The main bench times patch/unpatch directly. This one goes through ComfyUI's real path: a LoRA node's strength
changes, the node returns a new clone (new patches_uuid), and `model_management.load_models_gpu` swaps it in:
the loaded clone is detached, the new clone's `partially_load` sees another patches_uuid, unpatches every
weight (restoring all backups and moving the model to the offload device) and loads again, recomputing every
patched weight. Exclusive time is attributed to:

  restore   ModelPatcher.unpatch_model (backups copied/set back)
  move      torch.nn.Module.to (the model off the device and back; zero on a CPU-only host)
  math      comfy.lora.calculate_weight (the LoRA arithmetic: core's or our adapter's)
  copies    the rest of ModelPatcher.patch_weight_to_device (backup, fp32 working copy, rounding, set)
  other     everything else load_models_gpu does

for core's LoraLoader chain and for LoRA Core's loader (one fused adapter per weight), same model, same LoRA,
and for LoRA Core's live mode (nodes/live.py: the LoRA applied at forward time; the new clone keeps the loaded
one's patches_uuid, so ComfyUI restores, moves and recomputes nothing).

Each change is timed from the node's re-run (`node`: plan + clone + patches, what ComfyUI executes when a widget
changed) to the end of `load_models_gpu` (`total` = node + load: the model is ready for the first sampler step),
for a strength change (every LoRA's slider moved) and a block-vector change (UNet output blocks / Flux single
blocks x0.5). The first change of each implementation in this process (`first`) is reported apart from the best
of the following ones (`warm`): fresh memory pages and allocator growth land on the first.

`--steps` adds the per-step sampling cost: one denoiser call (`BaseModel.apply_model`, batch 1, the latent size
given) on the plain model, with live LoRAs of ranks 8, 32, 128 and a 4-LoRA stack of rank 32 (live), and with the
merged rank-32 LoRA (merged weights cost nothing per step): `--repeat` rounds, each loading and timing every case
in turn (so a change in the shared machine's load falls on all cases alike), best per case. On a CPU the live
cases also report the time spent inside the LoRA terms (`LiveLayer.add`) during one call, relative to the rest
of that call: the overhead measured within one forward, free of the load changes between separate calls.

    python -m bench.strength_change [--arch sd15|flux|sd15,flux] [--device cuda] [--steps] [--latent 64]

`--arch sd15,flux` runs both cases in one process (the README's table: one run, each ratio within it).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Optional

import torch

PHASES = ("restore", "move", "math", "copies", "other")


class Attribution:
    """Wraps functions so each call's time counts once, for the innermost wrapped function (exclusive time)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.times = dict.fromkeys(PHASES, 0.0)
        self.stack: list[list[float]] = []   # per active call: [start, time spent in wrapped children]

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def wrap(self, owner, name: str, phase: str):
        real = getattr(owner, name)

        def timed(*args, **kwargs):
            self.stack.append([self.now(), 0.0])
            try:
                return real(*args, **kwargs)
            finally:
                start, children = self.stack.pop()
                spent = self.now() - start
                self.times[phase] += spent - children
                if self.stack:
                    self.stack[-1][1] += spent

        return real, timed

    @contextlib.contextmanager
    def installed(self):
        import comfy.lora
        import comfy.model_patcher

        targets = [(comfy.model_patcher.ModelPatcher, "unpatch_model", "restore"),
                   (torch.nn.Module, "to", "move"),
                   (comfy.lora, "calculate_weight", "math"),
                   (comfy.model_patcher.ModelPatcher, "patch_weight_to_device", "copies")]
        saved = []
        for owner, name, phase in targets:
            real, timed = self.wrap(owner, name, phase)
            saved.append((owner, name, real))
            setattr(owner, name, timed)
        try:
            yield self
        finally:
            for owner, name, real in saved:
                setattr(owner, name, real)


def strength_change(impl, loras, device: torch.device) -> dict:
    """Load the LoRA at 1.0 the way sampling does, then change the strength to 0.5 and load again (timed)."""
    import comfy.model_management as mm

    model, clip = impl._build(loras, [1.0] * len(loras))
    mm.load_models_gpu(impl.env.patchers(model, clip), force_full_load=True)
    new_model, new_clip = impl._build(loras, [0.5] * len(loras))
    attribution = Attribution(device)
    with attribution.installed():
        begin = attribution.now()
        mm.load_models_gpu(impl.env.patchers(new_model, new_clip), force_full_load=True)
        wall = attribution.now() - begin
    attribution.times["other"] = wall - sum(attribution.times[p] for p in PHASES if p != "other")
    mm.unload_all_models()
    return {"total": wall, **attribution.times}


class LiveImpl:
    """LoRA Core's live nodes (nodes/live.py apply_live), same interface as bench.cases' _PatcherImpl._build."""

    name = "live"

    def __init__(self, env):
        self.env = env
        self.files: dict = {}   # one LoraFile per LoRA, as the nodes' file cache hands the same object again

    def requests(self, loras, strengths, blocks=None):
        from lora_core.api import LoraRequest
        from lora_core.types import LoraFile

        files = [self.files.setdefault(lora.name, LoraFile(None, lora.tensors)) for lora in loras]
        return [LoraRequest(f, s, s, block_weights=blocks, name=lora.name) for f, lora, s in zip(files, loras, strengths)]

    def _build(self, loras, strengths, out_factor: float = 1.0):
        from . import cases as C

        live = _live_module()
        host = live.LiveHost(self.env.patcher, self.env.clip)
        blocks = C._block_vector(host.key_map.arch.name, out_factor, self.env.blocks) if out_factor != 1.0 else None
        model, clip, _ = live.apply_live(self.env.patcher, self.env.clip, self.requests(loras, strengths, blocks), host)
        return model, clip


def _live_module():
    import importlib

    from . import cases as C

    C._host_module()
    return importlib.import_module("lora_core_pack.nodes.live")


def timed_change(impl, loras, device: torch.device, kind: str, clock) -> dict:
    """Load the stack at its first strengths the way sampling does, then re-run the node with the change and load
    again: {"node": s, "load": s, "total": s}."""
    import comfy.model_management as mm

    n = len(loras)
    model, clip = impl._build(loras, [1.0] * n)
    mm.load_models_gpu(impl.env.patchers(model, clip), force_full_load=True)
    if kind == "strength":
        args = ([0.5] * n,)
    else:
        args = ([1.0] * n, 0.5)
    (new_model, new_clip), node = clock(impl._build, loras, *args)
    _, load = clock(mm.load_models_gpu, impl.env.patchers(new_model, new_clip), force_full_load=True)
    mm.unload_all_models()
    return {"node": node, "load": load, "total": node + load}


def step_overhead(env, factory_make, device, dtype, latent: int, repeat: int, clock, log=print) -> dict:
    """Seconds per denoiser call: plain, live at ranks 8/32/128 and a 4 x rank-32 stack, merged rank 32."""
    import comfy.model_management as mm

    from . import cases as C

    live = _live_module()
    host = C._host_module().HostModels(env.patcher, None)
    base = env.patcher.model
    flux = base.diffusion_model.__class__.__name__ == "Flux"
    channels = 16 if flux else 4
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, channels, latent, latent, generator=gen).to(device, dtype)
    sigma = torch.tensor([0.5 if flux else 10.0], device=device)
    if flux:
        conds = {"c_crossattn": torch.randn(1, 256, 4096, generator=gen).to(device, dtype),
                 "y": torch.randn(1, 768, generator=gen).to(device, dtype),
                 "guidance": torch.tensor([3.5], device=device)}
    else:
        conds = {"c_crossattn": torch.randn(1, 77, 768, generator=gen).to(device, dtype)}

    cases = [("plain", None, None), ("live r8", [factory_make(0, 8)], "live"),
             ("live r32", [factory_make(0, 32)], "live"), ("live r128", [factory_make(0, 128)], "live"),
             ("live 4x r32", [factory_make(i, 32) for i in range(4)], "live"),
             ("merged r32", [factory_make(0, 32)], "merged")]
    patchers = {}
    for label, loras, how in cases:
        if loras is None:
            patchers[label] = env.patcher
        else:
            requests = C._requests(loras, [0.8] * len(loras))
            if how == "live":
                patchers[label] = live.apply_live(env.patcher, None, requests, host)[0]
            else:
                patchers[label] = host.apply(host.plan(requests))[0]
    # Rounds over every case (load it, one warm-up call, one timed call), best per case over the rounds: a
    # change in the shared machine's load then falls on every case alike instead of on whichever ran last.
    times: dict = {label: [] for label in patchers}
    shares: dict = {}
    rounds = max(1, repeat)
    for round_ in range(rounds):
        for label, patcher in patchers.items():
            mm.load_models_gpu([patcher], force_full_load=True)
            with torch.inference_mode():
                if round_ == 0:   # warm-up: the first call of a case allocates its buffers
                    patcher.model.apply_model(x, sigma, **conds)
                times[label].append(clock(patcher.model.apply_model, x, sigma, **conds)[1])
                if round_ == rounds - 1 and label.startswith("live") and device.type == "cpu":
                    shares[label] = lora_share(live.live.LiveLayer, patcher, x, sigma, conds)
            mm.unload_all_models()
            if round_ == rounds - 1:
                log(f"  {label}: {min(times[label]):.3f} s/step")
    return {label: min(t) for label, t in times.items()}, shares


def lora_share(layer_class, patcher, x, sigma, conds) -> tuple[float, float]:
    """(seconds inside the live LoRA terms, seconds of the whole call) of one denoiser call on a CPU: the LoRA's
    cost measured inside the same call, so the shared machine's load changes between calls do not enter it."""
    real = layer_class.add
    spent = [0.0]

    def timed(self, *args, **kwargs):
        begin = time.perf_counter()
        try:
            return real(self, *args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - begin

    layer_class.add = timed
    try:
        begin = time.perf_counter()
        patcher.model.apply_model(x, sigma, **conds)
        total = time.perf_counter() - begin
    finally:
        layer_class.add = real
    return spent[0], total


def build_env(arch: str, device: torch.device, flux_depth: Optional[str]):
    """(env, LoRA maker (index, rank) -> LoRA, description, dtype) of one bench case."""
    from . import cases as C
    from . import models as M

    if arch == "flux":
        from . import flux as F

        dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
        config = F.unet_config(*F.parse_depth(flux_depth))
        env = C.ComfyEnv(F.comfy_flux(config, dtype, device), None, device, blocks=F.BLOCKS)
        factory = F.FluxLoras(config, F.kohya_layers(env.patcher), F.diffusers_layers(config))
        make = lambda i, r: factory.kohya(i, r)  # noqa: E731
        shape = f"flux full width, {config['depth']}+{config['depth_single_blocks']} blocks"
    else:
        dtype = torch.float32 if device.type == "cpu" and arch == "sd15" else (
            torch.bfloat16 if device.type == "cpu" else torch.float16)
        env = C.ComfyEnv(*M.comfy_models(arch, dtype, device), device)
        factory = M.LoraFactory(M.kohya_targets(arch))
        make = factory.make
        shape = arch
    for patcher in env.patchers(env.patcher, env.clip):   # as ComfyUI sets it up: weights wait in RAM
        patcher.offload_device = torch.device("cpu")
    return env, make, shape, dtype


def run_case(arch: str, args, device: torch.device) -> dict:
    """The change table (and, with --steps, the per-step table) of one model, printed; returns the numbers."""
    import gc

    import comfy.model_management as mm

    from . import cases as C

    env, make, shape, dtype = build_env(arch, device, args.flux_depth)
    loras = [make(i, args.rank) for i in range(args.loras)]
    clock = C.Clock(device)
    print(f"# change to first sampler step through load_models_gpu: {shape} {str(dtype)[6:]} on {device}, "
          f"{args.loras}x rank {args.rank}; first = first change of that implementation in this process, "
          f"warm = best of {args.repeat} more (seconds)\n")
    print("| impl | change | first total | warm total | warm node | warm load | vs core (warm) |")
    print("|---|---|---|---|---|---|---|")
    impls = (C.CoreImpl(env), C.NodesImpl(env), LiveImpl(env))
    results: dict = {}
    for kind in ("strength", "block"):
        for impl in impls:
            runs = [timed_change(impl, loras, device, kind, clock) for _ in range(1 + max(1, args.repeat))]
            first, warm = runs[0], min(runs[1:], key=lambda r: r["total"])
            results[(impl.name, kind)] = (first, warm)
        core_warm = results[("core", kind)][1]["total"]
        for impl in impls:
            first, warm = results[(impl.name, kind)]
            print(f"| {impl.name} | {kind} | {first['total']:.3f} | {warm['total']:.3f} | {warm['node']:.3f} | "
                  f"{warm['load']:.3f} | {warm['total'] / core_warm:.3f}x |", flush=True)
    if args.attribution:
        print("\n| impl | total | " + " | ".join(PHASES) + " |")
        print("|---|---|" + "---|" * len(PHASES))
        for impl in impls[:2]:
            runs = [strength_change(impl, loras, device) for _ in range(max(1, args.repeat))]
            best = min(runs, key=lambda r: r["total"])
            print(f"| {impl.name} | {best['total']:.3f} | " + " | ".join(f"{best[p]:.3f}" for p in PHASES) + " |")
    steps = None
    if args.steps:
        latent = args.latent or (64 if device.type == "cuda" or arch != "flux" else 32)
        print(f"\n# per-step cost: one apply_model call, batch 1, latent {latent}x{latent}, best of {args.repeat} "
              f"rounds over every case\n")
        steps, shares = step_overhead(env, make, device, dtype, latent, args.repeat, clock, log=lambda *_: None)
        print("| model | s/step | vs plain (separate calls) | LoRA terms inside one call |")
        print("|---|---|---|---|")
        for label, seconds in steps.items():
            share = ""
            if label in shares:
                inside, total = shares[label]
                share = f"{inside:.4f} s = {100 * inside / (total - inside):+.1f}% of the rest"
            print(f"| {label} | {seconds:.4f} | {100 * (seconds / steps['plain'] - 1):+.1f}% | {share} |")
        steps = {"steps": steps, "shares": shares}
    print(flush=True)
    mm.unload_all_models()
    del env, loras
    gc.collect()
    return {"changes": results, "steps": steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--arch", default="sd15",
                   help="sd15, sdxl, flux, or several comma-separated (one process: e.g. sd15,flux)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--loras", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--flux-depth", default=None, help="D,S double and single blocks (bench.flux; default 2,4)")
    p.add_argument("--steps", action="store_true", help="also time one denoiser call (per-step overhead)")
    p.add_argument("--latent", type=int, default=None,
                   help="latent side for --steps (default 64; 32 for flux on a CPU)")
    p.add_argument("--attribution", action="store_true", help="also print the per-phase table of core vs nodes")
    args = p.parse_args(argv)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    bad = [a for a in archs if a not in ("sd15", "sdxl", "flux")]
    if bad or not archs:
        p.error(f"--arch: unknown {bad or args.arch!r}; use sd15, sdxl, flux or a comma-separated list")
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    from tests.comfy_host import import_comfy

    import_comfy(cpu=args.device == "cpu")
    device = torch.device(args.device)
    for arch in archs:
        run_case(arch, args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
