"""SD3 / SD3.5 (Medium, 3.5 Medium, 3.5 Large) on diffusers' classes for `python -m lora_core.train`:
SD3Transformer2DModel, CLIPTextModelWithProjection x 2 (CLIP-L, OpenCLIP-G) + T5EncoderModel, AutoencoderKL with 16
latent channels, FlowMatchEulerDiscreteScheduler.

* Model: a diffusers SD3 folder (StableDiffusion3Pipeline.save_pretrained: model_index.json, transformer/, vae/,
  text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/, and text_encoder_3/ + tokenizer_3/ unless
  T5 was dropped). The variant is the family's rule (lora_core.arch.families.sd3: q/k norms and attn2 -> 3.5
  Medium, q/k norms alone -> 3.5 Large, neither -> SD3 Medium).
* Objective: flow matching (objective.Objective.flow), velocity target noise - x0, at the scheduler config's
  static `shift` (3.0 on SD3 / SD3.5: ComfyUI's ModelSamplingDiscreteFlow reads the same from a ComfyUI SD3, so
  both trainers draw the same levels); the transformer is fed sigma * 1000, the scheduler's timesteps, as
  StableDiffusion3Pipeline does. No guidance input.
* Latents: the VAE's posterior mean, (x - shift_factor) * scaling_factor (SD3: 0.0609, 1.5305), unpacked: the
  transformer patches them itself.
* Text, as StableDiffusion3Pipeline.encode_prompt (clip_skip None): each caption through CLIP-L and CLIP-G (77
  tokens, penultimate hidden states; pooled = their projected `text_embeds`, concatenated L | G) and T5 (up to 256
  tokens, last hidden states). The context is the CLIP-L | CLIP-G states concatenated on channels, zero-padded to
  T5's width, then T5's tokens appended; a folder without text_encoder_3 gets T5's 256 tokens as zeros of the
  transformer's joint_attention_dim, as that pipeline does.
* Names: one LoRA per module of the family's canonical (ComfyUI / SAI) layout, in kohya's SD3 names
  (`lora_unet_joint_blocks_0_x_block_attn_qkv`, ..._context_block_adaLN_modulation_1, 3.5 Medium's
  ..._x_block_attn2_qkv), the file the train node writes on a ComfyUI SD3. Where diffusers splits a fused weight
  (to_q / to_k / to_v of attn.qkv, add_q/k/v_proj of the context stream's, attn2.to_q/k/v) or stores its halves
  swapped (AdaLayerNormContinuous's [scale | shift] in norm_out.linear and the last block's norm1_context.linear)
  the one LoRA's output rows go to each module's rows (injection.Target.parts), from the family's
  diffusers_host_pieces. "all layers" adds the x_embedder patch conv (diffusers' pos_embed.proj) as a conv LoRA.
* Text-encoder LoRAs: kohya's default CLIP-L (lora_te1_) + CLIP-G (lora_te2_); text_encoders = "all" adds T5
  (lora_te3_).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from lora_core.errors import LoraFileError, LoraValueError

from .injection import Target
from .backends import read_json
from .objective import Objective

T5_MAX_TOKENS = 256          # StableDiffusion3Pipeline's max_sequence_length default
CLIP_TOKENS = 77
TIMESTEP_MULTIPLIER = 1000.0  # the scheduler's timesteps: sigma * num_train_timesteps
SD3_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
T5_PARTS = ("text_encoder_3", "tokenizer_3")


def is_sd3_folder(path: str) -> bool:
    """A diffusers SD3 folder: StableDiffusion3Pipeline's model_index.json, or a transformer/ whose config is an
    SD3Transformer2DModel's."""
    if not os.path.isdir(path):
        return False
    if "StableDiffusion3" in str(read_json(os.path.join(path, "model_index.json")).get("_class_name", "")):
        return True
    return read_json(os.path.join(path, "transformer", "config.json")).get("_class_name") == "SD3Transformer2DModel"


@dataclass
class DiffusersSD3:
    transformer: nn.Module
    vae: nn.Module
    text_encoder: nn.Module            # CLIPTextModelWithProjection, CLIP-L (kohya lora_te1_)
    text_encoder_2: nn.Module          # CLIPTextModelWithProjection, OpenCLIP-G (lora_te2_)
    text_encoder_3: Optional[nn.Module]   # T5EncoderModel (lora_te3_), None when T5 was dropped
    tokenizer: object
    tokenizer_2: object
    tokenizer_3: object
    scheduler_config: dict
    arch: object                       # lora_core ArchSpec (SD3-Medium / SD3.5-Medium / SD3.5-Large)
    spec: object                       # the family's SD3Spec of this transformer


