"""Training on a quantised base: peak memory and steps/s of LoRACoreTrain on an fp8 base against the full-precision
base, in one run. Not a test.

    .venv/bin/python bench/train_quant_bench.py [--channels 128] [--steps 20] [--size 16] [--rank 16] [--batch 2]
                                                [--device cpu|cuda] [--cases fp32,fp8,fp8-comfy-forward,...]

An SD1.5-shaped UNet built with ComfyUI's classes (`--channels` model channels, levels 1/2/4, attention on the
first two, context 32 for the tiny CLIP; 128 channels = ~60 M parameters) is written once as an fp32 and as an
fp8 (e4m3fn) checkpoint; each case then runs in a fresh process that loads its checkpoint the way
`load_diffusion_model_state_dict` does with UNETLoader's weight_dtype (manual-cast ops, fp32 compute on CPU,
bf16 on GPU) and trains `--steps` steps through the LoRACoreTrain node (tiny CLIP + TAESD, eight images of
8 * size px, batch `--batch`, rank `--rank`, default targets):

* `fp32`: the full-precision base (CPU; `bf16` on CUDA).
* `fp8`: the fp8 base as loaded (base_quant "as loaded"): each layer cast per call, no cast copy kept for backward.
* `fp8-comfy-forward`: the same, but with ComfyUI's layer forwards used as they are (LoRA Core's frozen-cast path
  switched off): what training on an fp8 base costs when autograd keeps each layer's cast weight.
* `nf4` (bitsandbytes): the bf16 base (fp32 on CPU, through bitsandbytes' CPU backend) with base_quant "nf4".

Peak memory: on CPU the peak process RSS (sampled every 5 ms) above the RSS after the imports, so the base's
weights count; on CUDA torch.cuda.max_memory_allocated. steps/s: the trainer's own timing (the training loop,
latent caching excluded), from the node's report.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def unet_config(channels: int) -> dict:
    from tests import tiny_models as tm

    return tm.unet_config_sd15(model_channels=channels, channel_mult=(1, 2, 4), context_dim=32)


def write_checkpoints(args, folder: Path) -> dict:
    import safetensors.torch
    import torch
    from tests.comfy_host import import_comfy

    import_comfy(cpu=True)
    import comfy.supported_models
    from tests import tiny_models as tm

    config = comfy.supported_models.SD15(unet_config(args.channels))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu")).to(torch.float32)
    tm.seed_weights(model, 0)
    state = {k: v.detach().contiguous() for k, v in model.diffusion_model.state_dict().items()}
    params = sum(v.numel() for v in state.values())
    paths = {"fp32": folder / "unet_fp32.safetensors", "bf16": folder / "unet_bf16.safetensors",
             "fp8": folder / "unet_fp8.safetensors"}
    safetensors.torch.save_file(state, str(paths["fp32"]))
    safetensors.torch.save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(paths["bf16"]))
    safetensors.torch.save_file({k: v.to(torch.float8_e4m3fn) for k, v in state.items()}, str(paths["fp8"]))
    return {"params": params, "paths": {k: str(v) for k, v in paths.items()}}


def load_unet(path: str, dtype, device, channels: int):
    """comfy.sd.load_diffusion_model_state_dict's steps after detection (which only knows full-size configs)."""
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    sd = comfy.utils.load_torch_file(path, safe_load=True)
    config = comfy.supported_models.SD15(unet_config(channels))
    config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, device, config.supported_inference_dtypes))
    model = config.get_model(sd, "", device=torch.device("cpu"))
    model.load_model_weights(sd, "")
    del sd
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def run_case(args) -> dict:
    """One case in this (fresh) process; prints a JSON line."""
    import torch
    from tests.comfy_host import import_comfy

    cuda = args.device == "cuda"
    import_comfy(cpu=not cuda)
    torch.set_num_threads(args.threads)
    from bench.train_bench import PeakRSS
    from tests import tiny_models as tm
    from tests.pack import loras_folder
    from tests.test_train_nodes import DATASET_DEFAULTS, nt, tiny_vae, train_kwargs

    import lora_core.train as lt

    device = torch.device(args.device)
    clip, vae = tm.comfy_clip_sd15(), tiny_vae()
    gen = torch.Generator().manual_seed(0)
    size = 8 * args.size
    images = torch.rand((8, size, size, 3), generator=gen)
    dataset = nt.LoRACoreTrainDataset().build(images=images, **{**DATASET_DEFAULTS, "resolution": size,
                                                                "min_bucket": 64, "max_bucket": 1024})[0]
    if args.case == "fp8-comfy-forward":     # LoRA Core's frozen-cast path off: ComfyUI's layer forwards as is
        class Off(lt.FrozenBase):
            def _hook(self, module):
                self.report.own_forward += 1

        nt.lt.FrozenBase = Off
    stored = {"fp32": "fp32", "bf16": "bf16", "nf4": "bf16" if cuda else "fp32"}.get(args.case, "fp8")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[stored]
    import gc

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    with PeakRSS() as rss:
        model = load_unet(args.paths[stored], dtype, device, args.channels)
        with tempfile.TemporaryDirectory() as out, loras_folder(Path(out)):
            result = nt.LoRACoreTrain().train(
                model, clip, vae, dataset, **train_kwargs(
                    output_name=args.case, steps=args.steps, rank=args.rank, alpha=float(args.rank),
                    batch_size=args.batch, train_text_encoder=False, base_quant="nf4" if args.case == "nf4" else
                    "as loaded", mixed_precision="auto"))
    report = result[5]
    steps_per_s = float(re.search(r"([\d.]+) steps/s", report).group(1))
    peak = (torch.cuda.max_memory_allocated() - base_cuda) / 2 ** 20 if cuda else rss.delta_mib
    weights = {}
    for p in model.model.diffusion_model.parameters():
        name = str(p.dtype).replace("torch.", "")
        weights[name] = weights.get(name, 0) + p.numel() * p.element_size()
    base_line = next((line for line in report.splitlines() if line.startswith("base:")), "")
    return {"case": args.case, "steps_per_s": steps_per_s, "peak_mib": round(peak, 1),
            "weights_mib": {k: round(v / 2 ** 20, 1) for k, v in weights.items()}, "base": base_line,
            "last_loss": float(re.search(r"mean loss ([\d.]+)", report).group(1))}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=16, help="latent size (images are 8x)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--cases", default="")
    parser.add_argument("--case", default="", help=argparse.SUPPRESS)
    parser.add_argument("--paths", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        args.paths = json.loads(args.paths)
        print("RESULT " + json.dumps(run_case(args)), flush=True)
        return
    cases = [c for c in args.cases.split(",") if c] or (
        ["bf16", "fp8", "fp8-comfy-forward", "nf4"] if args.device == "cuda" else ["fp32", "fp8", "fp8-comfy-forward", "nf4"])
    with tempfile.TemporaryDirectory() as folder:
        made = write_checkpoints(args, Path(folder))
        print(f"UNet: SD1.5 layout, {args.channels} channels, {made['params'] / 1e6:.1f} M parameters; "
              f"{args.steps} steps, batch {args.batch}, rank {args.rank}, latents {args.size}x{args.size}, "
              f"{args.device}, {args.threads} threads", flush=True)
        rows = []
        for case in cases:
            command = [sys.executable, __file__, "--case", case, "--paths", json.dumps(made["paths"])] + [
                f"--{k}={getattr(args, k)}" for k in ("channels", "steps", "size", "rank", "batch", "threads",
                                                       "device")]
            done = subprocess.run(command, capture_output=True, text=True)
            line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                error = (done.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"{case}: failed ({error})", flush=True)
                continue
            rows.append(json.loads(line[len("RESULT "):]))
            print(f"{case}: done", flush=True)
    memory = "peak RSS above imports" if args.device == "cpu" else "peak CUDA memory"
    print(f"\n| base | weights stored | {memory} (MiB) | steps/s | last-20 loss |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        stored = ", ".join(f"{k} {v} MiB" for k, v in row["weights_mib"].items())
        print(f"| {row['case']} | {stored} | {row['peak_mib']:.0f} | {row['steps_per_s']:.2f} | "
              f"{row['last_loss']:.4f} |")


if __name__ == "__main__":
    main()
