"""The config file of `python -m lora_core.train CONFIG` (TOML or JSON): the model, the dataset folder and the
options of the "LoRA Training Dataset" and "LoRA Core Train" nodes, under the same names and defaults.

    model = "models/my-sd15"            # a diffusers SD / SDXL / Flux.1 / SD3 / Wan 2.1 T2V folder, or a
                                        # single-file SD checkpoint / Flux transformer file (+ model_config)
    model_config = ""                   # single file only: a local diffusers folder with its configs (offline)
    output_dir = "loras"                # created when missing
    output_name = "my_lora"             # -> loras/my_lora.safetensors (+ .state.pt, step files)
    run = "new run"                     # or "continue" (resume <output_name>.state.pt)

    [dataset]                           # the dataset node's options
    folder = "images"
    resolution = 512
    repeats = 10

    [train]                             # the train node's options; batch_size is per process (per GPU)
    steps = 500
    rank = 16
    unet_lr = 1e-4

    [distributed]
    backend = "auto"                    # nccl on CUDA, gloo on CPU
    device = "auto"                     # cuda:LOCAL_RANK when CUDA is there, else cpu

    validation_split = 0.1              # validation loss on held-out images (or validation_folder = "val")

Every option of the two nodes that makes sense without ComfyUI is a key here (tests/test_train_cli_options.py
compares them with the nodes' INPUT_TYPES): the dataset node's under [dataset], the train node's under [train],
including guidance, text_encoders, timestep_range, base_quant, lora_dtype and the validation loss
(validation_split, validation_folder, validate_every: its curve goes to the file's lora_core.validation_* metadata
and the state, as the node writes it; under torchrun every rank computes the same curve and rank 0 writes). Not
here: the model / clip / vae / dataset sockets (the model key replaces them), the images input (a folder only), and
the preview_* inputs: previews render with ComfyUI's sampler, so they are in-graph only and a preview key is refused.

Relative paths are relative to the config file's folder. Every key is checked (type, choices, range); an unknown
key, a wrong type or a bad value is refused with the file, the key, the value and what would be accepted.
"""
from __future__ import annotations

import difflib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from lora_core.errors import LoraFileError, LoraValueError

from .dataset import CAPTION_POLICIES
from .distributed import BACKENDS, DEVICES
from .loop import LOSS_WEIGHTINGS, OPTIMIZERS, PRECISIONS, SCHEDULERS
from .objective import TIMESTEP_SAMPLING
from .quant import BASE_QUANT, LORA_DTYPES

try:  # the training engineer's algorithm list (LoHa / LoKr / DoRA) once it is in
    from .algorithms import ALGORITHMS as _ALGORITHMS
except ImportError:  # pragma: no cover - depends on the merge order
    _ALGORITHMS = ("LoRA", "LoCon")

RUN_MODES = ("new run", "continue")
# The train node's unet_targets choices; what each trains is the family's (TrainSpec.target_sets), but the last:
# "all layers" plus every bias of those layers and every GroupNorm / LayerNorm as full diffs (diff_b / diff), the
# set ComfyUI core's Train LoRA node trains (in the train node only: the command-line trainer refuses it).
NORMS_BIASES = "all layers + norms/biases"
TARGET_CHOICES = ("attn+ff+proj", "attn+proj", "attn+ff", "attn", "all layers", NORMS_BIASES)


def resolve_targets(spec, choice: str) -> tuple:
    """(training kinds, norms_biases) of a unet_targets choice on a family's TrainSpec; kinds () = no meaning."""
    if choice == NORMS_BIASES:
        return tuple(spec.target_sets.get("all layers", ())), True
    return tuple(spec.target_sets.get(choice, ())), False
TEXT_ENCODER_CHOICES = ("kohya default", "all")
# The node's preview inputs render with ComfyUI's sampler: the command-line trainer has none, so a config naming one
# is refused (validation_split / validation_folder / validate_every do run here).
PREVIEW_KEYS = ("preview_every", "preview_prompts", "preview_seed", "preview_steps", "preview_cfg", "preview_sampler",
                "preview_scheduler", "preview_width", "preview_height", "preview_image")


