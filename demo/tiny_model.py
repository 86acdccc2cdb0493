"""Tiny, seeded, SD1.5-shaped assets that the real ComfyUI loads and runs on CPU in seconds.

* `make_tiny_checkpoint(path)` writes one `.safetensors` checkpoint that `CheckpointLoaderSimple` detects
  as **SD15** (`comfy/supported_models.py` matches only `context_dim=768, model_channels=320`, conv
  `proj_in`, no ADM, no temporal layers; depth, levels and res-block counts are not checked):
  * UNet: model_channels 320, one level (channel_mult [1]), one res block, one transformer block on
    `input_blocks.1`, `middle_block.1`, `output_blocks.0/1` (so every SD1.5 block family IN/M/OUT has
    attention for LoRAs to hit): about 25.8 M parameters;
  * CLIP-L: ComfyUI builds SD1.x's text encoder from a fixed config (`comfy/sd1_clip_config.json`, 12
    layers, 768 wide, 49408 tokens), so a smaller one would load with uninitialised layers. It is the real
    shape with random weights: 123 M parameters;
  * VAE: the checkpoint carries a TAESD (`taesd_encoder.*`/`taesd_decoder.*` under `first_stage_model.`),
    which `comfy.sd.VAE` recognises and builds instead of the 83 M-parameter KL VAE: 2.4 M parameters.
  Everything is fp16 (ComfyUI casts on load): about 300 MB on disk.
* `make_tiny_loras(folder)` writes kohya-format LoRAs for that checkpoint (`lora_unet_<ldm path>`,
  `lora_te_text_model_encoder_layers_<i>_…`, `.lora_down/.lora_up/.alpha`, `ss_*` and `modelspec.*`
  metadata): a "character" LoRA (UNet attention + every CLIP layer), a "style" LoRA (output-block
  attention and feed-forward only) and a "detail" LoCon-style LoRA on the 1x1 conv `proj_in/proj_out`.
* `make_training_folder(folder)` writes 8 small images of a coloured shape with same-name `.txt` captions.

Weights are drawn from one `torch.Generator` per file, key by key in sorted order (`fill_tensor`), so the same
seed gives bit-identical tensors (safetensors does not fix the order of the metadata in a file's header).
ComfyUI's own model classes (imported in-process, meta device) give the exact UNet, CLIP and TAESD keys and
shapes, so the file matches what ComfyUI builds when it loads it.

The tiny Flux.1 assets (diffusion model, CLIP-L, TAEF1, Flux LoRAs) are in demo/tiny_flux.py;
`ensure_demo_models` builds both sets.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

CHECKPOINT_NAME = "lora_core_tiny_sd15.safetensors"
# Bump when the layout or the fill rule changes, so cached files are rebuilt.
ASSET_VERSION = "3"

# Attention sites of the tiny UNet in ComfyUI/LDM naming (one transformer block each).
UNET_TRANSFORMERS = ["input_blocks.1.1", "middle_block.1", "output_blocks.0.1", "output_blocks.1.1"]
UNET_WIDTH = 320
CONTEXT_DIM = 768
CLIP_LAYERS = 12
CLIP_WIDTH = 768
CLIP_MLP = 3072


def tiny_unet_config() -> dict:
    """The unet_config ComfyUI's detection infers from the tiny checkpoint (see module docstring)."""
    return {
        "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": UNET_WIDTH,
        "num_res_blocks": [1], "channel_mult": [1],
        # ComfyUI consumes transformer_depth_output from its end: two output blocks, both with attention.
        "transformer_depth": [1], "transformer_depth_output": [1, 1], "transformer_depth_middle": 1,
        "context_dim": CONTEXT_DIM, "use_linear_in_transformer": False, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }


