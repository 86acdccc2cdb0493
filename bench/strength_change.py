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

for core's LoraLoader chain and for LoRA Core's loader (one fused adapter per weight), same model, same LoRA.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

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
    mm.load_models_gpu([model, clip.patcher], force_full_load=True)
    new_model, new_clip = impl._build(loras, [0.5] * len(loras))
    attribution = Attribution(device)
    with attribution.installed():
        begin = attribution.now()
        mm.load_models_gpu([new_model, new_clip.patcher], force_full_load=True)
        wall = attribution.now() - begin
    attribution.times["other"] = wall - sum(attribution.times[p] for p in PHASES if p != "other")
    mm.unload_all_models()
    return {"total": wall, **attribution.times}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--arch", default="sd15")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--loras", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    from tests.comfy_host import import_comfy

    import_comfy(cpu=args.device == "cpu")
    from . import cases as C
    from . import models as M

    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" and args.arch == "sd15" else (
        torch.bfloat16 if device.type == "cpu" else torch.float16)
    env = C.ComfyEnv(*M.comfy_models(args.arch, dtype, device), device)
    for patcher in (env.patcher, env.clip.patcher):   # as ComfyUI sets it up: weights wait in RAM when unloaded
        patcher.offload_device = torch.device("cpu")
    loras = [M.LoraFactory(M.kohya_targets(args.arch)).make(i, args.rank) for i in range(args.loras)]
    print(f"# strength change through load_models_gpu: {args.arch} {str(dtype)[6:]} on {device}, "
          f"{args.loras}x rank {args.rank}, best of {args.repeat} (seconds, exclusive time per phase)\n")
    print("| impl | total | " + " | ".join(PHASES) + " |")
    print("|---|---|" + "---|" * len(PHASES))
    rows = {}
    for impl in (C.CoreImpl(env), C.NodesImpl(env)):
        runs = [strength_change(impl, loras, device) for _ in range(max(1, args.repeat))]
        best = min(runs, key=lambda r: r["total"])
        rows[impl.name] = best
        print(f"| {impl.name} | {best['total']:.3f} | " + " | ".join(f"{best[p]:.3f}" for p in PHASES) + " |")
    print(f"\nnodes/core total {rows['nodes']['total'] / rows['core']['total']:.2f}, "
          f"math {rows['nodes']['math'] / max(rows['core']['math'], 1e-9):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