def load_sd3(path: str, device: torch.device) -> DiffusersSD3:
    """The parts of a diffusers SD3 folder, checked against each other (see the module docstring)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    if not os.path.isdir(path):
        raise LoraValueError(f"Model {path}: the command-line trainer reads SD3 / SD3.5 from a diffusers folder "
                             f"(StableDiffusion3Pipeline.save_pretrained); convert a single-file checkpoint with "
                             f"StableDiffusion3Pipeline.from_single_file(...).save_pretrained(folder) and set "
                             f"model = that folder.")
    missing = [sub for sub in SD3_PARTS if not os.path.isdir(os.path.join(path, sub))]
    if missing:
        raise LoraFileError(f"SD3 folder {path} has no {', '.join(missing)} subfolder(s): a diffusers SD3 folder "
                            f"(StableDiffusion3Pipeline.save_pretrained) has {', '.join(SD3_PARTS)} (and "
                            f"{' + '.join(T5_PARTS)} unless T5 was dropped).")
    t5 = [sub for sub in T5_PARTS if os.path.isdir(os.path.join(path, sub))]
    if len(t5) == 1:
        raise LoraFileError(f"SD3 folder {path} has {t5[0]} but not {({*T5_PARTS} - set(t5)).pop()}: keep both "
                            f"(T5 and its tokenizer) or neither (an SD3 without T5).")
    load = dict(local_files_only=True)
    transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", **load)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **load)
    text_encoder = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder", **load)
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **load)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **load)
    tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **load)
    text_encoder_3 = tokenizer_3 = None
    if t5:
        from transformers import T5EncoderModel, T5TokenizerFast

        text_encoder_3 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", **load)
        tokenizer_3 = T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_3", **load)
    scheduler_config = read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
    config = transformer.config
    if int(vae.config.latent_channels) != int(config.in_channels):
        raise LoraFileError(f"SD3 folder {path}: the VAE has {vae.config.latent_channels} latent channels but the "
                            f"transformer reads {config.in_channels} (16 on SD3 / SD3.5).")
    joint, pooled = int(config.joint_attention_dim), int(config.pooled_projection_dim)
    clip_width = int(text_encoder.config.hidden_size) + int(text_encoder_2.config.hidden_size)
    clip_pooled = int(text_encoder.config.projection_dim) + int(text_encoder_2.config.projection_dim)
    if clip_pooled != pooled:
        raise LoraFileError(f"SD3 folder {path}: CLIP-L and CLIP-G project to {text_encoder.config.projection_dim} "
                            f"+ {text_encoder_2.config.projection_dim} = {clip_pooled} pooled channels, but the "
                            f"transformer's pooled_projection_dim is {pooled} (768 + 1280 = 2048 on SD3).")
    if clip_width > joint:
        raise LoraFileError(f"SD3 folder {path}: CLIP-L + CLIP-G hidden states are {clip_width} wide, more than the "
                            f"transformer's joint_attention_dim {joint} they are padded to (2048 <= 4096 on SD3).")
    if text_encoder_3 is not None and int(text_encoder_3.config.d_model) != joint:
        raise LoraFileError(f"SD3 folder {path}: T5 (text_encoder_3) is {text_encoder_3.config.d_model} wide but "
                            f"the transformer's joint_attention_dim is {joint} (4096 on SD3).")
    from lora_core.arch.families.sd3 import FAMILY

    state = transformer.state_dict()
    found = FAMILY.detect_diffusers(list(state), {k: tuple(v.shape) for k, v in state.items()})
    if found is None:
        raise LoraValueError(f"Model {path}: the transformer's layout is not recognised as SD3 / SD3.5.")
    arch, spec = found
    for module in (transformer, vae, text_encoder, text_encoder_2, text_encoder_3):
        if module is not None:
            module.to(device, torch.float32).eval()
            module.requires_grad_(False)
    return DiffusersSD3(transformer, vae, text_encoder, text_encoder_2, text_encoder_3, tokenizer, tokenizer_2,
                        tokenizer_3, scheduler_config, arch, spec)


def sd3_objective(scheduler_config: dict, default_sampling: str, source: str = "scheduler") -> Objective:
    """Flow matching at the scheduler config's static shift, timestep input sigma * 1000."""
    if scheduler_config.get("use_dynamic_shifting"):
        raise LoraValueError(f"{source}: scheduler_config.json has use_dynamic_shifting = true; SD3 / SD3.5 sample "
                             f"with a static shift (3.0), which is what training here follows. Set "
                             f"use_dynamic_shifting to false (and shift to the model's) in scheduler_config.json.")
    return Objective.flow(float(scheduler_config.get("shift", 3.0)), TIMESTEP_MULTIPLIER, None, default_sampling)


