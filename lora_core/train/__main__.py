"""`python -m lora_core.train CONFIG`: the in-graph trainer's loop outside ComfyUI, on a diffusers SD1.x / SD2.x
/ SDXL, Flux.1 or Chroma model (diffusers_flux.py), in one process or under `torchrun` / `accelerate launch`
(DistributedDataParallel over the processes).

    python -m lora_core.train config.toml
    torchrun --nproc_per_node=8 -m lora_core.train config.toml
    accelerate launch --multi_gpu --num_processes=8 -m lora_core.train config.toml

The config (lora_core.train.config) names the model (a diffusers folder, or a single-file checkpoint read with
diffusers' from_single_file), the dataset folder and the train node's options. The file written is the kohya
LoRA the node writes (LDM `lora_unet_*` / `lora_te_*` names, SDXL `lora_te1_*` / `lora_te2_*`, `ss_*` /
`modelspec.*` metadata naming the variant, e.g. ss_base_model_version = sdxl_base_v1-0; Flux.1: kohya's
`lora_unet_double_blocks_N_img_attn_qkv` / `lora_unet_single_blocks_N_linear1` names, `lora_te1_` CLIP-L, `lora_te3_`
T5, ss_base_model_version = flux1; Chroma: the same transformer names, `lora_te1_` T5, ss_base_model_version =
chroma). The validation loss (validation_split / validation_folder) runs as in the node.
SD3 / SD3.5 (diffusers folders) are diffusers_sd3.py's, Wan 2.1 T2V diffusers_wan.py's, each through one hook in
build().
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from lora_core.errors import LoraCoreError, LoraFileError, LoraValueError

from . import config as cfgmod
from .diffusers_flux import is_flux_folder
from .backends import DiffusersBackend, diffusers_ldm_namer, transformers_text_encoder
from .blocks import parse_block_list, parse_block_lr
from .dataset import CaptionOptions, load_folder
from .distributed import DistContext, DistributedTrainer, init_from_env
from .injection import UNET_KINDS, LoRANetwork, find_te_targets, find_unet_targets
from .loop import TrainConfig
from .quant import FrozenBase, resolve_base_quant
from .save import OutputFiles
from .validation import ValidationLoss, validation_set

AUTO_VALIDATIONS = 20    # validate_every 0: about this many evaluations per run (as the node)

log = logging.getLogger("lora_core.train")


@dataclass
class DiffusersSD:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    alphas_cumprod: torch.Tensor
    prediction_type: str
    arch: object                      # lora_core ArchSpec (SD1 / SD2 / SDXL)
    text_encoder_2: Optional[torch.nn.Module] = None   # SDXL: CLIPTextModelWithProjection (te2)
    tokenizer_2: object = None

    @property
    def sdxl(self) -> bool:
        return self.text_encoder_2 is not None


SUPPORTED, resolve_architecture = cfgmod.SUPPORTED_ARCHS, cfgmod.resolve_architecture
SD_ARCHS = ("SD1", "SD2", "SDXL")


def load_model(path: str, model_config: str, device: torch.device, architecture: str = "auto") -> DiffusersSD:
    """UNet, VAE, CLIP text encoder(s), tokenizer(s) and noise schedule of a diffusers SD1.x/SD2.x/SDXL model: a
    folder (`from_pretrained`, local files only; SDXL = a folder with text_encoder_2 / tokenizer_2) or an SD1.x /
    SD2.x single-file checkpoint (`from_single_file`, with `model_config` a local diffusers folder holding the
    configs, since there is no model hub to fetch them from). `architecture` (SD1 / SD2 / SDXL or an alias; "auto"
    = as detected) must match what the UNet is."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    wanted = resolve_architecture(architecture, f"Model {path}")
    text_encoder_2 = tokenizer_2 = None

    if os.path.isdir(path):
        missing = [sub for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
                   if not os.path.isdir(os.path.join(path, sub))]
        if missing:
            raise LoraFileError(f"Model folder {path} is not a diffusers Stable Diffusion folder: it has no "
                                f"{', '.join(missing)} subfolder(s). Give a folder saved by diffusers' "
                                f"save_pretrained, or a single-file checkpoint.")
        two = [sub for sub in ("text_encoder_2", "tokenizer_2") if os.path.isdir(os.path.join(path, sub))]
        if len(two) == 1:
            raise LoraFileError(f"Model folder {path} has {two[0]} but not "
                                f"{({'text_encoder_2', 'tokenizer_2'} - set(two)).pop()}: an SDXL diffusers folder "
                                f"has both (StableDiffusionXLPipeline.save_pretrained writes them).")
        load = dict(local_files_only=True)
        if two:
            from transformers import CLIPTextModelWithProjection

            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **load)
            tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **load)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **load)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **load)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **load)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **load)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **load)
    elif os.path.isfile(path):
        from diffusers import StableDiffusionPipeline

        if model_config and os.path.isdir(os.path.join(model_config, "text_encoder_2")):
            raise LoraValueError(f"Model {path}: model_config {model_config} is an SDXL folder; the command-line "
                                 f"trainer reads SDXL from a diffusers folder only. Convert the checkpoint with "
                                 f"StableDiffusionXLPipeline.from_single_file(...).save_pretrained(folder) and set "
                                 f"model = that folder.")
        if not model_config:
            raise LoraValueError(f"Model {path} is a single-file checkpoint: set model_config to a local diffusers "
                                 f"folder with the matching configs (model_index.json, unet/, vae/, text_encoder/, "
                                 f"tokenizer/, scheduler/); there is no model hub to download them from.")
        try:
            pipe = StableDiffusionPipeline.from_single_file(path, config=model_config, local_files_only=True,
                                                            safety_checker=None, requires_safety_checker=False)
        except Exception as error:
            raise LoraFileError(f"Model {path} cannot be read by diffusers' from_single_file with model_config "
                                f"{model_config} ({type(error).__name__}: {error}). Convert it to a diffusers "
                                f"folder, or check model_config matches the checkpoint.") from None
        unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    else:
        raise LoraFileError(f"Model {path} does not exist: give a diffusers folder or a checkpoint file.")
    addition = getattr(unet.config, "addition_embed_type", None)
    if addition not in (None, "text_time"):
        raise LoraValueError(f"Model {path}: the UNet has addition_embed_type={addition!r}; the command-line trainer "
                             f"trains SD1.x / SD2.x (none) and SDXL (\"text_time\") UNets.")
    if (addition == "text_time") != (text_encoder_2 is not None):
        has = "an SDXL UNet (addition_embed_type=\"text_time\")" if addition else "an SD1.x/SD2.x UNet"
        raise LoraFileError(f"Model {path}: {has} with {'two text encoders' if text_encoder_2 is not None else 'one text encoder'}; "
                            f"SDXL has text_encoder + text_encoder_2, SD1.x/SD2.x text_encoder only.")
    from lora_core.arch import bind_diffusers

    state = unet.state_dict()
    arch = bind_diffusers({k: v.shape for k, v in state.items()}, key_prefix="unet.").arch
    if arch is None or arch.name not in SD_ARCHS:
        raise LoraValueError(f"Model {path}: the UNet's layout is not recognised as {' / '.join(SD_ARCHS)} "
                             f"({getattr(arch, 'name', 'unknown')}).")
    if wanted is not None and arch.name != wanted:
        raise LoraValueError(f"Model {path} is {arch.name} but the config says architecture = {architecture!r} "
                             f"({wanted}): fix the model path, or set architecture = \"{arch.name}\" or \"auto\".")
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise LoraValueError(f"Model {path}: scheduler prediction_type {prediction!r} is not trainable here "
                             f"(epsilon or v_prediction).")
    for module in (unet, vae, text_encoder, text_encoder_2):
        if module is None:
            continue
        module.to(device, torch.float32).eval()
        module.requires_grad_(False)
    return DiffusersSD(unet, vae, text_encoder, tokenizer, scheduler.alphas_cumprod.float(), prediction, arch,
                       text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)


