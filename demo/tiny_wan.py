"""Tiny, seeded Wan 2.2 A14B-shaped assets that core's own loaders (Load Diffusion Model, Load VAE) load and the
real ComfyUI samples on CPU in seconds, conditioned by the demo's tiny CLIP-L (demo/tiny_flux.py).

What ComfyUI allows (comfy/model_detection.py, the `head.modulation` branch; comfy/ldm/wan/model.py; comfy/sd.py):
a Wan file's dim, FFN width, depth and in / out channels are read from its shapes, but num_heads is dim / 128 and
WanModel's text width is fixed at 4096 (UMT5-XXL's; not read from the file), and UMT5-XXL's config is fixed too
(24 layers, 5.7 B parameters): no UMT5 file can be tiny. So the tiny experts are dim 128 (one 128-wide head), FFN
256, 2 blocks (block ids B00, B01), and their text input is **768 wide** (`text_embedding.0.weight` [128, 768]
instead of [128, 4096]), so CLIPTextEncode's (1, 77, 768) CLIP-L context feeds them directly. ComfyUI takes that
shape from the file because each expert's safetensors metadata carries `_quantization_metadata` (ComfyUI's
per-layer mixed-precision format, comfy/model_detection.py `detect_layer_quantization`): a non-empty `layers`
dict selects comfy/ops.py `mixed_precision_ops`, whose Linear assigns each weight as the file stores it, with no
shape check. The one `layers` entry (`QUANT_MARKER_LAYER`) names no module of the model, so nothing is
quantised: every weight loads in the compute dtype, as with plain ops. A Wan 2.2 T2V-A14B expert has Wan 2.1
T2V's structure (ComfyUI loads both as `supported_models.WAN21_T2V`), so:

* `make_tiny_wan_experts(folder)`: `lora_core_tiny_wan22_high_noise.safetensors` and `..._low_noise.safetensors`
  for core's UNETLoader (models/diffusion_models), two differently seeded experts of the same structure.
* `make_tiny_wan_vae(path)`: a Wan 2.1 VAE (comfy.ldm.wan.vae.WanVAE) for core's VAELoader (models/vae): ComfyUI
  reads its base width from `decoder.head.0.gamma`, so it is 8 wide instead of 96 (16 latent channels, 4x temporal
  and 8x spatial compression, as the real one).
* `make_tiny_wan_loras(folder)`: a musubi-tuner Wan LoRA pair (networks/lora_wan.py naming: every Linear of the
  WanAttentionBlocks, `lora_unet_blocks_0_self_attn_q.lora_down/.lora_up.weight` + `.alpha`, `ss_network_module`
  `networks.lora_wan`) with musubi's `modelspec.timestep_range` (training/trainer_base.py; docs/wan.md: "875,1000"
  for the T2V high-noise expert, "0,875" for the low-noise one), saved as `tiny_wan_pair_high_noise` /
  `tiny_wan_pair_low_noise` (ai-toolkit's and most uploads' pair naming).

workflows/09_wan22_lora_pair.json samples them (tests/test_demo_wan.py checks them in-process).

Keys and shapes come from ComfyUI's own classes on the meta device; weights are drawn from one torch.Generator per
file, key by key in sorted order (demo.tiny_model.fill_tensor's rule; RMS-norm gammas at one).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from demo.tiny_model import fill_tensor, write_kohya_lora

ASSET_VERSION = "2"
EXPERT_NAMES = {"high": "lora_core_tiny_wan22_high_noise.safetensors",
                "low": "lora_core_tiny_wan22_low_noise.safetensors"}
VAE_NAME = "lora_core_tiny_wan_vae.safetensors"
LORA_NAMES = {"high": "tiny_wan_pair_high_noise.safetensors", "low": "tiny_wan_pair_low_noise.safetensors"}
TIMESTEP_RANGES = {"high": "875,1000", "low": "0,875"}   # musubi docs/wan.md, T2V boundary 0.875
WAN_DIM, WAN_FFN, WAN_DEPTH = 128, 256, 2
CORE_TEXT_DIM = 4096   # WanModel's fixed text_dim (UMT5-XXL's width)
WAN_TEXT = 768         # the tiny experts' text input: a CLIP-L's context width
# The `layers` entry of the experts' _quantization_metadata: a name no WanModel module has, so ComfyUI selects its
# mixed-precision ops (which load each Linear's weight in the file's shape) and quantises nothing.
QUANT_MARKER_LAYER = "lora_core_tiny.no_quantized_layer"
QUANT_METADATA = json.dumps({"format_version": "1.0", "layers": {QUANT_MARKER_LAYER: {"format": "float8_e4m3fn"}}})
VAE_DIM = 8


def tiny_wan_config() -> dict:
    """The unet_config ComfyUI's detection infers from a tiny Wan expert file."""
    return {"image_model": "wan2.1", "dim": WAN_DIM, "out_dim": 16, "num_heads": WAN_DIM // 128,
            "ffn_dim": WAN_FFN, "num_layers": WAN_DEPTH, "patch_size": (1, 2, 2), "freq_dim": 256,
            "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6, "in_dim": 16,
            "model_type": "t2v"}


def core_wan_layout() -> dict[str, tuple[int, ...]]:
    """Every key -> shape of the WanModel ComfyUI builds for the tiny config (with plain ops: text input 4096)."""
    from demo.host import import_comfy_core

    comfy = import_comfy_core()
    model_config = comfy.supported_models.WAN21_T2V(tiny_wan_config())
    model_config.set_inference_dtype(torch.float32, None)
    state = model_config.get_model({}, device="meta").diffusion_model.state_dict()
    return {key: tuple(value.shape) for key, value in state.items()}


