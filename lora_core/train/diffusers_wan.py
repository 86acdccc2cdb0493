"""Wan 2.1 text-to-video (T2V 14B / 1.3B layouts) on diffusers' classes for `python -m lora_core.train`:
WanTransformer3DModel, UMT5EncoderModel (transformers) + its tokenizer, AutoencoderKLWan (16 latent channels, 4x
temporal / 8x spatial), the folder's flow scheduler (UniPCMultistepScheduler with `flow_shift`, or
FlowMatchEulerDiscreteScheduler with `shift`).

* Model: a diffusers Wan folder (WanPipeline.save_pretrained: model_index.json, transformer/, vae/, text_encoder/,
  tokenizer/, scheduler/). The variant is the Wan family's rule (lora_core.arch.families.wan.spec_from_diffusers:
  width 1536 -> Wan 2.1 T2V 1.3B, otherwise the T2V 14B layout, which is also one Wan 2.2 T2V-A14B expert's).
  Refused, naming what the folder is: Wan 2.1 I2V 14B / FLF2V 14B (the transformer has `image_dim` /
  `added_kv_proj_dim`: a CLIP-image branch), VACE (WanVACETransformer3DModel), Wan 2.2 I2V-A14B (36 input
  channels), Wan 2.2 TI2V-5B (48 latent channels, `expand_timesteps`) and a Wan 2.2 A14B pair (`transformer_2` /
  `boundary_ratio`: two experts; train one with the node and its timestep_range).
* Objective: flow matching (objective.Objective.flow), velocity target noise - x0, timestep input sigma * 1000 (the
  scheduler's timesteps, as WanPipeline feeds them; ComfyUI's WAN21 ModelSamplingDiscreteFlow multiplier 1000).
  The shift is the scheduler config's: UniPC's `flow_shift` (with use_flow_sigmas) or FlowMatchEuler's `shift`
  (static only); a config with neither gets ComfyUI's WAN21 default 8.0 (comfy/supported_models.py), the shift the
  train node reads from a ComfyUI Wan that no ModelSampling node patched. The official diffusers folders say 3.0
  (Wan2.1-T2V-1.3B / 14B-Diffusers, 480p; WanPipeline's docs suggest 5.0 for 720p): edit flow_shift in
  scheduler/scheduler_config.json to train at another shift. The default sampling is the family's ("logit-normal,
  model shift", musubi's `--timestep_sampling shift`); a named ("high noise" / "low noise") or numeric
  timestep_range works as on the node.
* Latents: the VAE's posterior mean of the clip in [-1, 1], (z - latents_mean) / latents_std per channel, as
  WanPipeline (and its video-to-video / image-to-video pipelines' prepare_latents) normalise them; (B, 16, frames,
  h, w) with frames = (F - 1) / 4 + 1. Images train as one-frame videos.
* Text, as WanPipeline.encode_prompt: each caption cleaned (html unescaped, whitespace collapsed; ftfy.fix_text
  when ftfy is installed, as diffusers does), tokenized to 512 tokens, UMT5 with the attention mask, the padded
  positions set to zero (ComfyUI's WAN21 zero-pads its context to 512 tokens the same way).
* Names: one LoRA per Linear of the family's canonical (ComfyUI / Wan-Video) layout, in musubi-tuner's names
  (`lora_unet_blocks_0_self_attn_q`, ..._cross_attn_o, ..._ffn_0; "all layers" adds text / time embeddings,
  time_projection, head.head), read off the family's diffusers_host_pieces (diffusers' attn1.to_q -> self_attn.q
  ...): nothing in Wan is fused, so every LoRA sits whole on one diffusers Linear. The metadata is the node's for
  the variant (ss_base_model_version `wan`, modelspec.architecture `wan2.1/lora`, ss_network_module
  networks.lora_wan, ss_discrete_flow_shift).
* Not here: text-encoder LoRAs (train_text_encoder; musubi trains none on Wan) and LoCon (no UNet convs); both are
  refused.
"""
from __future__ import annotations

import html
import os
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lora_core.errors import LoraFileError, LoraValueError

from .backends import read_json
from .objective import Objective

MAX_TOKENS = 512             # WanPipeline's max_sequence_length default (and ComfyUI's WAN21 context padding)
TIMESTEP_MULTIPLIER = 1000.0
COMFY_WAN21_SHIFT = 8.0      # comfy/supported_models.py WAN21_T2V sampling_settings
WAN_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
TRAINED = ("Wan-T2V-14B", "Wan2.1-T2V-1.3B")


