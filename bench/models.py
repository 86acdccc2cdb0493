"""Full-size SD1.5 / SDXL models with random weights, built cheaply, and kohya LoRAs for them.

* ComfyUI models come from `comfy.supported_models.SD15/SDXL(unet_config).get_model(...)`: ComfyUI picks
  `comfy.ops.disable_weight_init` layers, so construction allocates but never initialises. CLIP comes from
  `comfy.sd.CLIP` with ComfyUI's own SD1/SDXL clip classes (same ops, no init).
* diffusers / transformers models are built on the `meta` device and materialised with `to_empty`.
* Every weight is then filled from one random pool (a tiled copy and a scale: ~memcpy speed instead of
  randn over 1-3 G values). Values repeat with the pool's period, which matters neither for timing nor for
  the error measurement (each error is measured against the same model's own original weights).
* kohya LoRAs are views into one shared fp16 random pool, so 8 stacked rank-128 SDXL LoRAs cost no RAM.
  Target modules follow kohya sd-scripts: every Linear / 1x1 Conv2d inside a diffusers Transformer2DModel,
  and the Linear layers of CLIPAttention / CLIPMLP; names are `lora_unet_<diffusers path>`,
  `lora_te_<hf path>` (SD1.5) or `lora_te1_` / `lora_te2_` (SDXL).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

SD15_UNET = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
             'legacy': False, 'adm_in_channels': None, 'in_channels': 4, 'model_channels': 320,
             'num_res_blocks': [2, 2, 2, 2], 'transformer_depth': [1, 1, 1, 1, 1, 1, 0, 0],
             'channel_mult': [1, 2, 4, 4], 'transformer_depth_middle': 1, 'use_linear_in_transformer': False,
             'context_dim': 768, 'num_heads': 8, 'transformer_depth_output': [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             'use_temporal_attention': False, 'use_temporal_resblock': False}
SDXL_UNET = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
             'legacy': False, 'num_classes': 'sequential', 'adm_in_channels': 2816, 'in_channels': 4,
             'model_channels': 320, 'num_res_blocks': [2, 2, 2], 'transformer_depth': [0, 0, 2, 2, 10, 10],
             'channel_mult': [1, 2, 4], 'transformer_depth_middle': 10, 'use_linear_in_transformer': True,
             'context_dim': 2048, 'num_head_channels': 64, 'transformer_depth_output': [0, 0, 0, 2, 2, 2, 10, 10, 10],
             'use_temporal_attention': False, 'use_temporal_resblock': False}

DIFFUSERS_UNET = {
    "sd15": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
    "sdxl": dict(sample_size=128, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, hidden_act="gelu")
# kohya file prefix -> (component of our canonical naming, transformers config)
TEXT_ENCODERS = {"sd15": [("lora_te", CLIP_L)], "sdxl": [("lora_te1", CLIP_L), ("lora_te2", CLIP_G)]}

_POOL_SIZE = 1 << 22


def _pool(dtype: torch.dtype, device, seed: int, size: int = _POOL_SIZE) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(size, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def _fill(out: torch.Tensor, name: str, index: int, pool: torch.Tensor) -> None:
    """The values fill_random gives parameter number `index` (named `name`), written into `out` (its shape)."""
    flat = out.view(-1)
    if out.ndim < 2 and "norm" in name and name.endswith("weight"):
        flat.fill_(1.0)
        return
    start = (index * 7919) % (pool.numel() // 2)
    for offset in range(0, flat.numel(), pool.numel() - start):
        n = min(flat.numel() - offset, pool.numel() - start)
        flat[offset:offset + n].copy_(pool[start:start + n])
    flat.mul_(1.0 / math.sqrt(out[0].numel()) if out.ndim >= 2 else 0.02)


@torch.no_grad()
def fill_random(module: torch.nn.Module, seed: int = 0) -> None:
    """Weights ~ N(0, 1/fan_in) (norm weights ~ 1, biases small), tiled from one pool; no init pass."""
    pools: dict = {}
    for index, (name, p) in enumerate(module.named_parameters()):
        key = (p.dtype, p.device)
        if key not in pools:
            pools[key] = _pool(p.dtype, p.device, seed)
        _fill(p.data, name, index, pools[key])
    for name, buffer in module.named_buffers():
        if name.endswith("position_ids"):  # transformers CLIP's arange buffer (left empty by to_empty)
            buffer.copy_(torch.arange(buffer.shape[-1], device=buffer.device).expand_as(buffer))


class Originals:
    """The values fill_random(module, seed) gave each parameter, regenerated on demand (one tensor at a time):
    an exact restore check over every element of every patched weight without keeping a copy of the model."""

    def __init__(self, module: torch.nn.Module, seed: int):
        self.params = {name: (index, p) for index, (name, p) in enumerate(module.named_parameters())}
        self.seed, self.pools = seed, {}

    @torch.no_grad()
    def __getitem__(self, name: str) -> torch.Tensor:
        index, p = self.params[name]
        key = (p.dtype, p.device)
        if key not in self.pools:
            self.pools[key] = _pool(p.dtype, p.device, self.seed)
        out = torch.empty_like(p.data)
        _fill(out, name, index, self.pools[key])
        return out


# ----------------------------------------------------------------------------------------- ComfyUI

def comfy_models(arch: str, dtype: torch.dtype, device: torch.device):
    """(ModelPatcher, comfy.sd.CLIP) for full-size SD1.5 or SDXL, random weights, on `device`."""
    from tests.comfy_host import import_comfy

    comfy = import_comfy()
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.supported_models_base as smb

    config_class, unet_config = (comfy.supported_models.SD15, SD15_UNET) if arch == "sd15" else \
        (comfy.supported_models.SDXL, SDXL_UNET)
    model_config = config_class(dict(unet_config, dtype=dtype))
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device=device)
    model.to(dtype)
    fill_random(model, seed=1)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)

    if arch == "sd15":
        import comfy.sd1_clip as clip_module
        target = smb.ClipTarget(clip_module.SD1Tokenizer, clip_module.SD1ClipModel)
    else:
        import comfy.sdxl_clip as clip_module
        target = smb.ClipTarget(clip_module.SDXLTokenizer, clip_module.SDXLClipModel)
    options = {"dtype": dtype, "load_device": device, "offload_device": device, "initial_device": device}
    clip = comfy.sd.CLIP(target=target, model_options=options)
    clip.cond_stage_model.to(device=device, dtype=dtype)
    fill_random(clip.cond_stage_model, seed=2)
    # comfy.sd.CLIP loads its own patcher at creation (its modules are marked comfy_patched_weights), so a
    # LoRA clone patched next would skip them. ComfyUI unloads that patcher before loading a clone with other
    # patches; do the same, or core's first CLIP patch silently does nothing.
    comfy.model_management.unload_all_models()
    clip.patcher.unpatch_model()
    return patcher, clip


# ------------------------------------------------------------------------------ diffusers / transformers

def diffusers_models(arch: str, dtype: torch.dtype, device: torch.device) -> dict:
    """{"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel[, "text_encoder_2": ...WithProjection]}."""
    modules = _meta_diffusers(arch)
    for module in modules.values():
        module.to_empty(device=device)
        module.to(dtype)
        fill_random(module, seed=3)
        module.eval().requires_grad_(False)
    return modules


def _meta_diffusers(arch: str) -> dict:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        modules = {"unet": UNet2DConditionModel(**DIFFUSERS_UNET[arch])}
        for index, (_, config) in enumerate(TEXT_ENCODERS[arch]):
            cls = CLIPTextModel if index == 0 else CLIPTextModelWithProjection
            modules["text_encoder" if index == 0 else "text_encoder_2"] = cls(CLIPTextConfig(**config))
    return modules


# ------------------------------------------------------------------------------------------ LoRAs

@dataclass
class Target:
    kohya: str          # module name in the file, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    component: str      # diffusers pipeline attribute: unet / text_encoder / text_encoder_2
    path: str           # module path inside that component
    out_features: int
    in_features: int
    conv: bool          # 1x1 Conv2d (SD1.5 proj_in/proj_out)


@dataclass
class Lora:
    name: str
    rank: int
    tensors: dict       # kohya state dict (views into a shared pool)
    alphas: dict = field(default_factory=dict)   # kohya module name -> alpha


def kohya_targets(arch: str) -> list[Target]:
    """kohya sd-scripts' default LoRA targets, enumerated on meta-device diffusers/transformers modules."""
    modules = _meta_diffusers(arch)
    targets = []
    for name, module in modules["unet"].named_modules():
        if type(module).__name__ != "Transformer2DModel":
            continue
        for child_name, child in module.named_modules():
            conv = isinstance(child, torch.nn.Conv2d) and child.kernel_size == (1, 1)
            if isinstance(child, torch.nn.Linear) or conv:
                path = f"{name}.{child_name}"
                out_f, in_f = child.weight.shape[:2]
                targets.append(Target("lora_unet_" + path.replace(".", "_"), "unet", path, out_f, in_f, conv))
    prefixes = TEXT_ENCODERS[arch]
    for (prefix, _), component in zip(prefixes, ("text_encoder", "text_encoder_2")):
        for name, module in modules[component].named_modules():
            if type(module).__name__ not in ("CLIPAttention", "CLIPMLP"):
                continue
            for child_name, child in module.named_children():
                if isinstance(child, torch.nn.Linear):
                    path = f"{name}.{child_name}"
                    out_f, in_f = child.weight.shape
                    targets.append(Target(f"{prefix}_" + path.replace(".", "_"), component, path, out_f, in_f, False))
    return targets


class LoraFactory:
    """Builds kohya LoRAs (fp16 up/down as views into one random pool; alpha sets a realistic magnitude)."""

    def __init__(self, targets: list[Target], pool_values: int = 1 << 25, seed: int = 7):
        self.targets = targets
        self.pool = _pool(torch.float16, "cpu", seed, pool_values)

    def make(self, index: int, rank: int) -> Lora:
        tensors, alphas = {}, {}
        span = self.pool.numel()
        cursor = (index * 104_729 * 97) % span
        for t in self.targets:
            down_shape = (rank, t.in_features, 1, 1) if t.conv else (rank, t.in_features)
            up_shape = (t.out_features, rank, 1, 1) if t.conv else (t.out_features, rank)
            views = []
            for shape in (down_shape, up_shape):
                n = math.prod(shape)
                if cursor + n > span:
                    cursor = (cursor + 977) % (span - n)
                views.append(self.pool[cursor:cursor + n].view(shape))
                cursor += n
            # up, down ~ N(0, 1): alpha/rank * up @ down has entries ~ alpha/sqrt(rank); aim at ~5% of |W| for
            # a 768-wide layer. One alpha for every module, like real kohya files: diffusers mis-assigns
            # per-module alphas that differ (its alpha pattern gives mid_block another module's alpha).
            alpha = 0.05 * math.sqrt(rank) / math.sqrt(768)
            tensors[f"{t.kohya}.lora_down.weight"] = views[0]
            tensors[f"{t.kohya}.lora_up.weight"] = views[1]
            tensors[f"{t.kohya}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
            alphas[t.kohya] = alpha
        return Lora(f"lora{index}_r{rank}", rank, tensors, alphas)


def reference_delta(lora: Lora, target: Target) -> torch.Tensor:
    """fp64 ΔW = alpha/rank · up @ down of one module, flattened to (out, in)."""
    up = lora.tensors[f"{target.kohya}.lora_up.weight"].double().reshape(target.out_features, -1)
    down = lora.tensors[f"{target.kohya}.lora_down.weight"].double().reshape(lora.rank, -1)
    return (up @ down) * (lora.alphas[target.kohya] / lora.rank)
