"""Training speed and memory: LoRA Core's loop vs ComfyUI core's TrainLoraNode, same tiny SD1.5 UNet, same
latents and conditioning, same rank, steps and batch size, in one run. Not a test.

    .venv/bin/python bench/train_bench.py [--steps 60] [--size 16] [--rank 8] [--device cpu|cuda] [--threads 1]

Memory: torch.cuda.max_memory_allocated on GPU; on CPU the peak process RSS above the pre-run baseline
(sampled every 5 ms). Core's node gets a list of single-latent LATENTs (its 0.3.75 single-batch bug).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


class PeakRSS:
    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.peak = self.base = self.process.memory_info().rss
        self._stop = threading.Event()

    def __enter__(self):
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()

    @property
    def delta_mib(self) -> float:
        return (self.peak - self.base) / 2 ** 20


def build(args):
    import torch
    from tests import tiny_models as tm

    model = tm.comfy_sd15()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # norm weights near 1 (see tests/test_train_core.py)
        for module in model.model.modules():
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and module.weight is not None:
                module.weight.copy_(1 + 0.02 * torch.randn(module.weight.shape, generator=gen))
                module.bias.zero_()
    if args.device == "cuda":
        import comfy.model_management as mm

        model.load_device = torch.device("cuda")
        model.model.to("cuda")
    latents = [torch.randn(1, 4, args.size, args.size, generator=gen) for _ in range(8)]
    context = torch.randn(1, 77, 768, generator=gen)
    return model, latents, context


def measure(fn, device):
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2 ** 20
    with PeakRSS() as rss:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    return seconds, rss.delta_mib


def run_ours(args):
    import torch
    import lora_core.train as lt

    model, latents, context = build(args)
    unet = model.model.diffusion_model
    sigmas = model.model.model_sampling.sigmas.float()

    class Backend:
        alphas_cumprod = 1 / (1 + sigmas ** 2)
        prediction_type = "epsilon"
        device = torch.device(args.device)

        def denoise(self, noisy, t, cond):
            return unet(noisy, t.float(), context=cond["context"], transformer_options={})

        def modules(self):
            return [unet]

    dataset = lt.TrainDataset([lt.Sample("x", latent=l[0], cond={"context": context}) for l in latents])
    cfg = lt.TrainConfig(steps=args.steps, batch_size=args.batch, rank=args.rank, alpha=1.0, unet_lr=5e-4,
                         min_snr_gamma=0, max_grad_norm=0, mixed_precision="fp32" if args.device == "cpu" else "bf16")
    network = lt.LoRANetwork(lt.find_unet_targets(unet), args.rank, 1.0)
    trainer = lt.LoraTrainer(Backend(), network, dataset, cfg)
    seconds, mib = measure(trainer.run, args.device)
    return seconds, mib, len(network.paths)


def run_core(args):
    import comfy_extras.nodes_train as nodes_train

    model, latents, context = build(args)
    inputs = dict(model=[model], latents=[{"samples": l} for l in latents], positive=[[[context, {}]]],
                  batch_size=[args.batch], steps=[args.steps], grad_accumulation_steps=[1], learning_rate=[5e-4],
                  rank=[args.rank], optimizer=["AdamW"], loss_function=["MSE"], seed=[0],
                  training_dtype=["fp32" if args.device == "cpu" else "bf16"],
                  lora_dtype=["fp32" if args.device == "cpu" else "bf16"], algorithm=["LoRA"],
                  gradient_checkpointing=[False], existing_lora=["[None]"])
    out = {}
    seconds, mib = measure(lambda: out.setdefault("r", nodes_train.TrainLoraNode.execute(**inputs)), args.device)
    lora = out["r"].result[1] if hasattr(out["r"], "result") else out["r"][1]
    return seconds, mib, len({k.rsplit(".", 2)[0] for k in lora if "lora_up" in k})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--size", type=int, default=16, help="latent side")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.device == "cpu":
        sys.argv = [sys.argv[0], "--cpu"]
    from tests.comfy_host import import_comfy

    import_comfy()
    import torch

    torch.set_num_threads(args.threads)
    print(f"tiny SD1.5 UNet (model_channels 32), latents 4x{args.size}x{args.size}, batch {args.batch}, rank "
          f"{args.rank}, {args.steps} steps, device {args.device}, torch threads {torch.get_num_threads()}")
    rows = []
    for name, fn in (("LoRA Core", run_ours), ("ComfyUI TrainLoraNode", run_core)):
        seconds, mib, modules = fn(args)
        rows.append((name, args.steps / seconds, mib, modules))
        print(f"{name:24s} {args.steps / seconds:7.2f} steps/s   peak mem +{mib:7.1f} MiB   {modules} adapted weights")
    ours, core = rows
    print(f"speed ratio (ours/core): {ours[1] / core[1]:.2f}x; memory ratio: {ours[2] / max(core[2], 1e-9):.2f}x")
    print("note: core adapts every weight (incl. norms, biases as diff/diff_b, resnet convs); ours the attention, "
          "FF and proj layers (kohya LoRA); both use the same UNet object.")


if __name__ == "__main__":
    main()