def is_wan_folder(path: str) -> bool:
    """A diffusers Wan folder: a Wan*Pipeline's model_index.json, or a transformer/ whose config is a Wan
    transformer's (WanTransformer3DModel, WanVACETransformer3DModel, ...)."""
    if not os.path.isdir(path):
        return False
    if str(read_json(os.path.join(path, "model_index.json")).get("_class_name", "")).startswith("Wan"):
        return True
    return str(read_json(os.path.join(path, "transformer", "config.json")).get("_class_name", "")).startswith("Wan")


@dataclass
class DiffusersWan:
    transformer: nn.Module
    vae: nn.Module
    text_encoder: nn.Module        # UMT5EncoderModel
    tokenizer: object
    scheduler_config: dict
    arch: object                   # lora_core ArchSpec (Wan-T2V-14B / Wan2.1-T2V-1.3B)
    spec: object                   # the family's WanSpec of this transformer


def refuse_other_wans(path: str) -> None:
    """A clear error for the Wan folders this trainer does not train (see the module docstring), from the configs
    alone (nothing is loaded)."""
    index = read_json(os.path.join(path, "model_index.json"))
    config = read_json(os.path.join(path, "transformer", "config.json"))
    pipeline, klass = str(index.get("_class_name", "")), str(config.get("_class_name", ""))
    node = "train it with the LoRA Core Train node in ComfyUI"
    if "VACE" in pipeline or "VACE" in klass:
        raise LoraValueError(f"Model {path} is a Wan VACE model ({klass or pipeline}): the command-line trainer "
                             f"trains Wan 2.1 text-to-video (T2V 14B / 1.3B); {node}.")
    if config.get("image_dim") or config.get("added_kv_proj_dim") or "ImageToVideo" in pipeline:
        which = "FLF2V 14B" if config.get("pos_embed_seq_len") else "I2V 14B"
        raise LoraValueError(f"Model {path} is Wan 2.1 {which} (the transformer has image_dim = "
                             f"{config.get('image_dim')}, added_kv_proj_dim = {config.get('added_kv_proj_dim')}: a "
                             f"CLIP-image branch; pipeline {pipeline or '?'}): the command-line trainer trains Wan 2.1 "
                             f"text-to-video (T2V 14B / 1.3B); {node}.")
    if os.path.isdir(os.path.join(path, "transformer_2")) or index.get("boundary_ratio") is not None \
            or (isinstance(index.get("transformer_2"), list) and index["transformer_2"][0] is not None):
        raise LoraValueError(f"Model {path} is a Wan 2.2 A14B pair (transformer + transformer_2, boundary_ratio "
                             f"{index.get('boundary_ratio')}): two experts. The command-line trainer trains one Wan "
                             f"2.1 T2V transformer; {node} on one expert with timestep_range \"high noise\" / "
                             f"\"low noise\".")
    channels_in, channels_out = config.get("in_channels", 16), config.get("out_channels", 16)
    if channels_out == 48 or channels_in == 48 or index.get("expand_timesteps"):
        raise LoraValueError(f"Model {path} is Wan 2.2 TI2V-5B (48 latent channels, the Wan 2.2 VAE): the "
                             f"command-line trainer trains Wan 2.1 text-to-video (T2V 14B / 1.3B); {node}.")
    if channels_in != channels_out:
        raise LoraValueError(f"Model {path}: the transformer reads {channels_in} channels and writes {channels_out} "
                             f"(Wan 2.2 I2V-A14B: 36 = 16 noise + 4 mask + 16 image latents): an image-to-video "
                             f"model. The command-line trainer trains Wan 2.1 text-to-video; {node}.")