def wan_layout() -> dict[str, tuple[int, ...]]:
    """Every key of a tiny Wan expert file (no prefix, as UNETLoader files have them) -> shape: ComfyUI's layout
    with the 768-wide text input."""
    layout = core_wan_layout()
    assert layout["text_embedding.0.weight"] == (WAN_DIM, CORE_TEXT_DIM)
    layout["text_embedding.0.weight"] = (WAN_DIM, WAN_TEXT)
    return layout


def wan_vae_config() -> dict:
    """comfy/sd.py's ddconfig for a Wan 2.1 VAE, at the tiny base width."""
    return {"dim": VAE_DIM, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
            "temperal_downsample": [False, True, True], "dropout": 0.0}


def wan_vae_layout() -> dict[str, tuple[int, ...]]:
    from demo.host import import_comfy_core

    import_comfy_core()
    import comfy.ldm.wan.vae

    with torch.device("meta"):
        vae = comfy.ldm.wan.vae.WanVAE(**wan_vae_config())
    return {key: tuple(value.shape) for key, value in vae.state_dict().items()}


def _fill(key: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if key.endswith(".gamma"):   # the Wan VAE's RMS_norm scale, (C, 1, 1[, 1])
        return torch.ones(shape)
    return fill_tensor(key, shape, generator)


def _save(path: Path, layout: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype, metadata: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {key: _fill(key, shape, generator).to(dtype).contiguous() for key, shape in sorted(layout.items())}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"lora_core.tiny": ASSET_VERSION, **metadata})
    tmp.replace(path)
    return path


def make_tiny_wan_experts(folder: Path | str, seed: int = 20) -> dict[str, Path]:
    """Write the high-noise and low-noise tiny experts (fp16) into `folder` (a models/diffusion_models folder)."""
    folder = Path(folder)
    layout = wan_layout()
    return {expert: _save(folder / EXPERT_NAMES[expert], layout, seed + i, torch.float16, {
        "modelspec.architecture": "wan2.2-t2v-a14b", "_quantization_metadata": QUANT_METADATA,
        "modelspec.title": f"LoRA Core tiny Wan 2.2 {expert}-noise expert (dim 128, 2 blocks, 768-wide text input "
                           f"for CLIP-L; random weights)"})
        for i, expert in enumerate(("high", "low"))}


def make_tiny_wan_vae(path: Path | str, seed: int = 22) -> Path:
    return _save(Path(path), wan_vae_layout(), seed, torch.float16, {
        "modelspec.title": "LoRA Core tiny Wan 2.1 VAE (base width 8; random weights)"})


def wan_block_targets(layout: dict[str, tuple[int, ...]] | None = None) -> dict[str, tuple[int, int]]:
    """Module path -> (out, in) of every Linear inside the blocks (musubi's WanAttentionBlock targets)."""
    layout = wan_layout() if layout is None else layout
    return {key[:-len(".weight")]: shape for key, shape in layout.items()
            if key.startswith("blocks.") and key.endswith(".weight") and len(shape) == 2}


def make_tiny_wan_loras(folder: Path | str, seed: int = 23) -> dict[str, Path]:
    """Write the musubi LoRA pair into `folder`; returns {"high": path, "low": path}."""
    folder = Path(folder)
    targets = {"lora_unet_" + path.replace(".", "_"): shape for path, shape in wan_block_targets().items()}
    common = {"ss_network_module": "networks.lora_wan", "ss_network_dim": "4", "ss_network_alpha": "2.0",
              "ss_base_model_version": "wan2.2_t2v_a14b", "modelspec.architecture": "wan2.2-t2v-a14b/lora",
              "modelspec.sai_model_spec": "1.0.0", "lora_core.tiny": ASSET_VERSION}
    return {expert: write_kohya_lora(
        folder / LORA_NAMES[expert], targets, rank=4, alpha=2.0, seed=seed + i, up_scale=0.2,
        metadata={**common, "ss_sd_model_name": EXPERT_NAMES[expert], "ss_output_name": LORA_NAMES[expert][:-12],
                  "modelspec.title": f"tiny Wan pair ({expert} noise)",
                  "modelspec.timestep_range": TIMESTEP_RANGES[expert]})
        for i, expert in enumerate(("high", "low"))}


def wan_paths(models_dir: Path | str) -> dict[str, Path]:
    models_dir = Path(models_dir)
    return {"wan_high": models_dir / "diffusion_models" / EXPERT_NAMES["high"],
            "wan_low": models_dir / "diffusion_models" / EXPERT_NAMES["low"],
            "wan_vae": models_dir / "vae" / VAE_NAME,
            "lora_wan_high": models_dir / "loras" / LORA_NAMES["high"],
            "lora_wan_low": models_dir / "loras" / LORA_NAMES["low"]}


def ensure_wan_models(models_dir: Path | str, force: bool = False) -> dict[str, Path]:
    """Create (or reuse, when the version stamp matches and every file exists) the tiny Wan assets."""
    models_dir = Path(models_dir)
    stamp = models_dir / ".lora_core_tiny_wan_version"
    paths = wan_paths(models_dir)
    if not force and stamp.exists() and stamp.read_text().strip() == ASSET_VERSION \
            and all(p.exists() for p in paths.values()):
        return paths
    make_tiny_wan_experts(paths["wan_high"].parent)
    make_tiny_wan_vae(paths["wan_vae"])
    make_tiny_wan_loras(paths["lora_wan_high"].parent)
    stamp.write_text(ASSET_VERSION + "\n")
    return paths