@dataclass(frozen=True)
class Option:
    kind: type                      # bool, int, float, str
    default: Any
    choices: Optional[tuple] = None
    low: Optional[float] = None
    high: Optional[float] = None
    path: bool = False              # a path, resolved relative to the config file


TOP = {
    "model": Option(str, None, path=True),
    "model_config": Option(str, "", path=True),
    "output_dir": Option(str, "loras", path=True),
    "output_name": Option(str, "my_lora"),
    "run": Option(str, "new run", RUN_MODES),
    # "auto" = read from the model; or SD1 / SD2 / SDXL (any alias the architecture layer knows: sd15, pony, ...),
    # then the model must be that variant.
    "architecture": Option(str, "auto"),
}
# "LoRA Training Dataset" (nodes/train.py LoRACoreTrainDataset), same names, defaults and ranges.
DATASET = {
    "folder": Option(str, None, path=True),
    "caption": Option(str, ""),
    "missing_caption": Option(str, "error", tuple(CAPTION_POLICIES)),
    "repeats": Option(int, 10, low=1, high=10000),
    "resolution": Option(int, 512, low=64, high=4096),
    "bucketing": Option(bool, True),
    "bucket_step": Option(int, 64, low=8, high=256),
    "min_bucket": Option(int, 256, low=64, high=4096),
    "max_bucket": Option(int, 1024, low=64, high=8192),
    "shuffle_caption": Option(bool, False),
    "keep_tokens": Option(int, 1, low=0, high=100),
    "caption_dropout": Option(float, 0.0, low=0.0, high=1.0),
    # video samples (4k+1 frames; -1 = every frame, 0 = images only): read, then refused by image models
    "frames": Option(int, 0, low=-1, high=257),
}
# "LoRA Core Train" (nodes/train.py LoRACoreTrain), same names, defaults and ranges; batch_size is per process.
TRAIN = {
    "steps": Option(int, 500, low=1, high=1_000_000),
    "algorithm": Option(str, "LoRA", tuple(_ALGORITHMS)),
    "rank": Option(int, 16, low=1, high=512),
    "alpha": Option(float, 8.0, low=0.0, high=512.0),
    "unet_targets": Option(str, "attn+ff+proj", TARGET_CHOICES),
    "blocks": Option(str, ""),
    "block_lr": Option(str, ""),
    "unet_lr": Option(float, 1e-4, low=0.0, high=1.0),
    "train_text_encoder": Option(bool, False),
    "text_encoder_lr": Option(float, 5e-5, low=0.0, high=1.0),
    "optimizer": Option(str, "AdamW", tuple(OPTIMIZERS)),
    "lr_scheduler": Option(str, "constant", tuple(SCHEDULERS)),
    "warmup_steps": Option(int, 0, low=0, high=100000),
    "batch_size": Option(int, 1, low=1, high=256),
    "grad_accumulation": Option(int, 1, low=1, high=1024),
    "seed": Option(int, 0, low=0, high=0xFFFFFFFF),
    "min_snr_gamma": Option(float, 5.0, low=0.0, high=100.0),
    # DDPM loss weighting, loop.LOSS_WEIGHTINGS (the train node's last optional input)
    "loss_weighting": Option(str, "min-snr", tuple(LOSS_WEIGHTINGS)),
    "noise_offset": Option(float, 0.0, low=0.0, high=1.0),
    "mixed_precision": Option(str, "auto", tuple(PRECISIONS)),
    "gradient_checkpointing": Option(bool, False),
    "cache_latents": Option(bool, True),
    "cache_text_encoder_outputs": Option(bool, True),
    "save_every": Option(int, 0, low=0, high=1_000_000),
    "keep_last": Option(int, 3, low=0, high=1000),
    "save_precision": Option(str, "fp16", ("fp16", "bf16", "fp32")),
    "overwrite": Option(bool, False),
    "timestep_sampling": Option(str, "auto", tuple(TIMESTEP_SAMPLING)),
    "guidance": Option(float, 1.0, low=0.0, high=100.0),            # Flux.1 dev's guidance input
    "text_encoders": Option(str, "kohya default", TEXT_ENCODER_CHOICES),
    "timestep_range": Option(str, ""),                             # flow models: "min,max" on 0-1000
    "base_quant": Option(str, "as loaded", tuple(BASE_QUANT)),      # nf4 needs bitsandbytes (CUDA, or its CPU backend)
    "lora_dtype": Option(str, "fp32", tuple(LORA_DTYPES)),
    # validation loss (lora_core/train/validation.py), as the node computes it and writes it to the file / state
    "validation_split": Option(float, 0.0, low=0.0, high=0.5),
    "validation_folder": Option(str, "", path=True),
    "validate_every": Option(int, 0, low=0, high=1_000_000),
    # Not a node input (the node clips at 1.0, kohya's default): gradient-norm clipping, 0 = off.
    "max_grad_norm": Option(float, 1.0, low=0.0, high=1e6),
}
DISTRIBUTED = {
    "backend": Option(str, "auto", BACKENDS),
    "device": Option(str, "auto", DEVICES),
}
SECTIONS = {"dataset": DATASET, "train": TRAIN, "distributed": DISTRIBUTED}
REQUIRED = (("", "model"), ("dataset", "folder"))