def load_wan(path: str, device: torch.device) -> DiffusersWan:
    """The parts of a diffusers Wan 2.1 T2V folder, checked against each other (see the module docstring)."""
    if not os.path.isdir(path):
        raise LoraValueError(f"Model {path}: the command-line trainer reads Wan from a diffusers folder "
                             f"(WanPipeline.save_pretrained: {', '.join(WAN_PARTS)}); a ComfyUI single-file Wan "
                             f"trains with the LoRA Core Train node.")
    refuse_other_wans(path)
    missing = [sub for sub in WAN_PARTS if not os.path.isdir(os.path.join(path, sub))]
    if missing:
        raise LoraFileError(f"Wan folder {path} has no {', '.join(missing)} subfolder(s): a diffusers Wan folder "
                            f"(WanPipeline.save_pretrained) has {', '.join(WAN_PARTS)}.")
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    load = dict(local_files_only=True)
    transformer = WanTransformer3DModel.from_pretrained(path, subfolder="transformer", **load)
    vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", **load)
    text_encoder = UMT5EncoderModel.from_pretrained(path, subfolder="text_encoder", **load)
    tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **load)
    scheduler_config = read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
    config = transformer.config
    if int(vae.config.z_dim) != int(config.in_channels):
        raise LoraFileError(f"Wan folder {path}: the VAE has {vae.config.z_dim} latent channels but the transformer "
                            f"reads {config.in_channels} (16 on Wan 2.1).")
    if int(text_encoder.config.d_model) != int(config.text_dim):
        raise LoraFileError(f"Wan folder {path}: UMT5 (text_encoder) is {text_encoder.config.d_model} wide but the "
                            f"transformer's text_dim is {config.text_dim} (4096 on Wan, UMT5-XXL).")
    for key in ("latents_mean", "latents_std"):
        values = getattr(vae.config, key, None)
        if values is None or len(values) != int(vae.config.z_dim):
            raise LoraFileError(f"Wan folder {path}: vae/config.json {key} must list {vae.config.z_dim} numbers "
                                f"(one per latent channel), got {values!r}.")
    from lora_core.arch.families.wan import FAMILY

    state = transformer.state_dict()
    found = FAMILY.detect_diffusers(list(state), {k: tuple(v.shape) for k, v in state.items()})
    if found is None or found[0].name not in TRAINED:
        raise LoraValueError(f"Model {path}: the transformer's layout is "
                             f"{'not recognised as Wan' if found is None else found[0].title}; the command-line "
                             f"trainer trains Wan 2.1 T2V 14B / 1.3B.")
    arch, spec = found
    for module in (transformer, vae, text_encoder):
        module.to(device, torch.float32).eval()
        module.requires_grad_(False)
    return DiffusersWan(transformer, vae, text_encoder, tokenizer, scheduler_config, arch, spec)


def scheduler_shift(scheduler_config: dict, source: str = "scheduler") -> float:
    """The flow shift a Wan scheduler config samples with (see the module docstring)."""
    if scheduler_config.get("use_dynamic_shifting"):
        raise LoraValueError(f"{source}: use_dynamic_shifting = true; Wan samples with a static shift, which is "
                             f"what training here follows. Set use_dynamic_shifting to false and shift / "
                             f"flow_shift to the model's.")
    if "UniPC" in str(scheduler_config.get("_class_name", "")) or "flow_shift" in scheduler_config:
        if not scheduler_config.get("use_flow_sigmas", True) and "flow_shift" not in scheduler_config:
            raise LoraValueError(f"{source}: a UniPC scheduler without use_flow_sigmas is not a flow schedule.")
        if "flow_shift" in scheduler_config:
            return float(scheduler_config["flow_shift"])
    if "shift" in scheduler_config:
        return float(scheduler_config["shift"])
    return COMFY_WAN21_SHIFT


def wan_objective(scheduler_config: dict, default_sampling: str, source: str = "scheduler") -> Objective:
    return Objective.flow(scheduler_shift(scheduler_config, source), TIMESTEP_MULTIPLIER, None, default_sampling)


def wan_vae_encoder(vae) -> Callable:
    """videos (B, 3, F, H, W) or images (B, 3, H, W) in [0, 1] -> normalised latents (B, 16, frames, h, w): the
    posterior mean, (z - latents_mean) / latents_std."""
    device = next(vae.parameters()).device
    z = int(vae.config.z_dim)
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, z, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, z, 1, 1, 1)

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        if pixels.ndim == 4:
            pixels = pixels[:, :, None]
        with torch.no_grad():
            latents = vae.encode(pixels.to(device, torch.float32) * 2 - 1).latent_dist.mean
            return (latents - mean.to(latents.device)) / std.to(latents.device)

    return encode


