"""Extraction benchmark: LoRA Core's `extract` against ComfyUI core's extraction node, full-size SD1.5, rank 32.

    .venv/bin/python -m bench.extract_bench                 # a subset: --modules 12 weights (a few minutes on 2 cores)
    .venv/bin/python -m bench.extract_bench --full          # the whole UNet + CLIP-L, both tools, end to end

Models: full-size SD1.5 (ComfyUI's own `supported_models.SD15` UNet and SD1 CLIP-L, random weights from
bench/models.py) as the base; the tuned model is the base plus a random rank-64 change of every LoRA target
weight plus small dense noise (so the change is full rank and rank 32 truncates it). Both are written as fp16
SD1 single-file checkpoints (`model.diffusion_model.`, `cond_stage_model.transformer.`).

Each tool runs in its own fresh Python process (peak memory = that process' ru_maxrss, which counts the
checkpoints' memory-mapped pages it touched as well as its own allocations):

* core, end to end (`--full`): `comfy.sd.load_checkpoint_guess_config` for both files, `ModelMergeSubtract` /
  `CLIPMergeSubtract` (comfy_extras/nodes_model_merging.py), then the extraction node's own
  `calc_lora_model` (comfy_extras/nodes_lora_extract.py: per weight `torch.linalg.svd` of the full matrix with
  full U and V, a 0.99-quantile clamp, fp16 factors) for the model and the text encoder, as `LoraSave` does;
* ours: `lora_core.extract.extract_files` (both files memory-mapped, one weight in memory at a time, thin SVD,
  kohya names and metadata), as `lora-core extract` runs it.

Subset mode runs both on the same `--modules` weights (largest 3x3 convs, attention, feed-forward and CLIP
linears): core's per-weight function `extract_lora(diff, rank)` on the dense change, ours `factor_difference`,
with the relative error of each against the optimal rank-32 truncation (singular values of the change).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------------------------------- the checkpoints

def make_checkpoints(folder: str, seed: int = 0) -> tuple[str, str]:
    """fp16 base and tuned SD1.5 single-file checkpoints (see the module docstring)."""
    from safetensors.torch import save_file

    from bench.models import comfy_models

    base_path, tuned_path = os.path.join(folder, "base.safetensors"), os.path.join(folder, "tuned.safetensors")
    if os.path.exists(base_path) and os.path.exists(tuned_path):
        return base_path, tuned_path
    model, clip = comfy_models("sd15", torch.float16, torch.device("cpu"))
    state = {"model." + k: v.detach().contiguous() for k, v in model.model.state_dict().items()}
    for k, v in clip.cond_stage_model.state_dict().items():
        if k.startswith("clip_l.transformer."):
            state["cond_stage_model.transformer." + k[len("clip_l.transformer."):]] = v.detach().contiguous()
    save_file(state, base_path)
    gen = torch.Generator().manual_seed(seed)
    tuned = {}
    for key, value in state.items():
        if value.ndim in (2, 4) and value.is_floating_point() and "embeddings" not in key:
            out, cols = value.shape[0], value[0].numel()
            rank = min(64, out, cols)
            # a decaying spectrum, as fine-tunes have: direction i weighs 1 / (1 + i / 8)
            decay = 1.0 / (1.0 + torch.arange(rank, dtype=torch.float32) / 8.0)
            u = torch.randn(out, rank, generator=gen) * decay * (0.2 / rank ** 0.5)
            v = torch.randn(rank, cols, generator=gen) / cols ** 0.5
            noise = torch.randn(out, cols, generator=gen) * (0.002 / cols ** 0.5)
            tuned[key] = (value.float() + (u @ v + noise).reshape(value.shape)).to(value.dtype).contiguous()
        else:
            tuned[key] = value
    save_file(tuned, tuned_path)
    del state, tuned, model, clip
    return base_path, tuned_path


# ------------------------------------------------------------------------------------------- full runs (children)

def run_ours(base: str, tuned: str, out: str, rank: int) -> dict:
    from lora_core.extract import extract_files

    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    result = extract_files(base, tuned, rank=rank)
    result.save(out, overwrite=True)
    seconds = time.perf_counter() - start
    groups = result.groups()
    return {"tool": "lora_core", "seconds": seconds, "peak_rss_mb": _peak_mb(), "modules": len(result.modules),
            "rel_error": {f"{g['component']}/{g['kind']}": g["rel_error"] for g in groups},
            "file_mb": os.path.getsize(out) / 2 ** 20}


def run_core(base: str, tuned: str, out: str, rank: int) -> dict:
    from tests.comfy_host import import_comfy

    import_comfy()
    import comfy.sd
    import comfy.utils
    from comfy_extras import nodes_lora_extract as extract
    from comfy_extras import nodes_model_merging as merging

    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    model_b, clip_b = comfy.sd.load_checkpoint_guess_config(base, output_vae=False, output_clip=True)[:2]
    model_t, clip_t = comfy.sd.load_checkpoint_guess_config(tuned, output_vae=False, output_clip=True)[:2]
    loaded = time.perf_counter() - start
    model_diff = merging.ModelSubtract().merge(model_t, model_b, 1.0)[0]
    clip_diff = merging.CLIPSubtract().merge(clip_t, clip_b, 1.0)[0]
    output = extract.calc_lora_model(model_diff, rank, "diffusion_model.", "diffusion_model.", {},
                                     extract.LORAType.STANDARD, bias_diff=False)
    output = extract.calc_lora_model(clip_diff.patcher, rank, "", "text_encoders.", output,
                                     extract.LORAType.STANDARD, bias_diff=False)
    comfy.utils.save_torch_file(output, out, metadata=None)
    seconds = time.perf_counter() - start
    return {"tool": "core", "seconds": seconds, "load_seconds": loaded, "peak_rss_mb": _peak_mb(),
            "modules": sum(1 for k in output if k.endswith(".lora_up.weight")), "file_mb": os.path.getsize(out) / 2 ** 20}


def _child(tool: str, base: str, tuned: str, out: str, rank: int) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {REPO!r}); from bench.extract_bench import run_{tool}; "
            f"print('RESULT ' + json.dumps(run_{tool}({base!r}, {tuned!r}, {out!r}, {rank})))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{tool} run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


# ------------------------------------------------------------------------------------------- subset

def subset(base: str, tuned: str, rank: int, modules: int) -> dict:
    """Both tools' per-weight math on the same weights, in this process, one weight at a time."""
    from tests.comfy_host import import_comfy

    import_comfy()
    from comfy_extras.nodes_lora_extract import extract_lora as core_extract

    from lora_core.checkpoint import open_checkpoint
    from lora_core.extract import factor_difference

    base_src, tuned_src = open_checkpoint(base), open_checkpoint(tuned)
    keys = [k for k, s in base_src.shapes.items() if len(s) in (2, 4) and "embeddings" not in k
            and k in tuned_src.shapes]
    by_size = sorted(keys, key=lambda k: -torch.Size(base_src.shapes[k]).numel())
    convs = [k for k in by_size if len(base_src.shapes[k]) == 4 and base_src.shapes[k][2] == 3]
    linears = [k for k in by_size if len(base_src.shapes[k]) == 2]
    chosen = list(dict.fromkeys(convs[: modules // 3] + [k for k in linears if "attn" in k][: modules // 3]
                                + [k for k in linears if "ff." in k or "mlp" in k][: modules - 2 * (modules // 3)]))
    rows = []
    totals = {"core": 0.0, "lora_core": 0.0}
    for key in chosen:
        diff = tuned_src.get(key).float() - base_src.get(key).float()
        s = torch.linalg.svdvals(diff.reshape(diff.shape[0], -1).double())
        optimum = float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())
        norm = float(diff.double().norm())
        t = time.perf_counter()
        up, down = core_extract(diff.clone(), rank)
        core_s = time.perf_counter() - t
        core_err = float((diff.reshape(diff.shape[0], -1) - up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
                          ).double().norm() / norm)
        t = time.perf_counter()
        up2, down2, *_ = factor_difference(diff.reshape(diff.shape[0], -1), rank)
        ours_s = time.perf_counter() - t
        ours_err = float((diff.reshape(diff.shape[0], -1) - up2 @ down2).double().norm() / norm)
        totals["core"] += core_s
        totals["lora_core"] += ours_s
        rows.append({"key": key, "shape": list(diff.shape), "core_s": core_s, "ours_s": ours_s,
                     "optimal_error": optimum, "core_error": core_err, "ours_error": ours_err})
        print(f"  {key:<72} {str(tuple(diff.shape)):<22} core {core_s:7.2f} s err {core_err:.5f} | ours "
              f"{ours_s:6.2f} s err {ours_err:.5f} | optimum {optimum:.5f}", flush=True)
    return {"mode": "subset", "rank": rank, "weights": rows, "totals_s": totals, "peak_rss_mb": _peak_mb()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="both tools end to end on the whole model")
    parser.add_argument("--modules", type=int, default=12, help="subset size (default 12)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--folder", default=None, help="where the checkpoints go (kept for reruns)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    folder = args.folder or os.path.join(tempfile.gettempdir(), "lora_core_extract_bench")
    os.makedirs(folder, exist_ok=True)
    t = time.perf_counter()
    base, tuned = make_checkpoints(folder)
    print(f"checkpoints: {base}, {tuned} ({os.path.getsize(base) / 2 ** 30:.2f} GiB each, "
          f"{time.perf_counter() - t:.0f} s)", flush=True)
    if args.full:
        results = {"mode": "full", "rank": args.rank, "cpu_threads": os.cpu_count()}
        for tool in ("lora_core", "core"):
            out = os.path.join(folder, f"{tool}_r{args.rank}.safetensors")
            print(f"running {tool} ...", flush=True)
            results[tool] = _child("ours" if tool == "lora_core" else "core", base, tuned, out, args.rank)
            print(json.dumps(results[tool]), flush=True)
    else:
        results = subset(base, tuned, args.rank, args.modules)
        print(f"totals: core {results['totals_s']['core']:.1f} s, ours {results['totals_s']['lora_core']:.1f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