@dataclass
class RunConfig:
    source: str                      # the config file
    model: str
    model_config: str
    output_dir: str
    output_name: str
    run: str
    architecture: str = "auto"
    dataset: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    distributed: dict = field(default_factory=dict)


def _where(source: str, section: str, key: str) -> str:
    return f"{source}: {'[' + section + '] ' if section else ''}{key}"


def _unknown(source: str, section: str, key: str, known) -> LoraValueError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    where = f"[{section}]" if section else "the top level"
    return LoraValueError(f"{source}: unknown key {key!r} in {where}.{hint} Known keys there: {sorted(known)}.")


def _check(source: str, section: str, key: str, value: Any, option: Option, base: str) -> Any:
    where = _where(source, section, key)
    kind = option.kind
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is bool and not isinstance(value, bool):
        raise LoraValueError(f"{where} = {value!r} must be true or false.")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise LoraValueError(f"{where} = {value!r} must be a whole number.")
    if kind is float and (isinstance(value, bool) or not isinstance(value, float)):
        raise LoraValueError(f"{where} = {value!r} must be a number.")
    if kind is str and not isinstance(value, str):
        raise LoraValueError(f"{where} = {value!r} must be a string (in quotes).")
    if kind is float and not math.isfinite(value):
        raise LoraValueError(f"{where} = {value!r} must be a finite number.")
    if option.choices is not None and value not in option.choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in option.choices], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise LoraValueError(f"{where} = {value!r} is not one of {list(option.choices)}.{hint}")
    if option.low is not None and value < option.low:
        raise LoraValueError(f"{where} = {value!r} is below the minimum {option.low:g}.")
    if option.high is not None and value > option.high:
        raise LoraValueError(f"{where} = {value!r} is above the maximum {option.high:g}.")
    if option.path and value:
        value = os.path.normpath(os.path.join(base, os.path.expanduser(value)))
    return value


def read_file(path: str) -> dict:
    """The raw table of a .toml or .json config file."""
    if not os.path.isfile(path):
        raise LoraFileError(f"Config file {path} does not exist.")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".toml", ".json"):
        raise LoraFileError(f"Config file {path}: use a .toml or .json file (got {ext or 'no extension'}).")
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        if ext == ".toml":
            import tomllib

            data = tomllib.loads(raw.decode("utf-8"))
        else:
            data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise LoraFileError(f"Config file {path} is not UTF-8 text ({error}).") from None
    except Exception as error:  # tomllib.TOMLDecodeError / json.JSONDecodeError carry line and column
        raise LoraFileError(f"Config file {path} cannot be parsed as {ext[1:].upper()}: {error}.") from None
    if not isinstance(data, dict):
        raise LoraFileError(f"Config file {path}: the top level must be a table of keys, got "
                            f"{type(data).__name__}.")
    return data