def clean_caption(text: str) -> str:
    """diffusers' pipeline_wan.prompt_clean (ftfy.fix_text only when ftfy is installed)."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def wan_text_encoder(tokenizer, text_encoder: nn.Module, max_tokens: int = MAX_TOKENS) -> Callable:
    """encode(captions) -> {"context": (B, 512, text width)}, as WanPipeline.encode_prompt."""
    length = int(max_tokens)

    def encode(captions: list[str]) -> dict:
        tokens = tokenizer([clean_caption(c) for c in captions], padding="max_length", max_length=length,
                           truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        device = next(text_encoder.parameters()).device
        mask = tokens.attention_mask.to(device)
        states = text_encoder(tokens.input_ids.to(device), mask).last_hidden_state
        return {"context": states * mask.gt(0)[..., None].to(states.dtype)}

    return encode


class WanDiffusersBackend:
    """The training loop's backend over a WanTransformer3DModel: `cond` is {"context"} of wan_text_encoder; returns
    the velocity (B, 16, frames, h, w)."""

    guidance = None

    def __init__(self, transformer: nn.Module, objective: Objective):
        self.transformer = transformer
        self.objective = objective
        self.prediction_type = objective.prediction
        self.device = next(transformer.parameters()).device
        self.patch = tuple(int(p) for p in transformer.config.patch_size)

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
        context = cond.get("context") if isinstance(cond, dict) else cond
        if not isinstance(context, torch.Tensor):
            raise ValueError("Wan training needs the conditioning {'context'} of wan_text_encoder; got "
                             + type(cond).__name__)
        if noisy.ndim == 4:
            noisy = noisy[:, :, None]
        h, w = noisy.shape[-2:]
        if h % self.patch[1] or w % self.patch[2]:
            raise LoraValueError(f"Wan latents must have height and width divisible by the patch size "
                                 f"{self.patch[1]}x{self.patch[2]}, got {h}x{w}: use sizes that are multiples of 16.")
        dtype = next(self.transformer.parameters()).dtype
        return self.transformer(hidden_states=noisy.to(self.device, dtype), timestep=timesteps.to(self.device, dtype),
                                encoder_hidden_states=context.to(self.device, dtype), return_dict=False)[0]

    def modules(self) -> list[nn.Module]:
        return [self.transformer]

    def checkpoint_modules(self) -> list[nn.Module]:
        return list(getattr(self.transformer, "blocks", []))


def wan_targets(transformer: nn.Module, arch, spec, train_spec, kinds, blocks=None) -> list:
    """musubi-named LoRA targets of a diffusers Wan transformer: diffusers_flux.flux_targets over the family's
    diffusers_host_pieces (every piece whole: Wan fuses nothing)."""
    from .diffusers_flux import flux_targets

    return flux_targets(transformer, arch, spec, train_spec, kinds, blocks)


def build_wan(run, dist, nf4, cli):
    """(trainer, dataset) for a diffusers Wan 2.1 T2V folder; `cli` is lora_core.train.__main__ (its dataset,
    config, block and trainer helpers)."""
    from .injection import LoRANetwork
    t = run.train
    model = load_wan(run.model, dist.device)
    arch, family = model.arch, model.arch.family
    cli.check_architecture(run, arch)
    spec = family.train_spec(arch, model.spec)
    cli.refuse_guidance(run, arch)
    cli.refuse_locon(run, arch)
    if t["train_text_encoder"]:
        raise LoraValueError(f"{run.source}: [train] train_text_encoder = true: the command-line trainer trains "
                             f"the Wan transformer only (musubi-tuner trains no UMT5 LoRA either). Set "
                             f"train_text_encoder = false, or train UMT5 with the LoRA Core Train node.")
    objective = wan_objective(model.scheduler_config, spec.timestep_sampling,
                              os.path.join(run.model, "scheduler", "scheduler_config.json"))
    t_range = cli.timestep_range_of(run, family.timestep_ranges(arch), objective)
    dataset, validation = cli.load_dataset(run, spec, arch)
    kinds = tuple(spec.target_sets.get(t["unet_targets"], ()))
    present = {m.block for m in family.modules(model.spec, arch)}
    blocks, block_lr = cli._blocks(run, [b for b in arch.blocks if b in present])
    config = cli.train_config(t, dist, kinds, blocks, block_lr, t_range)
    targets = wan_targets(model.transformer, arch, model.spec, spec, kinds, blocks)
    network = LoRANetwork(targets, config.rank, config.alpha, seed=config.seed, algorithm=config.algorithm)
    backend = WanDiffusersBackend(model.transformer, objective)
    encode_text = wan_text_encoder(model.tokenizer, model.text_encoder)
    trainer = cli._trainer(run, dist, backend, network, dataset, config, wan_vae_encoder(model.vae), encode_text,
                           arch.name, validation, nf4)
    return trainer, dataset