def checkpoint_layout() -> dict[str, tuple[int, ...]]:
    """Every key of the tiny checkpoint (full-checkpoint prefixes) -> shape, as ComfyUI's classes define them."""
    from demo.host import import_comfy_core

    comfy = import_comfy_core()
    import comfy.sd1_clip
    import comfy.taesd.taesd

    model_config = comfy.supported_models.SD15(tiny_unet_config())
    model_config.set_inference_dtype(torch.float32, None)
    unet = model_config.get_model({}, device="meta").diffusion_model.state_dict()
    clip = comfy.sd1_clip.SD1ClipModel(device="meta").state_dict()
    with torch.device("meta"):
        vae = comfy.taesd.taesd.TAESD(latent_channels=4).state_dict()
    full = {}
    full.update(model_config.process_unet_state_dict_for_saving(unet))
    full.update(model_config.process_clip_state_dict_for_saving(clip))
    full.update(model_config.process_vae_state_dict_for_saving(vae))
    return {key: tuple(value.shape) for key, value in full.items()}


def fill_tensor(key: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A plausible random value for one tensor: norms at identity, biases at zero, weights scaled by fan-in
    (so activations stay finite through 12 CLIP layers and the sampler never produces NaN)."""
    if key.endswith("vae_scale"):
        return torch.ones(shape)
    if key.endswith("vae_shift") or key.endswith(".bias") or key.endswith("logit_scale"):
        return torch.zeros(shape)
    if len(shape) == 1:  # LayerNorm / GroupNorm scale
        return torch.ones(shape)
    if key.endswith("position_ids"):
        return torch.arange(shape[-1]).reshape(shape).float()
    if "embedding" in key:  # CLIP token / position tables
        return torch.randn(shape, generator=generator) * 0.02
    fan_in = max(1, math.prod(shape[1:]))
    return torch.randn(shape, generator=generator) / math.sqrt(fan_in)


def make_tiny_checkpoint(path: Path | str, seed: int = 0) -> Path:
    """Write the tiny SD1.5-shaped checkpoint to `path` (fp16 safetensors). Same seed -> same tensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in sorted(checkpoint_layout().items()):
        tensors[key] = fill_tensor(key, shape, generator).to(torch.float16).contiguous()
    metadata = {"lora_core.tiny": ASSET_VERSION, "modelspec.architecture": "stable-diffusion-v1",
                "modelspec.title": "LoRA Core tiny SD1.5 (random weights, for tests and the demo)"}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------- LoRAs

def _kohya(prefix: str, path: str) -> str:
    return prefix + path.replace(".", "_")


def unet_attention_targets(blocks: list[str] = UNET_TRANSFORMERS, feed_forward: bool = False
                           ) -> dict[str, tuple[int, int]]:
    """LDM module path -> (out, in) of the linear layers in the tiny UNet's transformer blocks."""
    targets = {}
    for block in blocks:
        base = f"{block}.transformer_blocks.0"
        for attn, kv_in in (("attn1", UNET_WIDTH), ("attn2", CONTEXT_DIM)):
            targets[f"{base}.{attn}.to_q"] = (UNET_WIDTH, UNET_WIDTH)
            targets[f"{base}.{attn}.to_k"] = (UNET_WIDTH, kv_in)
            targets[f"{base}.{attn}.to_v"] = (UNET_WIDTH, kv_in)
            targets[f"{base}.{attn}.to_out.0"] = (UNET_WIDTH, UNET_WIDTH)
        if feed_forward:
            targets[f"{base}.ff.net.0.proj"] = (UNET_WIDTH * 8, UNET_WIDTH)  # GEGLU: two halves
            targets[f"{base}.ff.net.2"] = (UNET_WIDTH, UNET_WIDTH * 4)
    return targets


def clip_targets(layers: range = range(CLIP_LAYERS)) -> dict[str, tuple[int, int]]:
    """HF CLIP module path -> (out, in) for the attention and MLP linears of the chosen layers."""
    targets = {}
    for i in layers:
        base = f"text_model.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            targets[f"{base}.self_attn.{proj}"] = (CLIP_WIDTH, CLIP_WIDTH)
        targets[f"{base}.mlp.fc1"] = (CLIP_MLP, CLIP_WIDTH)
        targets[f"{base}.mlp.fc2"] = (CLIP_WIDTH, CLIP_MLP)
    return targets


def _lora_pair(shape: tuple[int, ...], rank: int, generator: torch.Generator, up_scale: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) for a linear (out, in) or a 1x1 conv (out, in, 1, 1) target."""
    out_features, in_features = shape[0], shape[1]
    spatial = tuple(shape[2:])
    down = torch.randn((rank, in_features) + spatial, generator=generator) / math.sqrt(in_features)
    up = torch.randn((out_features, rank) + tuple(1 for _ in spatial), generator=generator) * up_scale
    return down, up


def write_kohya_lora(path: Path, targets: dict[str, tuple[int, ...]], rank: int, alpha: float, seed: int,
                     up_scale: float, metadata: dict[str, str]) -> Path:
    """A kohya LoRA (`<module>.lora_down/.lora_up.weight`, `.alpha`, fp16) on `targets` (kohya module name ->
    target weight shape); `metadata` is added to (and overrides) the SD1.5 defaults below."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in sorted(targets):
        down, up = _lora_pair(targets[name], rank, generator, up_scale)
        tensors[f"{name}.lora_down.weight"] = down.to(torch.float16).contiguous()
        tensors[f"{name}.lora_up.weight"] = up.to(torch.float16).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float16)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
            "ss_base_model_version": "sd_v1", "ss_sd_model_name": CHECKPOINT_NAME,
            "lora_core.tiny": ASSET_VERSION}
    meta.update(metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def _tag_frequency(folder: str, tags: dict[str, int]) -> str:
    return json.dumps({folder: tags})


def make_tiny_loras(folder: Path | str, seed: int = 1) -> dict[str, Path]:
    """Write the tiny kohya LoRAs into `folder`; returns {short name: path}."""
    folder = Path(folder)
    character = {_kohya("lora_unet_", k): v for k, v in unet_attention_targets().items()}
    character.update({_kohya("lora_te_", k): v for k, v in clip_targets().items()})
    style = {_kohya("lora_unet_", k): v for k, v in
             unet_attention_targets(["output_blocks.0.1", "output_blocks.1.1"], feed_forward=True).items()}
    detail = {}
    for block in UNET_TRANSFORMERS:  # SD1.5's proj_in/proj_out are 1x1 convs: 4-D LoRA factors
        detail[_kohya("lora_unet_", f"{block}.proj_in")] = (UNET_WIDTH, UNET_WIDTH, 1, 1)
        detail[_kohya("lora_unet_", f"{block}.proj_out")] = (UNET_WIDTH, UNET_WIDTH, 1, 1)
    return {
        "character": write_kohya_lora(
            folder / "tiny_character.safetensors", character, rank=4, alpha=2.0, seed=seed, up_scale=0.2,
            metadata={"ss_output_name": "tiny_character",
                      "ss_tag_frequency": _tag_frequency("8_tinychar", {"tinychar": 8, "red circle": 8}),
                      "modelspec.title": "tiny character", "modelspec.trigger_phrase": "tinychar",
                      "modelspec.architecture": "stable-diffusion-v1/lora"}),
        "style": write_kohya_lora(
            folder / "tiny_style.safetensors", style, rank=8, alpha=8.0, seed=seed + 1, up_scale=0.1,
            metadata={"ss_output_name": "tiny_style",
                      "ss_tag_frequency": _tag_frequency("4_tinystyle", {"tinystyle": 4, "flat colours": 4}),
                      "modelspec.title": "tiny style", "modelspec.trigger_phrase": "tinystyle",
                      "modelspec.architecture": "stable-diffusion-v1/lora"}),
        "detail": write_kohya_lora(
            folder / "tiny_detail_locon.safetensors", detail, rank=4, alpha=4.0, seed=seed + 2, up_scale=0.1,
            metadata={"ss_output_name": "tiny_detail_locon", "modelspec.title": "tiny detail (1x1 conv)",
                      "modelspec.architecture": "stable-diffusion-v1/lora"}),
    }


def lora_targets_in_checkpoint(lora_keys: list[str], layout: dict[str, tuple[int, ...]]) -> list[str]:
    """Kohya LoRA module names whose target weight is missing from the checkpoint layout (empty = all hit)."""
    known = {}
    for key in layout:
        for prefix, kohya in (("model.diffusion_model.", "lora_unet_"), ("cond_stage_model.transformer.", "lora_te_")):
            if key.startswith(prefix) and key.endswith(".weight"):
                known[_kohya(kohya, key[len(prefix):-len(".weight")])] = layout[key]
    modules = {k.split(".")[0] for k in lora_keys}
    return sorted(m for m in modules if m not in known)


# --------------------------------------------------------------------------------------- training data

SHAPE_COLOURS = [(220, 40, 40), (200, 30, 60), (230, 60, 30), (190, 20, 20)]


def make_training_folder(folder: Path | str, count: int = 8, size: int = 64, seed: int = 2) -> Path:
    """`count` PNG images of a red circle at seeded positions/sizes, each with a same-name .txt caption."""
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for i in range(count):
        radius = int(torch.randint(size // 6, size // 3, (1,), generator=generator))
        cx = int(torch.randint(radius, size - radius, (1,), generator=generator))
        cy = int(torch.randint(radius, size - radius, (1,), generator=generator))
        colour = SHAPE_COLOURS[i % len(SHAPE_COLOURS)]
        image = Image.new("RGB", (size, size), (245, 245, 240))
        ImageDraw.Draw(image).ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
        image.save(folder / f"shape_{i:02d}.png")
        (folder / f"shape_{i:02d}.txt").write_text("tinyshape, a red circle on a white background\n")
    return folder


# ------------------------------------------------------------------------------------------ all assets

def ensure_demo_models(models_dir: Path | str, force: bool = False) -> dict[str, Path]:
    """Create (or reuse, when the version stamps match) everything the demo and the end-to-end tests need under
    `models_dir` (a ComfyUI models folder): the SD1.5 checkpoint, its LoRAs and the training folder
    (checkpoints/, loras/, training/), and the tiny Flux with its CLIP-L, TAEF1 and Flux LoRAs
    (diffusion_models/, text_encoders/, vae_approx/, loras/; demo/tiny_flux.py), and the tiny Wan 2.2 experts
    with their VAE and LoRA pair (diffusion_models/, vae/, loras/; demo/tiny_wan.py). Returns the paths."""
    from demo.tiny_flux import ensure_flux_models
    from demo.tiny_wan import ensure_wan_models

    models_dir = Path(models_dir)
    stamp = models_dir / ".lora_core_tiny_version"
    paths = {
        "checkpoint": models_dir / "checkpoints" / CHECKPOINT_NAME,
        "loras": models_dir / "loras",
        "training": models_dir / "training" / "tiny_shape",
    }
    if force or not stamp.exists() or stamp.read_text().strip() != ASSET_VERSION or not paths["checkpoint"].exists():
        make_tiny_checkpoint(paths["checkpoint"])
        loras = make_tiny_loras(paths["loras"])
        make_training_folder(paths["training"])
        for folder in ("vae", "embeddings"):
            (models_dir / folder).mkdir(parents=True, exist_ok=True)
        stamp.write_text(ASSET_VERSION + "\n")
        paths.update({f"lora_{k}": v for k, v in loras.items()})
    paths.update(ensure_flux_models(models_dir, force=force))
    paths.update(ensure_wan_models(models_dir, force=force))
    return paths
