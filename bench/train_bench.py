"""Training: LoRA Core's trainer vs ComfyUI core's TrainLoraNode, in one run. Not a test.

    .venv/bin/python bench/train_bench.py [--only speed|quality] [--threads 1]
        speed:   [--steps 60] [--size 16] [--rank 8] [--batch 1] [--device cpu|cuda]
        quality: [--q-steps 120] [--q-rank 4] [--q-lr 1e-3] [--seeds 0,...,7] [--pretrain 300]

Speed: the same tiny SD1.5 UNet, latents, conditioning, rank, steps and batch size; steps/s and peak memory.
Memory: torch.cuda.max_memory_allocated on GPU; on CPU the peak process RSS above the pre-run baseline (sampled
every 5 ms). Core's node gets a list of single-latent LATENTs (its 0.3.75 single-batch bug).

Quality (CPU): how much each trainer teaches the model its training images per step. Tiny SD1.5 + CLIP + TAESD
(tests/train_quality.py; the UNet first made a working denoiser on generic images), six 64 px images, the same
steps, learning rate, rank and batch size 1 for: core's TrainLoraNode (every weight, norms and biases, x0-space
loss, its defaults otherwise), our LoRACoreTrain node with its defaults (kohya's attention/feed-forward/proj
targets, alpha 8, min-SNR 5, eps loss, fp16 file), with unet_targets "all layers", and both of these with core's
x0-space loss (loss_weighting "x0": how much of an x0-space gap is the weighting, and ours against core on the
same objective), and with unet_targets "all layers + norms/biases" (core's target set) at the other defaults. Each run's MODEL output
is measured: the denoising error on the training latents through ComfyUI's apply_model, fixed noise, eight fixed
sigmas (10.2 ... 0.26), in x0 space and in the model's own prediction space (eps), before and after, averaged
over the seeds. x0 error weights each sigma by sigma^2 (the first sigma is most of it), eps error the low sigmas;
"per-sigma" is the mean of the eight per-sigma reductions (the same in both spaces).
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


def _node_kwargs(**overrides):
    """LoRACoreTrain's widget defaults (from its INPUT_TYPES), with `overrides`."""
    from tests.pack import node_module

    required = node_module("train").LoRACoreTrain.INPUT_TYPES()["required"]
    kwargs = {name: spec[1].get("default") for name, spec in required.items()
              if name not in ("model", "clip", "vae", "dataset") and len(spec) > 1}
    kwargs.update(overrides)
    return kwargs


QUALITY_RUNS = (("ComfyUI TrainLoraNode", "core", "every weight + norms/biases"),
                ("LoRA Core (defaults)", "attn+ff+proj", "attn+ff+proj (kohya)"),
                ("LoRA Core (all layers)", "all layers", "all layers"),
                # core's own objective (x0 MSE) on kohya's targets: how much of the x0-space gap is the loss
                # weighting and how much the target set (the node's loss_weighting input)
                ("LoRA Core (kohya, x0 loss)", "attn+ff+proj@x0", "attn+ff+proj, core's x0 loss"),
                # core's objective on every Linear/Conv (no norms, no biases): ours against core on the same loss
                ("LoRA Core (all, x0 loss)", "all layers@x0", "all layers, core's x0 loss"),
                # core's target set (every Linear/Conv + their biases and the norms as full diffs), our defaults
                ("LoRA Core (all+norms/biases)", "all layers + norms/biases", "all layers + norms/biases"))


def _quality_dataset(nt, host):
    """The dataset node at its defaults (resolution 512, buckets 256-1024 by 64) on the 64 px images."""
    return nt.LoRACoreTrainDataset().build(
        images=host.images, folder="", caption="sks square", missing_caption="error", repeats=1, resolution=512,
        bucketing=True, bucket_step=64, min_bucket=256, max_bucket=1024, shuffle_caption=False, keep_tokens=1,
        caption_dropout=0.0)