class SD3DiffusersBackend:
    """The training loop's backend over an SD3Transformer2DModel: `cond` is {"context", "pooled_output"} of
    sd3_text_encoder; returns the velocity (B, 16, h, w)."""

    guidance = None   # SD3 has no guidance input

    def __init__(self, transformer: nn.Module, objective: Objective, text_encoders=()):
        self.transformer = transformer
        self.objective = objective
        self.prediction_type = objective.prediction
        self.text_encoders = list(text_encoders)
        self.device = next(transformer.parameters()).device
        self.patch = int(transformer.config.patch_size)

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
        if not isinstance(cond, dict) or "pooled_output" not in cond:
            raise ValueError("SD3 training needs the conditioning dict {'context', 'pooled_output'} of "
                             "sd3_text_encoder; got " + type(cond).__name__)
        h, w = noisy.shape[-2:]
        if h % self.patch or w % self.patch:
            raise LoraValueError(f"SD3 latents must have height and width divisible by the patch size "
                                 f"{self.patch}, got {h}x{w}: use image sizes that are multiples of 16.")
        dtype = next(self.transformer.parameters()).dtype
        return self.transformer(hidden_states=noisy.to(self.device, dtype),
                                timestep=timesteps.to(self.device, dtype),
                                encoder_hidden_states=cond["context"].to(self.device, dtype),
                                pooled_projections=cond["pooled_output"].to(self.device, dtype),
                                return_dict=False)[0]

    def modules(self) -> list[nn.Module]:
        return [self.transformer, *self.text_encoders]

    def checkpoint_modules(self) -> list[nn.Module]:
        return list(getattr(self.transformer, "transformer_blocks", []))


def sd3_text_encoder(tokenizers, text_encoders, joint_attention_dim: int,
                     max_t5_tokens: int = T5_MAX_TOKENS) -> Callable:
    """encode(captions) -> {"context": (B, 77 + T5 tokens, joint dim), "pooled_output": (B, L + G projections)},
    as StableDiffusion3Pipeline.encode_prompt; `tokenizers` / `text_encoders` are (CLIP-L, CLIP-G, T5 or None)."""
    (tok_l, tok_g, tok_t5), (enc_l, enc_g, enc_t5) = tokenizers, text_encoders
    t5_length = int(max_t5_tokens)
    if tok_t5 is not None:
        t5_length = int(min(t5_length, getattr(tok_t5, "model_max_length", t5_length) or t5_length))

    def clip(tokenizer, encoder, captions):
        length = int(min(CLIP_TOKENS, getattr(tokenizer, "model_max_length", CLIP_TOKENS) or CLIP_TOKENS))
        tokens = tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        out = encoder(tokens.input_ids.to(next(encoder.parameters()).device), output_hidden_states=True)
        return out.hidden_states[-2], out[0]

    def encode(captions: list[str]) -> dict:
        captions = list(captions)
        hidden_l, pooled_l = clip(tok_l, enc_l, captions)
        hidden_g, pooled_g = clip(tok_g, enc_g, captions)
        clip_states = torch.cat([hidden_l, hidden_g], dim=-1)
        if enc_t5 is None:
            t5_states = torch.zeros(len(captions), t5_length, joint_attention_dim, device=clip_states.device,
                                    dtype=clip_states.dtype)
        else:
            tokens = tok_t5(captions, padding="max_length", max_length=t5_length, truncation=True,
                            add_special_tokens=True, return_tensors="pt")
            t5_states = enc_t5(tokens.input_ids.to(next(enc_t5.parameters()).device))[0].to(clip_states.device)
        clip_states = nn.functional.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
        return {"context": torch.cat([clip_states, t5_states], dim=-2),
                "pooled_output": torch.cat([pooled_l, pooled_g], dim=-1)}

    return encode