def parse(data: dict, source: str = "<config>", base: Optional[str] = None) -> RunConfig:
    """Check every key of a config table and fill the defaults; `base` is the folder relative paths start from."""
    base = base if base is not None else os.getcwd()
    top: dict = {}
    sections: dict = {name: {} for name in SECTIONS}
    for key, value in data.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise LoraValueError(f"{source}: {key} must be a section ([{key}] in TOML, an object in JSON), got "
                                     f"{value!r}.")
            options = SECTIONS[key]
            for sub, sub_value in value.items():
                if sub in PREVIEW_KEYS:
                    raise LoraValueError(f"{source}: [{key}] {sub} = {sub_value!r}: previews are in-graph only (they "
                                         f"render with ComfyUI's sampler, which the command-line trainer does not "
                                         f"have). Remove {sub}; use validation_split / validation_folder for a "
                                         f"validation loss, or the LoRA Core Train node for sample previews.")
                if sub not in options:
                    raise _unknown(source, key, sub, options)
                sections[key][sub] = _check(source, key, sub, sub_value, options[sub], base)
        elif key in TOP:
            top[key] = _check(source, "", key, value, TOP[key], base)
        else:
            if key in PREVIEW_KEYS:
                raise LoraValueError(f"{source}: {key} = {value!r}: previews are in-graph only (they render with "
                                     f"ComfyUI's sampler, which the command-line trainer does not have). Remove "
                                     f"{key}; use [train] validation_split / validation_folder for a validation loss.")
            for section, options in SECTIONS.items():
                if key in options:
                    raise LoraValueError(f"{source}: {key!r} belongs in the [{section}] section.")
            raise _unknown(source, "", key, list(TOP) + list(SECTIONS))
    for section, key in REQUIRED:
        present = top if not section else sections[section]
        if not present.get(key):
            where = f"[{section}] " if section else ""
            what = {"model": "a diffusers model folder or a checkpoint file",
                    "folder": "the folder of training images"}[key]
            raise LoraValueError(f"{source}: {where}{key} is missing: give {what}.")
    for name, options in (("", TOP), *SECTIONS.items()):
        target = top if not name else sections[name]
        for key, option in options.items():
            if key not in target:
                target[key] = option.default
    resolve_architecture(top["architecture"], source)
    if not top["output_name"].strip():
        raise LoraValueError(f"{source}: output_name is empty: give the LoRA's file name.")
    return RunConfig(source=source, model=top["model"], model_config=top["model_config"],
                     output_dir=top["output_dir"], output_name=top["output_name"], run=top["run"],
                     architecture=top["architecture"],
                     dataset=sections["dataset"], train=sections["train"], distributed=sections["distributed"])


# what the command-line trainer trains (diffusers folders; Flux.1 / Chroma also a diffusers transformer file +
# model_config; SD3 / SD3.5 a diffusers folder)
SUPPORTED_ARCHS = ("SD1", "SD2", "SDXL", "Flux.1-dev", "Flux.1-schnell", "Chroma", "SD3-Medium", "SD3.5-Medium",
                   "SD3.5-Large")
SUPPORTED_ARCHS += ("Wan-T2V-14B", "Wan2.1-T2V-1.3B")   # diffusers_wan.py: Wan 2.1 text-to-video


def resolve_architecture(name: str, source: str = "config") -> Optional[str]:
    """The config's `architecture` ("auto" = from the model) as a variant name, or a clear error."""
    if not name or name.strip().lower() == "auto":
        return None
    from lora_core.arch import get_arch

    try:
        arch = get_arch(name)
    except LoraValueError:
        arch = None
    if arch is None or arch.name not in SUPPORTED_ARCHS:
        trains = (f"The command-line trainer trains diffusers {' / '.join(SUPPORTED_ARCHS)} models (set architecture "
                  f"to one of them, or \"auto\" to read it from the model); train other families with the LoRA "
                  f"Core Train node in ComfyUI.")
        if arch is None:
            close = difflib.get_close_matches(name, ["auto", *SUPPORTED_ARCHS, "sdxl", "sd15", "sd21", "flux",
                                                     "flux-schnell", "chroma", "sd3", "sd3.5-medium", "sd3.5-large"],
                                              n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise LoraValueError(f"{source}: architecture = {name!r} is not an architecture LoRA Core knows.{hint} "
                                 f"{trains}")
        raise LoraValueError(f"{source}: architecture = {name!r} is {arch.name}, which this trainer does not train. "
                             f"{trains}")
    return arch.name


def load(path: str) -> RunConfig:
    path = os.path.abspath(path)
    return parse(read_file(path), source=path, base=os.path.dirname(path))