def quality_worker(args):
    """One training run in a fresh process (so its peak memory is its own): prints a RESULT json line."""
    import dataclasses
    import json
    import tempfile

    import torch
    from tests import train_quality as tq
    from tests.pack import loras_folder, node_module

    host = tq.build_host(pretrain_steps=0)
    host.model.model.diffusion_model.load_state_dict(torch.load(args.host_state))
    out = {}
    if args.q_worker == "core":
        seconds, mib = measure(lambda: out.setdefault("r", tq.train_core(
            host.model, host.latents, host.context, args.q_steps, args.q_lr, args.q_rank, args.seed)), "cpu")
        model_out, lora = out["r"]
        tensors = sum(k.endswith((".lora_up.weight", ".diff", ".diff_b")) for k in lora)
    else:
        nt = node_module("train")
        dataset, _ = _quality_dataset(nt, host)
        targets, _, weighting = args.q_worker.partition("@")
        kwargs = _node_kwargs(output_name="quality", steps=args.q_steps, rank=args.q_rank, unet_lr=args.q_lr,
                              unet_targets=targets, seed=args.seed, batch_size=1)
        if weighting:   # the node at its defaults but its loss_weighting input
            kwargs["loss_weighting"] = weighting
        with tempfile.TemporaryDirectory() as folder, loras_folder(folder):
            seconds, mib = measure(lambda: out.setdefault("r", nt.LoRACoreTrain().train(
                host.model, host.clip, host.vae, dataset, **kwargs)), "cpu")
            model_out, lora = out["r"][0], out["r"][2]
            tensors = len({k.split(".")[0] for k in lora.tensors})
    after = host.error(model_out)
    print("RESULT " + json.dumps(dict(seconds=seconds, mib=mib, tensors=tensors, after=dataclasses.asdict(after))))