def sd3_targets(transformer: nn.Module, arch, spec, train_spec, kinds, blocks=None) -> list[Target]:
    """The kohya-named LoRA targets of a diffusers SD3 transformer, one per module of the family's canonical layout
    whose training kind is in `kinds` and block in `blocks` (None = all), in the layout's order: the Linears as
    diffusers_flux.flux_targets builds them (fused or swapped canonical weights get Target.parts over diffusers'
    modules), and the x_embedder patch conv (diffusers' pos_embed.proj) whole."""
    from .diffusers_flux import flux_targets

    family = arch.family
    linears = {t.name: t for t in flux_targets(transformer, arch, spec, train_spec, kinds, blocks)}
    modules = dict(transformer.named_modules())
    convs = {}
    for key, (canonical, pieces, param) in family.diffusers_host_pieces(spec, arch).items():
        module = modules.get(key[:-len(".weight")])
        if param == "weight" and pieces is None and isinstance(module, nn.Conv2d):
            convs[canonical] = module
    wanted = None if blocks is None else set(blocks)
    out = []
    for m in family.modules(spec, arch):
        if m.param != "weight":
            continue
        name = family.export_name(m) or "lora_unet_" + m.path.replace(".", "_")
        if name in linears:
            out.append(linears.pop(name))
        elif m.path in convs:
            kind = train_spec.kind_of_target(m.path, m.kind)
            if kind is not None and kind in kinds and (wanted is None or m.block in wanted):
                out.append(Target(name, convs[m.path], "unet", m.block, kind))
    return out + list(linears.values())


def build_sd3(run, dist, nf4, cli):
    """(trainer, dataset) for a diffusers SD3 folder; `cli` is lora_core.train.__main__ (its dataset, config,
    block and trainer helpers, shared with the other families)."""
    from .injection import LoRANetwork, find_te_targets
    t = run.train
    model = load_sd3(run.model, dist.device)
    arch, family = model.arch, model.arch.family
    cli.check_architecture(run, arch)
    spec = family.train_spec(arch, model.spec)
    cli.refuse_guidance(run, arch, " (classifier-free guidance applies at sampling, not in training)")
    cli.refuse_locon(run, arch, " (\"all layers\" already trains its patch conv)")
    with_t5 = t["train_text_encoder"] and t["text_encoders"] == "all"
    if with_t5 and model.text_encoder_3 is None:
        raise LoraValueError(f"{run.source}: [train] text_encoders = \"all\" trains T5 (lora_te3_) too, but "
                             f"{run.model} has no text_encoder_3 (an SD3 without T5). Set text_encoders = "
                             f"\"kohya default\" (CLIP-L and CLIP-G).")
    objective = sd3_objective(model.scheduler_config, spec.timestep_sampling,
                              os.path.join(run.model, "scheduler", "scheduler_config.json"))
    t_range = cli.timestep_range_of(run, {}, objective)
    dataset, validation = cli.load_dataset(run, spec, arch)
    kinds = tuple(spec.target_sets.get(t["unet_targets"], ()))
    present = {m.block for m in family.modules(model.spec, arch)}
    blocks, block_lr = cli._blocks(run, [b for b in arch.blocks if b in present])
    config = cli.train_config(t, dist, kinds, blocks, block_lr, t_range)
    targets = sd3_targets(model.transformer, arch, model.spec, spec, kinds, blocks)
    trained_encoders = []
    if config.train_text_encoder:   # kohya's default: CLIP-L (lora_te1_) + CLIP-G (lora_te2_); "all": T5 too
        targets += find_te_targets(model.text_encoder, "lora_te1", "te1")
        targets += find_te_targets(model.text_encoder_2, "lora_te2", "te2")
        trained_encoders += [model.text_encoder, model.text_encoder_2]
        if with_t5:
            targets += cli.t5_targets(model.text_encoder_3)
            trained_encoders.append(model.text_encoder_3)
    network = LoRANetwork(targets, config.rank, config.alpha, seed=config.seed, algorithm=config.algorithm)
    backend = SD3DiffusersBackend(model.transformer, objective, text_encoders=trained_encoders)
    encode_text = sd3_text_encoder((model.tokenizer, model.tokenizer_2, model.tokenizer_3),
                                   (model.text_encoder, model.text_encoder_2, model.text_encoder_3),
                                   int(model.transformer.config.joint_attention_dim))
    trainer = cli._trainer(run, dist, backend, network, dataset, config, cli.vae_encoder(model.vae), encode_text,
                           arch.name, validation, nf4)
    return trainer, dataset
