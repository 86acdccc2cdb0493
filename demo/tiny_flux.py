"""Tiny, seeded, Flux.1-dev-shaped assets that core's own loaders (Load Diffusion Model, Load CLIP, Load VAE)
load and the real ComfyUI samples on CPU in seconds.

What ComfyUI allows (comfy/model_detection.py, comfy/ldm/flux/model.py): a Flux file's depths and its img_in /
txt_in / vector_in widths are read from its shapes, but num_heads 24, axes_dim [16, 56, 56] and mlp_ratio 4 are
fixed, and Flux requires sum(axes_dim) == hidden_size / num_heads, so hidden_size is 3072 at any depth. T5-XXL's
config is fixed too (4096 wide, 24 layers, 4.7 B parameters): no T5 file can be tiny. So:

* `make_tiny_flux(path)`: a Flux.1 [dev] diffusion model for core's UNETLoader (models/diffusion_models):
  hidden 3072, **one double block and one single block** (block ids IN, DB00, SB00, OUT), `guidance_in` (dev:
  FluxGuidance applies), `img_in` 64 wide (16-channel latents in 2x2 patches), and `txt_in` and `vector_in`
  **768 wide** instead of Flux.1's 4096 / 768, so a CLIP-L conditions it directly: CLIPTextEncode's
  (1, 77, 768) context feeds txt_in, its 768-wide pooled vector vector_in. 535.3 M parameters, stored as
  float8_e4m3fn like the popular fp8 Flux files: 535 MB on disk. ComfyUI casts it to its compute dtype when it
  loads it (fp32 on a CPU: 2.1 GB of RAM).
* `make_tiny_clip_l(path)`: a CLIP-L text encoder for core's CLIPLoader (type `stable_diffusion`,
  models/text_encoders), keys as in the usual `clip_l.safetensors` (`text_model.…`). ComfyUI builds CLIP-L from
  a fixed config, so it is the real shape with random weights: 123.7 M parameters, fp16, 247 MB.
* `make_taef1(folder)`: ComfyUI's own TAESD class with latent_channels 16, written as
  `taef1_encoder.safetensors` / `taef1_decoder.safetensors` in models/vae_approx, the two files core's VAELoader
  looks for to offer `taef1` (it adds Flux's latent scale 0.3611 and shift 0.1159): 2.5 M parameters, 4.9 MB.
* `make_tiny_flux_loras(folder)`: kohya sd-scripts Flux LoRAs (networks/lora_flux.py naming:
  `lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_single_blocks_0_linear1`, CLIP-L as
  `lora_te1_text_model_encoder_layers_0_self_attn_q_proj`; `.lora_down/.lora_up/.alpha`; `ss_*` and `modelspec.*`
  metadata for flux1), both on every Linear of both blocks as kohya trains by default, so block vectors decide
  where each one acts: a "character" LoRA (rank 4, with CLIP-L) and a "style" LoRA (rank 8, diffusion model
  only).

Weights are drawn from one `torch.Generator` per file, key by key in sorted order (demo.tiny_model.fill_tensor's
rule), so the same seed gives bit-identical tensors. Keys and shapes come from ComfyUI's own classes on the meta
device (`comfy.supported_models.Flux`, `comfy.sd1_clip.SD1ClipModel`, `comfy.taesd.taesd.TAESD`), so every file
is exactly what ComfyUI builds when it loads it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from demo.tiny_model import CLIP_LAYERS, clip_targets, fill_tensor, write_kohya_lora

# Bump when a layout or the fill rule changes, so cached Flux files are rebuilt (independent of the SD1.5 ones).
ASSET_VERSION = "1"
FLUX_NAME = "lora_core_tiny_flux.safetensors"
CLIP_L_NAME = "lora_core_tiny_clip_l.safetensors"
TAEF1_NAMES = ("taef1_encoder.safetensors", "taef1_decoder.safetensors")
TAEF1_CHOICE = "taef1"  # what core's VAELoader offers once both files are in models/vae_approx
FLUX_DTYPE = torch.float8_e4m3fn

FLUX_HIDDEN = 3072  # fixed by ComfyUI's Flux detection (24 heads x 128)
FLUX_MLP = 4 * FLUX_HIDDEN
CONTEXT_DIM = 768  # txt_in and vector_in: a CLIP-L's context and pooled widths


def tiny_flux_config() -> dict:
    """The unet_config ComfyUI's detection infers from the tiny Flux file (see the module docstring)."""
    return {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16,
            "vec_in_dim": CONTEXT_DIM, "context_in_dim": CONTEXT_DIM, "hidden_size": FLUX_HIDDEN,
            "mlp_ratio": 4.0, "num_heads": 24, "depth": 1, "depth_single_blocks": 1, "axes_dim": [16, 56, 56],
            "theta": 10000, "qkv_bias": True, "guidance_embed": True}