def quality(args):
    """Error reduction per step on the training images: core vs ours (defaults, all layers), one run; every
    training run in its own process, the pretrained host shared through a file."""
    import json
    import subprocess
    import tempfile

    import torch
    from tests import train_quality as tq
    from tests.pack import node_module

    start = time.perf_counter()
    host = tq.build_host(pretrain_steps=args.pretrain)
    print(f"\nquality: tiny SD1.5 + CLIP + TAESD, UNet pretrained {args.pretrain} steps on generic images "
          f"({time.perf_counter() - start:.0f} s); {host.latents.shape[0]} training images 64 px; "
          f"{args.q_steps} steps, lr {args.q_lr:g}, rank {args.q_rank}, batch 1, seeds {args.seeds}; one process "
          f"per run, torch threads {args.threads}")
    base = host.error(host.model)
    share = base.x0_per_sigma[0] / sum(base.x0_per_sigma)
    print("sigmas " + " ".join(f"{s:.2f}" for s in base.sigmas) + "; x0 error before, per sigma "
          + " ".join(f"{e:.4f}" for e in base.x0_per_sigma) + f" (the first is {100 * share:.0f}% of the sum); eps "
          + " ".join(f"{e:.4f}" for e in base.pred_per_sigma))
    _, summary = _quality_dataset(node_module("train"), host)
    print("dataset (LoRACoreTrainDataset defaults, resolution 512): " + summary.replace("\n", "; "))
    rows = {name: dict(targets=label, seconds=[], mib=[], after=[], red=[]) for name, _, label in QUALITY_RUNS}
    with tempfile.TemporaryDirectory() as folder:
        state = os.path.join(folder, "unet.pt")
        torch.save(host.model.model.diffusion_model.state_dict(), state)
        for seed in args.seeds:
            for name, worker, _ in QUALITY_RUNS:
                command = [sys.executable, str(Path(__file__).resolve()), "--q-worker", worker, "--seed", str(seed),
                           "--host-state", state, "--q-steps", str(args.q_steps), "--q-rank", str(args.q_rank),
                           "--q-lr", str(args.q_lr), "--threads", str(args.threads)]
                done = subprocess.run(command, capture_output=True, text=True, cwd=str(REPO))
                lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if done.returncode or not lines:
                    raise RuntimeError(f"{name} seed {seed} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
                result = json.loads(lines[-1][len("RESULT "):])
                after = tq.DenoiseError(**result["after"])
                row = rows[name]
                row["tensors"] = result["tensors"]
                row["seconds"].append(result["seconds"])
                row["mib"].append(result["mib"])
                row["after"].append(after)
                row["red"].append(base.reduction(after))

    def mean(values):
        return sum(values) / len(values)

    def sem(values):
        """Standard error of the mean over the seeds (how far the mean itself may be off)."""
        if len(values) < 2:
            return float("nan")
        m = mean(values)
        return (sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values)) ** 0.5

    print(f"{'trainer':24s} {'targets':28s} {'tensors':>7s} {'steps/s':>7s} {'peak MiB':>8s} "
          f"{'x0 before':>9s} {'after':>7s} {'red.':>6s} {'/step':>7s} {'eps before':>10s} {'after':>7s} "
          f"{'red.':>6s} {'/step':>7s} {'per-sigma':>9s}")
    for name, row in rows.items():
        x0_after = mean([a.x0 for a in row["after"]])
        pred_after = mean([a.pred for a in row["after"]])
        x0_red = mean([r["x0"] for r in row["red"]])
        pred_red = mean([r["pred"] for r in row["red"]])
        row.update(x0_red=x0_red, pred_red=pred_red, per_sigma=mean([r["per_sigma"] for r in row["red"]]))
        print(f"{name:24s} {row['targets']:28s} {row['tensors']:7d} {args.q_steps / mean(row['seconds']):7.2f} "
              f"{max(row['mib']):8.1f} {base.x0:9.4f} {x0_after:7.4f} {100 * x0_red:5.1f}% "
              f"{100 * x0_red / args.q_steps:6.3f}% {base.pred:10.4f} {pred_after:7.4f} {100 * pred_red:5.1f}% "
              f"{100 * pred_red / args.q_steps:6.3f}% {100 * row['per_sigma']:8.1f}%")
    print("reduction per sigma (mean over seeds), sigma " + " ".join(f"{s:6.2f}" for s in base.sigmas))
    for name, row in rows.items():
        per = [mean([r["per_sigma_list"][i] for r in row["red"]]) for i in range(len(base.sigmas))]
        print(f"  {name:24s} " + " ".join(f"{100 * p:5.1f}%" for p in per))
    for name, row in rows.items():
        seeds = ", ".join(f"{100 * r['x0']:.1f}/{100 * r['pred']:.1f}" for r in row["red"])
        print(f"  {name:24s} x0/eps reduction per seed: {seeds}")
        x0s, preds = [r["x0"] for r in row["red"]], [r["pred"] for r in row["red"]]
        print(f"  {name:24s} mean +- standard error over {len(x0s)} seeds: x0 {100 * mean(x0s):.2f} +- "
              f"{100 * sem(x0s):.2f}%, eps {100 * mean(preds):.2f} +- {100 * sem(preds):.2f}%")
    core = rows["ComfyUI TrainLoraNode"]
    for name, _, _ in QUALITY_RUNS[1:]:
        row = rows[name]
        print(f"ratio {name} / core: x0 {row['x0_red'] / core['x0_red']:.2f}x, eps {row['pred_red'] / core['pred_red']:.2f}x, "
              f"per-sigma {row['per_sigma'] / core['per_sigma']:.2f}x, steps/s "
              f"{mean(core['seconds']) / mean(row['seconds']):.2f}x, peak memory "
              f"{max(row['mib']) / max(max(core['mib']), 1e-9):.2f}x")
    return rows


def speed(args):
    import torch

    print(f"speed: tiny SD1.5 UNet (model_channels 32), latents 4x{args.size}x{args.size}, batch {args.batch}, rank "
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=("speed", "quality"), default=None)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--size", type=int, default=16, help="latent side")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--q-steps", type=int, default=120)
    parser.add_argument("--q-rank", type=int, default=4)
    parser.add_argument("--q-lr", type=float, default=1e-3)
    parser.add_argument("--seeds", default="0,1,2,3,4,5,6,7")
    parser.add_argument("--pretrain", type=int, default=300)
    parser.add_argument("--q-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--host-state", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.device == "cpu":
        sys.argv = [sys.argv[0], "--cpu"]
    from tests.comfy_host import import_comfy

    import_comfy()
    import comfy.utils
    import torch

    comfy.utils.PROGRESS_BAR_ENABLED = False  # core's per-step tqdm bar
    torch.set_num_threads(args.threads)
    if args.q_worker:
        return quality_worker(args)
    if args.only != "quality":
        speed(args)
    if args.only != "speed":
        quality(args)


if __name__ == "__main__":
    main()