def vae_encoder(vae) -> Callable:
    """images (B, 3, H, W) in [0, 1] -> scaled latents: the posterior mean (deterministic, so every process
    caches the same latents)."""
    scaling = float(getattr(vae.config, "scaling_factor", 0.18215))
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    device = next(vae.parameters()).device

    def encode(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            posterior = vae.encode(images.to(device, torch.float32) * 2 - 1).latent_dist
            return (posterior.mean - shift) * scaling

    return encode


def load_dataset(run: cfgmod.RunConfig, spec, arch):
    """(training dataset, validation hook or None) of the config's [dataset] and validation keys, as the nodes
    build them (LoRACoreTrainDataset, then TrainMonitor's validation_set / ValidationLoss)."""
    d, t = run.dataset, run.train
    dataset = load_folder(d["folder"], resolution=d["resolution"], repeats=d["repeats"], bucketing=d["bucketing"],
                          bucket_step=d["bucket_step"], min_bucket=d["min_bucket"], max_bucket=d["max_bucket"],
                          missing_caption=d["missing_caption"], default_caption=d["caption"], frames=d["frames"],
                          captions=CaptionOptions(shuffle=d["shuffle_caption"], keep_tokens=d["keep_tokens"],
                                                  dropout=d["caption_dropout"]))
    videos = [s.source for s in dataset.samples if s.image is not None and s.image.ndim == 4]
    if videos and spec.latent_dims < 3:
        raise LoraValueError(f"{run.source}: [dataset] frames = {d['frames']}: the folder has {len(videos)} video "
                             f"sample(s) (e.g. {videos[0]}), but {arch.title} is an image model. Set frames = 0.")
    dataset, held, description = validation_set(dataset, t["validation_split"], t["validation_folder"] or None,
                                                t["seed"])
    if not held:
        return dataset, None
    every = t["validate_every"] or max(1, t["steps"] // AUTO_VALIDATIONS)
    return dataset, ValidationLoss(held, every, seed=t["seed"], description=description)


def train_config(t: dict, dist: DistContext, kinds, blocks, block_lr, timestep_range=None) -> TrainConfig:
    """The loop's TrainConfig of the config's [train] table; batch_size there is per process."""
    config = TrainConfig(
        steps=t["steps"], batch_size=t["batch_size"] * dist.world_size, grad_accum=t["grad_accumulation"],
        seed=t["seed"], algorithm=t["algorithm"], rank=t["rank"], alpha=t["alpha"], unet_kinds=kinds, blocks=blocks,
        block_lr=block_lr, unet_lr=t["unet_lr"], train_text_encoder=t["train_text_encoder"],
        text_encoder_lr=t["text_encoder_lr"], optimizer=t["optimizer"], scheduler=t["lr_scheduler"],
        warmup_steps=t["warmup_steps"], min_snr_gamma=t["min_snr_gamma"], noise_offset=t["noise_offset"],
        mixed_precision=t["mixed_precision"], gradient_checkpointing=t["gradient_checkpointing"],
        cache_latents=t["cache_latents"], cache_text_encoder_outputs=t["cache_text_encoder_outputs"],
        save_every=t["save_every"], keep_last=t["keep_last"], save_dtype=t["save_precision"],
        overwrite=t["overwrite"], timestep_sampling=t["timestep_sampling"], max_grad_norm=t["max_grad_norm"],
        lora_dtype=t["lora_dtype"], timestep_range=timestep_range, loss_weighting=t["loss_weighting"])
    config.validate()
    return config


def _blocks(run: cfgmod.RunConfig, valid_blocks: list):
    t = run.train
    try:
        return parse_block_list(t["blocks"], valid_blocks), parse_block_lr(t["block_lr"], valid_blocks)
    except LoraValueError as error:
        raise LoraValueError(f"{run.source}: [train] blocks / block_lr: {error}") from None


def _trainer(run, dist, backend, network, dataset, config, encode_images, encode_text, arch_name, validation, nf4):
    os.makedirs(run.output_dir, exist_ok=True)
    output = OutputFiles(run.output_dir, run.output_name)
    trainer = DistributedTrainer(backend, network, dataset, config, encode_images=encode_images,
                                 encode_text=encode_text, output=output, arch=arch_name,
                                 base_model_name=os.path.basename(os.path.normpath(run.model)),
                                 checkpoint_modules=backend.checkpoint_modules(), dist=dist,
                                 hooks=[validation] if validation is not None else ())
    trainer.nf4 = nf4
    if run.run == "continue":
        trainer.resume(output.state)
    elif os.path.exists(output.state) and not config.overwrite:
        raise LoraValueError(f"{output.state} exists: a run named {output.name!r} was started before. Set run = "
                             f"\"continue\" to resume it, pick another output_name, or set [train] overwrite = true.")
    return trainer


def t5_targets(text_encoder_2, prefix: str = "lora_te3", component: str = "te3") -> list:
    """Every Linear of a transformers T5 encoder's blocks, in kohya's Flux T5 names (lora_te3_encoder_block_N_...;
    Chroma's T5 is te1: lora_te1_...)."""
    from .injection import Target

    return [Target(f"{prefix}_" + name.replace(".", "_"), module, component, component, "te")
            for name, module in text_encoder_2.named_modules()
            if isinstance(module, torch.nn.Linear) and name.startswith("encoder.block.")]


def check_architecture(run: cfgmod.RunConfig, arch) -> None:
    """The config's `architecture` (unless auto) must be the model's: a clear error naming both otherwise."""
    wanted = resolve_architecture(run.architecture, run.source)
    if wanted is not None and wanted != arch.name:
        raise LoraValueError(f"Model {run.model} is {arch.name} but the config says architecture = "
                             f"{run.architecture!r} ({wanted}): fix the model path, or set architecture = "
                             f"\"{arch.name}\" or \"auto\".")


def refuse_locon(run: cfgmod.RunConfig, arch, why: str = "") -> None:
    """LoCon trains a UNet's convolutions: refused on a DiT (`why`: a sentence to add before the fix)."""
    if run.train["algorithm"] == "LoCon":
        raise LoraValueError(f"{run.source}: [train] algorithm = \"LoCon\": LoCon adds the convolution layers of a "
                             f"UNet; {arch.title} has none to train{why}. Choose LoRA.")


def refuse_guidance(run: cfgmod.RunConfig, arch, why: str = "") -> None:
    """A guidance value other than the default, on a model without a guidance input."""
    value = run.train["guidance"]
    if value != cfgmod.TRAIN["guidance"].default:
        raise LoraValueError(f"{run.source}: [train] guidance = {value:g}: guidance is the input of a "
                             f"guidance-distilled model (Flux.1 dev); {arch.title} has none{why}. Remove the key.")


def timestep_range_of(run: cfgmod.RunConfig, ranges: dict, objective=None):
    """The config's timestep_range (and, with `objective`, its timestep_sampling checked), errors naming the key."""
    from .objective import parse_timestep_range

    try:
        if objective is not None:
            objective.resolve_sampling(run.train["timestep_sampling"])
        return parse_timestep_range(run.train["timestep_range"], ranges)
    except LoraValueError as error:
        raise LoraValueError(f"{run.source}: [train] {error}") from None


def build_flux(run: cfgmod.RunConfig, dist: DistContext, nf4):
    """(trainer, dataset) for a diffusers Flux.1 or Chroma model (lora_core.train.diffusers_flux)."""
    from .diffusers_flux import (ChromaDiffusersBackend, FluxDiffusersBackend, chroma_text_encoder, flux_objective,
                                 flux_targets, flux_text_encoder, load_flux)
    t = run.train
    model = load_flux(run.model, run.model_config, dist.device)
    arch, family = model.arch, model.arch.family
    check_architecture(run, arch)
    spec = family.train_spec(arch, model.spec)
    dataset, validation = load_dataset(run, spec, arch)
    kinds = tuple(spec.target_sets.get(t["unet_targets"], ()))
    refuse_locon(run, arch)
    present = {m.block for m in family.modules(model.spec, arch)}
    blocks, block_lr = _blocks(run, [b for b in arch.blocks if b in present])
    t_range = timestep_range_of(run, family.timestep_ranges(arch) if hasattr(family, "timestep_ranges") else {})
    config = train_config(t, dist, kinds, blocks, block_lr, t_range)
    targets = flux_targets(model.transformer, arch, model.spec, spec, kinds, blocks)
    objective = flux_objective(model.scheduler_config, spec.timestep_sampling)
    trained_encoders = []
    if model.chroma:   # T5 alone: ComfyUI's Chroma text encoder te1, named lora_te1_ as the node names it
        if config.train_text_encoder:
            targets += t5_targets(model.text_encoder, "lora_te1", "te1")
            trained_encoders.append(model.text_encoder)
        network = LoRANetwork(targets, config.rank, config.alpha, seed=config.seed, algorithm=config.algorithm)
        backend = ChromaDiffusersBackend(model.transformer, objective, text_encoders=trained_encoders)
        encode_text = chroma_text_encoder(model.tokenizer, model.text_encoder)
    else:
        if config.train_text_encoder:   # kohya's default: CLIP-L (lora_te1_); "all": T5 too (lora_te3_)
            targets += find_te_targets(model.text_encoder, "lora_te1", "te1")
            trained_encoders.append(model.text_encoder)
            if t["text_encoders"] == "all":
                targets += t5_targets(model.text_encoder_2)
                trained_encoders.append(model.text_encoder_2)
        network = LoRANetwork(targets, config.rank, config.alpha, seed=config.seed, algorithm=config.algorithm)
        backend = FluxDiffusersBackend(model.transformer, objective, t["guidance"] if spec.guidance_input else None,
                                       text_encoders=trained_encoders)
        encode_text = flux_text_encoder(model.tokenizer, model.text_encoder, model.tokenizer_2, model.text_encoder_2)
    trainer = _trainer(run, dist, backend, network, dataset, config, vae_encoder(model.vae), encode_text, arch.name,
                       validation, nf4)
    return trainer, dataset


def build(run: cfgmod.RunConfig, dist: DistContext):
    """(trainer, dataset) for a parsed config on this process."""
    t = run.train
    if t["unet_targets"] == cfgmod.NORMS_BIASES:
        raise LoraValueError(f"{run.source}: [train] unet_targets = {cfgmod.NORMS_BIASES!r} (biases and norms as full "
                             f"diffs) is the train node's only, for now: choose \"all layers\" here.")
    nf4 = resolve_base_quant(t["base_quant"], dist.device)   # refuse nf4 without bitsandbytes (CUDA or its CPU backend), first
    if is_flux_folder(run.model) or (os.path.isfile(run.model) and run.model_config
                                     and is_flux_folder(run.model_config)):
        return build_flux(run, dist, nf4)
    from .diffusers_sd3 import build_sd3, is_sd3_folder

    if is_sd3_folder(run.model) or (run.model_config and is_sd3_folder(run.model_config)):
        return build_sd3(run, dist, nf4, sys.modules[__name__])   # diffusers_sd3.py: SD3 / SD3.5
    from .diffusers_wan import build_wan, is_wan_folder

    if is_wan_folder(run.model):
        return build_wan(run, dist, nf4, sys.modules[__name__])   # diffusers_wan.py: Wan 2.1 T2V 14B / 1.3B
    model = load_model(run.model, run.model_config, dist.device, run.architecture)
    spec = model.arch.family.train_spec(model.arch)
    dataset, validation = load_dataset(run, spec, model.arch)
    if t["timestep_range"]:
        raise LoraValueError(f"{run.source}: [train] timestep_range = {t['timestep_range']!r}: {model.arch.title} "
                             f"is a DDPM model; timestep_range applies to flow models (Flux.1). Leave it empty.")
    kinds = tuple(spec.target_sets.get(t["unet_targets"], ()))
    if not kinds:
        raise LoraValueError(f"{run.source}: [train] unet_targets {t['unet_targets']!r} has no meaning for "
                             f"{model.arch.title}; choose one of {list(spec.target_sets)}.")
    if t["algorithm"] == "LoCon":
        kinds += tuple(k for k in spec.conv_kinds if k not in kinds)
    namer = diffusers_ldm_namer(model.unet)
    present = {target.block for target in find_unet_targets(model.unet, UNET_KINDS, None, namer)}
    valid_blocks = [b for b in model.arch.blocks if b in present] + sorted(present - set(model.arch.blocks))
    blocks, block_lr = _blocks(run, valid_blocks)
    config = train_config(t, dist, kinds, blocks, block_lr)
    targets = find_unet_targets(model.unet, kinds, blocks, namer)
    if config.train_text_encoder and model.sdxl:   # kohya's SDXL names: lora_te1_ (CLIP-L), lora_te2_ (OpenCLIP-G)
        # The context is te1's penultimate hidden states: its last layer takes no part in the loss, so it gets no
        # LoRA (it would stay zero, and DistributedDataParallel refuses parameters without gradients).
        last = f"_layers_{model.text_encoder.config.num_hidden_layers - 1}_"
        targets += [target for target in find_te_targets(model.text_encoder, "lora_te1", "te1")
                    if last not in target.name]
        targets += find_te_targets(model.text_encoder_2, "lora_te2", "te2")
    elif config.train_text_encoder:
        targets += find_te_targets(model.text_encoder)
    extra = {} if config.algorithm in ("LoRA", "LoCon") else {"algorithm": config.algorithm}
    network = LoRANetwork(targets, config.rank, config.alpha, seed=config.seed, **extra)
    length = min(77, int(getattr(model.tokenizer, "model_max_length", 77)))
    if model.sdxl:
        from .diffusers_sdxl import SDXLDiffusersBackend, sdxl_text_encoder

        encoders = [model.text_encoder, model.text_encoder_2]
        vae_scale = 2 ** (len(model.vae.config.block_out_channels) - 1)
        backend = SDXLDiffusersBackend(model.unet, model.alphas_cumprod, model.prediction_type,
                                       text_encoders=encoders if config.train_text_encoder else [],
                                       vae_scale=vae_scale)
        encode_text = sdxl_text_encoder([model.tokenizer, model.tokenizer_2], encoders, length)
    else:
        backend = DiffusersBackend(model.unet, model.alphas_cumprod, model.prediction_type,
                                   text_encoders=[model.text_encoder] if config.train_text_encoder else [])
        encode_text = transformers_text_encoder(model.tokenizer, model.text_encoder, length)
    trainer = _trainer(run, dist, backend, network, dataset, config, vae_encoder(model.vae), encode_text,
                       model.arch.name, validation, nf4)
    return trainer, dataset


def train(run: cfgmod.RunConfig, dist: DistContext, on_step: Optional[Callable] = None):
    trainer, dataset = build(run, dist)
    first, end = trainer.step, trainer.step + trainer.config.steps
    every = max(1, trainer.config.steps // 20)

    def report(step, last, loss):
        if on_step is not None:
            on_step(step, last, loss)
        if dist.is_main and ((step - first) % every == 0 or step == last):
            recent = trainer.losses[-every:]
            log.info("step %d/%d loss %.5f (avg %.5f)", step, last, loss, sum(recent) / len(recent))

    if dist.is_main:
        log.info("training %s: %d samples, %d modules, global batch %d over %d process(es), steps %d -> %d",
                 trainer.output.name, len(dataset), len(trainer.train_names), trainer.config.batch_size,
                 dist.world_size, first, end)
    with frozen_base(trainer):
        result = trainer.run(on_step=report)
    return result, trainer


def frozen_base(trainer):
    """base_quant nf4: the denoiser's Linears held in NF4 for the run (FrozenBase, as the node does); "as loaded"
    trains the fp32 diffusers model as it is."""
    import contextlib

    nf4 = getattr(trainer, "nf4", None)
    if nf4 is None:
        return contextlib.nullcontext()
    unet = trainer.backend.modules()[0]
    return FrozenBase([unet], nf4=nf4, nf4_roots=[unet], compute_dtype=torch.float32)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_core.train",
                                     description="Train a LoRA outside ComfyUI (one process, or under torchrun / "
                                                 "accelerate launch with DistributedDataParallel).")
    parser.add_argument("config", help="a .toml or .json config file (see lora_core/train/config.py)")
    parser.add_argument("--summary", default="", help="also write the run's summary (JSON) here, atomically "
                                                      "(rank 0)")
    args = parser.parse_args(argv)
    rank_tag = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO if rank_tag == "0" else logging.WARNING,
                        format="lora_core.train: %(message)s")
    dist = None
    try:
        run = cfgmod.load(args.config)
        dist = init_from_env(run.distributed["backend"], run.distributed["device"])
        begin = time.perf_counter()
        result, trainer = train(run, dist)
        if dist.is_main:
            summary = {"final_path": result.final_path, "state_path": result.state_path, "step": result.step,
                       "steps_done": result.steps_done, "losses": result.losses, "world_size": dist.world_size,
                       "global_batch": trainer.config.batch_size, "seconds": time.perf_counter() - begin,
                       "steps_per_second": result.steps_per_second, "modules": len(trainer.train_names)}
            print(f"lora_core.train: saved {result.final_path} (step {result.step}, {result.steps_done} steps this "
                  f"run, {result.steps_per_second:.2f} steps/s, {dist.world_size} process(es))", flush=True)
            if args.summary:
                _write_json(args.summary, summary)
        return 0
    except LoraCoreError as error:
        prefix = f"[rank {rank_tag}] " if os.environ.get("WORLD_SIZE", "1") != "1" else ""
        print(f"lora_core.train: error: {prefix}{error}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist is not None:
            dist.close()


def _write_json(path: str, data: dict) -> None:
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=1)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


if __name__ == "__main__":
    sys.exit(main())