def flux_layout() -> dict[str, tuple[int, ...]]:
    """Every key of the tiny Flux diffusion model (no prefix, as UNETLoader files have them) -> shape."""
    from demo.host import import_comfy_core

    comfy = import_comfy_core()
    model_config = comfy.supported_models.Flux(tiny_flux_config())
    model_config.set_inference_dtype(torch.float32, None)
    state = model_config.get_model({}, device="meta").diffusion_model.state_dict()
    return {key: tuple(value.shape) for key, value in state.items()}


def clip_l_layout() -> dict[str, tuple[int, ...]]:
    """Every key of a standalone CLIP-L file (`text_model.…`, `text_projection.weight`) -> shape."""
    from demo.host import import_comfy_core

    import_comfy_core()
    import comfy.sd1_clip

    prefix = "clip_l.transformer."
    state = comfy.sd1_clip.SD1ClipModel(device="meta").state_dict()
    return {key[len(prefix):]: tuple(value.shape) for key, value in state.items() if key.startswith(prefix)}


def taef1_layouts() -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(encoder, decoder) keys -> shapes of ComfyUI's TAESD for 16-channel (Flux) latents."""
    from demo.host import import_comfy_core

    comfy = import_comfy_core()
    with torch.device("meta"):
        taesd = comfy.taesd.taesd.TAESD(latent_channels=16)
    return ({k: tuple(v.shape) for k, v in taesd.taesd_encoder.state_dict().items()},
            {k: tuple(v.shape) for k, v in taesd.taesd_decoder.state_dict().items()})


def _save(path: Path, layout: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype, metadata: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in sorted(layout.items()):
        value = fill_tensor(key, shape, generator).to(dtype)
        if not torch.isfinite(value.float()).all():  # fp8 has no infinity: an overflow would be NaN
            raise ValueError(f"{key}: value out of range for {dtype}")
        tensors[key] = value.contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"lora_core.tiny": ASSET_VERSION, **metadata})
    tmp.replace(path)
    return path


def make_tiny_flux(path: Path | str, seed: int = 10) -> Path:
    """Write the tiny Flux.1 [dev] diffusion model (float8_e4m3fn safetensors). Same seed -> same tensors."""
    return _save(Path(path), flux_layout(), seed, FLUX_DTYPE, {
        "modelspec.architecture": "flux-1-dev",
        "modelspec.title": "LoRA Core tiny Flux.1 (1 double + 1 single block, 768-wide text input; random weights)"})


def make_tiny_clip_l(path: Path | str, seed: int = 11) -> Path:
    """Write the CLIP-L text encoder for the tiny Flux (fp16 safetensors)."""
    return _save(Path(path), clip_l_layout(), seed, torch.float16, {
        "modelspec.title": "LoRA Core CLIP-L (real shape, random weights)"})


def make_taef1(folder: Path | str, seed: int = 12) -> tuple[Path, Path]:
    """Write taef1_encoder / taef1_decoder (fp16 safetensors) into `folder` (a models/vae_approx folder)."""
    folder = Path(folder)
    encoder, decoder = taef1_layouts()
    meta = {"modelspec.title": "LoRA Core tiny TAEF1 (TAESD for 16-channel latents, random weights)"}
    return (_save(folder / TAEF1_NAMES[0], encoder, seed, torch.float16, meta),
            _save(folder / TAEF1_NAMES[1], decoder, seed + 1, torch.float16, meta))


