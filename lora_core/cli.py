"""The `lora-core` command (also `python -m lora_core`): inspect, convert, merge, resize and extract LoRAs outside
the graph, on the same library the nodes use.

    lora-core inspect my_lora.safetensors [--json] [--plot blocks.png] [--model base.safetensors]
    lora-core convert my_lora.safetensors --to kohya|diffusers|comfy [-o out.safetensors] [--family flux]
    lora-core merge a.safetensors:0.8 b.safetensors:1.0:0.5 -o merged.safetensors [--mode svd --rank 32]
                    [--blocks 2=named:IN*=0,OUT*=1]
    lora-core resize my_lora.safetensors --rank 16 -o small.safetensors
    lora-core extract base.safetensors tuned.safetensors --rank 32 [--conv-rank 16] -o extracted.safetensors

Exit codes: 0 done; 2 usage (bad or missing arguments); 3 bad input file (missing, corrupt, unsafe, not a LoRA /
checkpoint); 4 mismatch (the LoRA or checkpoints do not fit the model / each other); 5 bad value (rank,
strength, block vector, an unconvertible module); 6 the output file exists (pass --overwrite); 1 anything else;
130 interrupted. Errors go to stderr as one message naming the file / key / value and the fix.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_FILE, EXIT_MISMATCH, EXIT_VALUE, EXIT_EXISTS = 0, 1, 2, 3, 4, 5, 6
DTYPES = ("auto", "fp16", "bf16", "fp32")


class _Exit(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class _Progress:
    """tqdm on stderr when installed, else a plain line every 10%; silent with --quiet or --json."""

    def __init__(self, label: str, enabled: bool):
        self.label, self.enabled, self.bar, self.shown = label, enabled, None, -1

    def __call__(self, index: int, total: int, name: str) -> None:
        if not self.enabled or total <= 0:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            if self.bar is None:
                self.bar = tqdm(total=total, desc=self.label, unit="weight", file=sys.stderr, leave=False)
            self.bar.update(index - self.bar.n)
            if index >= total:
                self.bar.close()
            return
        step = index * 10 // total
        if step != self.shown:
            self.shown = step
            print(f"{self.label}: {index}/{total} weights", file=sys.stderr, flush=True)


def _dtype(name: str):
    import torch

    return {"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def _output(path: Optional[str], overwrite: bool, default: Optional[str] = None) -> str:
    path = path or default
    if not path:
        raise _Exit(EXIT_USAGE, "give the output file with -o/--output (a .safetensors path).")
    if not path.lower().endswith(".safetensors"):
        raise _Exit(EXIT_USAGE, f"output {path!r}: LoRA files are written as .safetensors; end the name in "
                                f".safetensors.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise _Exit(EXIT_USAGE, f"output {path!r}: the folder {folder} does not exist; create it first.")
    if os.path.exists(path) and not overwrite:
        raise _Exit(EXIT_EXISTS, f"output {path} already exists; pass --overwrite to replace it, or pick another "
                                 f"name.")
    return path


def _print(args, data: dict, text: str) -> None:
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text)


# ------------------------------------------------------------------------------------------- commands

def cmd_inspect(args) -> int:
    from .checkpoint import open_checkpoint
    from .info import inspect_lora, inspect_text, plot_blocks
    from .io import read_lora_file

    lora = read_lora_file(args.file)
    model = open_checkpoint(args.model) if args.model else None
    try:
        info = inspect_lora(lora, arch=args.family, model=model)
    finally:
        if model is not None:
            model.close()
    text = inspect_text(info)
    if args.plot:
        try:
            info["plot"] = plot_blocks(info, args.plot)
            text += f"\n  plot: {args.plot}"
        except ImportError:
            message = "matplotlib is not installed, so no plot was drawn; install it (pip install matplotlib)."
            info["plot_error"] = message
            print(message, file=sys.stderr)
    _print(args, info, text)
    if args.model and info.get("fit") and not info["fit"].get("fits"):
        return EXIT_MISMATCH if "error" in info["fit"] else EXIT_OK
    return EXIT_OK


def cmd_convert(args) -> int:
    from .convert import convert_lora
    from .io import read_lora_file

    stem, _ = os.path.splitext(args.file)
    out = _output(args.output, args.overwrite, f"{stem}_{args.to}.safetensors")
    lora = read_lora_file(args.file)
    key_map = None
    if args.model:
        from .checkpoint import bind_source, open_checkpoint

        with open_checkpoint(args.model) as model:
            key_map = bind_source(model)
    result = convert_lora(lora, args.to, arch=args.family, key_map=key_map)
    result.save(out, overwrite=args.overwrite)
    _print(args, result.as_dict(), result.text())
    return EXIT_OK


def _parse_source(spec: str) -> tuple[str, float, float]:
    """FILE[:STRENGTH_MODEL[:STRENGTH_CLIP]] (a path that exists as given wins over the colon split)."""
    if os.path.exists(spec):
        return spec, 1.0, 1.0
    parts = spec.rsplit(":", 2)
    numbers = []
    while len(parts) > 1:
        try:
            numbers.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    path = ":".join(parts)
    if not numbers:
        return spec, 1.0, 1.0
    model = numbers[0]
    clip = numbers[1] if len(numbers) > 1 else model
    return path, model, clip


def _requests(args, with_blocks: bool = True):
    from .api import LoraRequest
    from .io import read_lora_file

    requests = []
    for spec in args.files:
        path, strength_model, strength_clip = _parse_source(spec)
        requests.append(LoraRequest(read_lora_file(path), strength_model, strength_clip, name=os.path.basename(path)))
    if with_blocks and args.blocks:
        from . import blocks
        from .arch import get_arch, layout_key_map
        from .mix import detect_lora_arch

        spec = get_arch(args.family) if args.family else detect_lora_arch([r.lora for r in requests])
        key_map = layout_key_map(spec)
        for entry in args.blocks:
            index, _, rest = entry.partition("=")
            mode, _, vector = rest.partition(":")
            if not index.strip().isdigit() or not vector or mode not in ("a1111", "inspire", "named"):
                raise _Exit(EXIT_USAGE, f"--blocks {entry!r}: use INDEX=MODE:VECTOR, INDEX the LoRA's place in the "
                                        f"list (1 = first), MODE a1111, inspire or named, e.g. "
                                        f"'1=named:IN*=0.5,OUT*=1' or '2=a1111:1,0,0,0,0,0,0,0,1,1,1,1'.")
            position = int(index) - 1
            if not 0 <= position < len(requests):
                raise _Exit(EXIT_USAGE, f"--blocks {entry!r}: there is no LoRA number {index} (give 1..{len(requests)}).")
            request = requests[position]
            request.block_weights = blocks.resolve_for_lora(key_map, request.lora, mode, vector, seed=args.seed)
    return requests


def cmd_merge(args) -> int:
    from .mix import merge_loras

    out = _output(args.output, args.overwrite)
    requests = _requests(args)
    title = os.path.splitext(os.path.basename(out))[0]
    result = merge_loras(requests, mode=args.mode, rank=args.rank, energy=args.energy,
                         arch=args.family or None, save_dtype=_dtype(args.dtype), title=title, device=args.device)
    result.save(out, overwrite=args.overwrite)
    data = {"path": result.path, "mode": result.mode, "arch": result.arch.name, "modules": len(result.layers),
            "max_rank": result.max_rank, "warnings": result.warnings,
            "layers": [layer.__dict__ for layer in result.layers]}
    _print(args, data, result.text(per_layer=args.verbose))
    return EXIT_OK


def cmd_resize(args) -> int:
    from .io import read_lora_file
    from .mix import resize_lora

    stem, _ = os.path.splitext(args.file)
    out = _output(args.output, args.overwrite, f"{stem}_r{args.rank}.safetensors" if args.rank else None)
    lora = read_lora_file(args.file)
    title = os.path.splitext(os.path.basename(out))[0]
    result = resize_lora(lora, rank=args.rank, energy=args.energy, name=os.path.basename(args.file),
                         arch=args.family or None, save_dtype=_dtype(args.dtype), title=title, device=args.device)
    result.save(out, overwrite=args.overwrite)
    data = {"path": result.path, "arch": result.arch.name, "modules": len(result.layers),
            "max_rank": result.max_rank, "warnings": result.warnings,
            "layers": [layer.__dict__ for layer in result.layers]}
    _print(args, data, result.text(per_layer=args.verbose))
    return EXIT_OK


def cmd_extract(args) -> int:
    from .extract import extract_files

    out = _output(args.output, args.overwrite)
    components = tuple(c.strip() for c in args.components.split(",")) if args.components else None
    title = os.path.splitext(os.path.basename(out))[0]
    result = extract_files(args.base, args.tuned, rank=args.rank, conv_rank=args.conv_rank,
                           threshold=args.threshold, target_error=args.target_error, device=args.device,
                           save_dtype=_dtype(args.dtype), components=components, title=title,
                           progress=_Progress("extract", not (args.quiet or args.json)))
    result.save(out, overwrite=args.overwrite)
    _print(args, result.as_dict() if args.verbose else {k: v for k, v in result.as_dict().items()
                                                        if k != "per_module"},
           result.text(per_module=args.verbose))
    return EXIT_OK


# ------------------------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-core", description="Inspect, convert, merge, resize and extract LoRA files (LoRA Core).",
        epilog="Exit codes: 0 ok, 2 usage, 3 bad input file, 4 mismatch, 5 bad value, 6 output exists, 1 other.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def common(p, output=True, json_flag=True):
        if json_flag:
            p.add_argument("--json", action="store_true", help="print a JSON object instead of text (stdout)")
        if output:
            p.add_argument("-o", "--output", help="the .safetensors file to write")
            p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
        p.add_argument("--family", "--arch", dest="family", default=None,
                       help="the model variant when the file does not say (sd1, sdxl, flux, chroma, sd3, qwen, ...)")

    p = sub.add_parser("inspect", help="what a LoRA file is: format, algorithms, model, ranks, blocks, metadata",
                       description="Show a LoRA's format, algorithms, family and variant, rank/alpha per module "
                                   "group, blocks touched with per-block ||dW|| at strength 1, metadata (trigger "
                                   "words, tag frequencies, base model, training settings); with --model the "
                                   "loader's fit report on that checkpoint.")
    p.add_argument("file", help="the LoRA file (.safetensors, or .pt/.ckpt read weights-only)")
    p.add_argument("--model", help="a checkpoint to check the LoRA against (the loader's fit report)")
    p.add_argument("--plot", metavar="PNG", help="also draw per-block ||dW|| as a bar chart (needs matplotlib)")
    common(p, output=False)
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("convert", help="rename a LoRA to kohya, diffusers or ComfyUI names",
                       description="Rename every module to another writer's convention (kohya, diffusers/PEFT, "
                                   "ComfyUI), splitting or fusing qkv-style parts where the conventions differ. "
                                   "Tensors are copied unchanged unless fusing parts needs it (then exact).")
    p.add_argument("file")
    p.add_argument("--to", required=True, choices=("kohya", "diffusers", "comfy"))
    p.add_argument("--model", help="a checkpoint whose depth and widths decide the names (default: the family's "
                                   "full-size layout, scaled to the file's width)")
    common(p)
    p.set_defaults(run=cmd_convert)

    def mixing(p):
        p.add_argument("--rank", type=int, default=0, help="SVD: the most directions kept per layer")
        p.add_argument("--energy", type=float, default=0.0, help="SVD: kept share of each layer's squared "
                                                                 "singular values (0 = off)")
        p.add_argument("--dtype", choices=DTYPES, default="auto", help="tensor dtype of the written file")
        p.add_argument("--device", default=None, help="compute device (cpu, cuda, cuda:1)")
        p.add_argument("-v", "--verbose", action="store_true", help="list every layer")

    p = sub.add_parser("merge", help="merge LoRAs (strengths, block vectors) into one kohya file",
                       description="Merge N LoRAs into one kohya file: exact (ranks concatenated, lossless) or SVD. "
                                   "Each FILE may carry strengths: FILE:STRENGTH or FILE:MODEL:CLIP.")
    p.add_argument("files", nargs="+", metavar="FILE[:MODEL[:CLIP]]")
    p.add_argument("--mode", choices=("exact", "svd"), default="exact")
    p.add_argument("--blocks", action="append", metavar="INDEX=MODE:VECTOR",
                   help="block weights for the INDEX-th LoRA (1 = first) in a1111, inspire or named syntax, e.g. "
                        "'1=named:IN*=0.5,OUT*=1' (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed for random block values (R, U)")
    mixing(p)
    common(p)
    p.set_defaults(run=cmd_merge)

    p = sub.add_parser("resize", help="SVD rank reduction of one LoRA",
                       description="Reduce a LoRA's rank per layer by truncated SVD (to --rank and/or --energy).")
    p.add_argument("file")
    mixing(p)
    common(p)
    p.set_defaults(run=cmd_resize)

    p = sub.add_parser("extract", help="a LoRA from the difference of two checkpoints",
                       description="Extract a LoRA (LoCon where convolutions differ) from TUNED - BASE, two "
                                   "checkpoints of one model, by truncated SVD per weight; kohya names and metadata; "
                                   "reports the relative error per module group.")
    p.add_argument("base", help="the base checkpoint")
    p.add_argument("tuned", help="the fine-tuned checkpoint")
    p.add_argument("--rank", type=int, default=32, help="rank of linear (and 1x1 conv) layers (default 32)")
    p.add_argument("--conv-rank", type=int, default=None,
                   help="rank of k x k convolutions (LoCon); 0 leaves them out; default: --rank")
    p.add_argument("--threshold", type=float, default=0.0,
                   help="leave out weights whose largest |change| is at most this (default 0)")
    p.add_argument("--target-error", type=float, default=None,
                   help="per weight, the smallest rank whose relative error is at most this (e.g. 0.05); "
                        "--rank / --conv-rank cap it (0 = no cap)")
    p.add_argument("--components", default=None, help="only these, comma-separated (unet/transformer, te1, te2)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="tensor dtype (auto: fp16 for fp16 sources)")
    p.add_argument("--device", default=None, help="compute device (cpu, cuda)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="report every module")
    common(p)
    p.set_defaults(run=cmd_extract)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .errors import LoraFileError, LoraFormatError, LoraMatchError, LoraValueError

    parser = build_parser()
    args = parser.parse_args(argv)   # exits 2 on usage errors, 0 on --help
    try:
        return args.run(args)
    except _Exit as error:
        print(f"lora-core {args.command}: {error}", file=sys.stderr)
        return error.code
    except (LoraFileError, LoraFormatError) as error:
        text = str(error)
        code = EXIT_EXISTS if "already exists" in text else EXIT_FILE
        print(f"lora-core {args.command}: {text}", file=sys.stderr)
        return code
    except LoraMatchError as error:
        print(f"lora-core {args.command}: {error}", file=sys.stderr)
        return EXIT_MISMATCH
    except LoraValueError as error:
        print(f"lora-core {args.command}: {error}", file=sys.stderr)
        return EXIT_VALUE
    except KeyboardInterrupt:
        print(f"lora-core {args.command}: interrupted; nothing was written.", file=sys.stderr)
        return 130


if __name__ == "__main__":   # pragma: no cover
    sys.exit(main())