# ---------------------------------------------------------------------------------------------- LoRAs

FLUX_LORA_META = {"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1",
                  "ss_sd_model_name": FLUX_NAME, "modelspec.architecture": "flux-1-dev/lora",
                  "modelspec.implementation": "https://github.com/black-forest-labs/flux",
                  "modelspec.sai_model_spec": "1.0.0"}


def flux_block_targets(layout: dict[str, tuple[int, ...]] | None = None) -> dict[str, tuple[int, int]]:
    """Module path -> (out, in) of every Linear in the double and single blocks (what kohya's lora_flux trains)."""
    layout = flux_layout() if layout is None else layout
    return {key[:-len(".weight")]: shape for key, shape in layout.items()
            if key.startswith(("double_blocks.", "single_blocks.")) and key.endswith(".weight") and len(shape) == 2}


def make_tiny_flux_loras(folder: Path | str, seed: int = 13) -> dict[str, Path]:
    """Write the tiny kohya Flux LoRAs into `folder`; returns {short name: path}."""
    folder = Path(folder)
    blocks = {"lora_unet_" + path.replace(".", "_"): shape for path, shape in flux_block_targets().items()}
    character = dict(blocks)
    character.update({"lora_te1_" + path.replace(".", "_"): shape
                      for path, shape in clip_targets(range(CLIP_LAYERS)).items()})
    common = dict(FLUX_LORA_META)
    return {
        "flux_character": write_kohya_lora(
            folder / "tiny_flux_character.safetensors", character, rank=4, alpha=2.0, seed=seed, up_scale=0.2,
            metadata={**common, "ss_output_name": "tiny_flux_character", "lora_core.tiny": ASSET_VERSION,
                      "modelspec.title": "tiny Flux character", "modelspec.trigger_phrase": "tinyfluxchar"}),
        "flux_style": write_kohya_lora(
            folder / "tiny_flux_style.safetensors", blocks, rank=8, alpha=8.0, seed=seed + 1, up_scale=0.1,
            metadata={**common, "ss_output_name": "tiny_flux_style", "lora_core.tiny": ASSET_VERSION,
                      "modelspec.title": "tiny Flux style", "modelspec.trigger_phrase": "tinyfluxstyle"}),
    }


# ------------------------------------------------------------------------------------------ all assets

def flux_paths(models_dir: Path | str) -> dict[str, Path]:
    models_dir = Path(models_dir)
    return {
        "flux": models_dir / "diffusion_models" / FLUX_NAME,
        "clip_l": models_dir / "text_encoders" / CLIP_L_NAME,
        "taef1_encoder": models_dir / "vae_approx" / TAEF1_NAMES[0],
        "taef1_decoder": models_dir / "vae_approx" / TAEF1_NAMES[1],
        "lora_flux_character": models_dir / "loras" / "tiny_flux_character.safetensors",
        "lora_flux_style": models_dir / "loras" / "tiny_flux_style.safetensors",
    }


def ensure_flux_models(models_dir: Path | str, force: bool = False) -> dict[str, Path]:
    """Create (or reuse, when the version stamp matches and every file exists) the tiny Flux, its CLIP-L, TAEF1
    and Flux LoRAs under `models_dir` (a ComfyUI models folder). Returns the paths."""
    models_dir = Path(models_dir)
    stamp = models_dir / ".lora_core_tiny_flux_version"
    paths = flux_paths(models_dir)
    if not force and stamp.exists() and stamp.read_text().strip() == ASSET_VERSION \
            and all(p.exists() for p in paths.values()):
        return paths
    make_tiny_flux(paths["flux"])
    make_tiny_clip_l(paths["clip_l"])
    make_taef1(paths["taef1_encoder"].parent)
    make_tiny_flux_loras(paths["lora_flux_character"].parent)
    stamp.write_text(ASSET_VERSION + "\n")
    return paths
