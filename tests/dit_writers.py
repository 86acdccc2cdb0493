"""Independent writers of DiT LoRA files, for tests (import: `from tests import dit_writers as dw`).

Real writers are used where they are installable: PEFT on diffusers' own `FluxTransformer2DModel` (what
diffusers' `save_lora_weights`, ai-toolkit, SimpleTuner and diffusion-pipe's Flux save), LyCORIS's own wrapper.
Trainers that are not installable here get a small writer that follows their documented naming; each cites the
rule's source (paths and line numbers of the snapshots in /work/shared/reference/dit-families.md):

* kohya sd-scripts `networks/lora_flux.py` (LoRANetwork: `LORA_PREFIX_FLUX = "lora_unet"`,
  `LORA_PREFIX_TEXT_ENCODER_CLIP = "lora_te1"`, `LORA_PREFIX_TEXT_ENCODER_T5 = "lora_te3"`; targets every Linear of
  `DoubleStreamBlock` / `SingleStreamBlock`; `<prefix>_<module path with . -> _>.lora_down/lora_up.weight` +
  `.alpha`; `split_qkv` LoRAs are re-fused to one `qkv` module at save, lines 1090-1135). musubi-tuner's
  `networks/lora_flux.py` (Kontext) writes the same names.
* ComfyUI native (its LoRA save / trainer; ai-toolkit and diffusion-pipe Chroma): `diffusion_model.<path>` with
  lora_up/lora_down (or lora_A/lora_B) + alpha; Black Forest Labs' own files are bare `<path>...lora_A/lora_B`.
* OneTrainer: `lora_transformer_<diffusers path with . -> _>.lora_down/lora_up.weight` + `.alpha`.
* XLabs x-flux (`src/flux/modules/layers.py` 177-183, 458-462): `double_blocks.N.processor.qkv_lora1` (image qkv),
  `qkv_lora2` (text qkv), `proj_lora1` / `proj_lora2`; `single_blocks.N.processor.qkv_lora` (3h rows of linear1),
  `proj_lora` (linear2); each `LoRALinearLayer` saves `down.weight` (rank, in) and `up.weight` (out, rank), no alpha
  (scale 1). Its example config trains `single_blocks: "1,2,3,4"`: partial files are normal.
* lightx2v-style full diffs: `diffusion_model.<path>.diff` (+ `.diff_b` for the bias).

Every factor is random and non-zero, so every module has a non-zero delta.
"""
from __future__ import annotations

import copy
from typing import Iterable, Mapping, Optional

import torch

FLUX_DIFFUSERS_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                          "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                          "proj_mlp", "proj_out", "norm.linear", "norm1.linear", "norm1_context.linear",
                          "x_embedder", "context_embedder")


def _rand(generator, *shape):
    return 0.1 * torch.randn(*shape, generator=generator)


def linear_layers(module: torch.nn.Module, include=None, exclude=()) -> dict[str, torch.nn.Module]:
    """{path: Linear} of a module (ComfyUI's ops Linear classes subclass torch.nn.Linear)."""
    found = {}
    for path, sub in module.named_modules():
        if not isinstance(sub, torch.nn.Linear):
            continue
        if include is not None and not any(part in path for part in include):
            continue
        if any(part in path for part in exclude):
            continue
        found[path] = sub
    return found


def lora_pairs(layers: Mapping[str, torch.nn.Module], name_of, rank: int = 4, alpha: Optional[float] = 2.0,
               seed: int = 0, up: str = ".lora_up.weight", down: str = ".lora_down.weight",
               alpha_suffix: str = ".alpha", rows: Optional[Mapping[str, int]] = None) -> dict[str, torch.Tensor]:
    """One low-rank pair per layer, named `name_of(path)` + the suffixes. `rows` overrides a layer's output rows
    (e.g. XLabs' single-block qkv_lora covers the first 3h rows of linear1)."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for path, layer in layers.items():
        name = name_of(path)
        out_rows = (rows or {}).get(path, layer.out_features)
        state[name + down] = _rand(generator, rank, layer.in_features)
        state[name + up] = _rand(generator, out_rows, rank)
        if alpha is not None and alpha_suffix:
            state[name + alpha_suffix] = torch.tensor(float(alpha))
    return state


# --------------------------------------------------------------------------------------------- Flux, BFL names

def flux_blocks(model) -> dict[str, torch.nn.Module]:
    """The Linear layers kohya's Flux LoRA trains: every Linear inside the double and single blocks."""
    return linear_layers(model.model.diffusion_model, include=("double_blocks.", "single_blocks."))


def kohya_flux(model, rank: int = 4, alpha: float = 2.0, seed: int = 0, layers=None) -> dict:
    """kohya sd-scripts / musubi-tuner Flux naming: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`."""
    layers = flux_blocks(model) if layers is None else layers
    return lora_pairs(layers, lambda p: "lora_unet_" + p.replace(".", "_"), rank, alpha, seed)


def comfy_native(model, rank: int = 4, alpha: float = 2.0, seed: int = 0, prefix: str = "diffusion_model.",
                 peft_suffixes: bool = False, layers=None) -> dict:
    """ComfyUI-native names (`diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight`); bare with
    prefix "" (BFL); lora_A/lora_B with `peft_suffixes`."""
    layers = linear_layers(model.model.diffusion_model) if layers is None else layers
    up, down = (".lora_B.weight", ".lora_A.weight") if peft_suffixes else (".lora_up.weight", ".lora_down.weight")
    return lora_pairs(layers, lambda p: prefix + p, rank, alpha, seed, up, down)


def full_diffs(model, seed: int = 0, prefix: str = "diffusion_model.", with_bias: bool = True, layers=None) -> dict:
    """Full-weight diffs: `<prefix><path>.diff` (+ `.diff_b`)."""
    generator = torch.Generator().manual_seed(seed)
    layers = linear_layers(model.model.diffusion_model) if layers is None else layers
    state = {}
    for path, layer in layers.items():
        state[f"{prefix}{path}.diff"] = 0.01 * torch.randn(layer.weight.shape, generator=generator)
        if with_bias and layer.bias is not None:
            state[f"{prefix}{path}.diff_b"] = 0.01 * torch.randn(layer.bias.shape, generator=generator)
    return state


def xlabs_flux(model, rank: int = 4, seed: int = 0, double=None, single=None) -> dict:
    """XLabs x-flux LoRA processors (see the module docstring) for the given double / single block indices
    (default: all)."""
    net = model.model.diffusion_model
    hidden = net.hidden_size
    double = range(len(net.double_blocks)) if double is None else double
    single = range(len(net.single_blocks)) if single is None else single
    layers, names, rows = {}, {}, {}
    for i in double:
        block = net.double_blocks[i]
        for attr, layer in (("qkv_lora1", block.img_attn.qkv), ("qkv_lora2", block.txt_attn.qkv),
                            ("proj_lora1", block.img_attn.proj), ("proj_lora2", block.txt_attn.proj)):
            path = f"double_blocks.{i}.processor.{attr}"
            layers[path], names[path] = layer, path
    for i in single:
        block = net.single_blocks[i]
        for attr, layer in (("qkv_lora", block.linear1), ("proj_lora", block.linear2)):
            path = f"single_blocks.{i}.processor.{attr}"
            layers[path], names[path] = layer, path
            if attr == "qkv_lora":
                rows[path] = 3 * hidden
    return lora_pairs(layers, lambda p: names[p], rank, None, seed, ".up.weight", ".down.weight", "", rows)


def xlabs_to_comfy(state: Mapping[str, torch.Tensor]) -> dict:
    """The same tensors under the names ComfyUI 0.3.75 maps (its own conversion of complete XLabs files,
    comfy/lora_convert.py): qkv_lora1/2 -> img/txt_attn.qkv, proj_lora1/2 -> img/txt_attn.proj, the single-block
    qkv_lora -> `linear1_qkv` (rows 0..3h of linear1), proj_lora -> linear2; lora_up/lora_down suffixes."""
    renames = {"processor.qkv_lora1": "img_attn.qkv", "processor.qkv_lora2": "txt_attn.qkv",
               "processor.proj_lora1": "img_attn.proj", "processor.proj_lora2": "txt_attn.proj",
               "processor.qkv_lora": "linear1_qkv", "processor.proj_lora": "linear2"}
    out = {}
    for key, value in state.items():
        new = key
        for old, rep in renames.items():
            new = new.replace(old + ".", rep + ".")
        new = new.replace(".down.weight", ".lora_down.weight").replace(".up.weight", ".lora_up.weight")
        out["diffusion_model." + new] = value
    return out


# --------------------------------------------------------------------------------------------- Flux, diffusers

def diffusers_flux_twin(hidden: int = 64, heads: int = 2, depth: int = 2, depth_single: int = 3,
                        guidance: bool = True, context: int = 32, vec: int = 32, seed: int = 0):
    """diffusers' FluxTransformer2DModel with the shapes of tests.tiny_models.comfy_flux() (weights differ)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    head = hidden // heads
    return FluxTransformer2DModel(patch_size=1, in_channels=64, out_channels=64, num_layers=depth,
                                  num_single_layers=depth_single, attention_head_dim=head, num_attention_heads=heads,
                                  joint_attention_dim=context, pooled_projection_dim=vec, guidance_embeds=guidance,
                                  axes_dims_rope=(head // 4, head * 3 // 8, head * 3 // 8)).eval()


def peft_flux(transformer, rank: int = 4, alpha: float = 8, seed: int = 0,
              targets: Iterable[str] = FLUX_DIFFUSERS_TARGETS, use_dora: bool = False):
    """(state dict with `transformer.` keys as `FluxPipeline.save_lora_weights` writes it, LoraConfig): real PEFT
    on diffusers' own class (the layout ai-toolkit, SimpleTuner and diffusion-pipe write for Flux)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True,
                        use_dora=use_dora)
    adapted = inject_adapter_in_model(config, copy.deepcopy(transformer))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_" in name:
                if "magnitude" in name:
                    param.mul_(1.0 + 0.1 * torch.rand(param.shape, generator=generator))
                else:
                    param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    state = get_peft_model_state_dict(adapted)
    return {f"transformer.{k}": v.contiguous() for k, v in state.items()}, config


def onetrainer_flux(transformer, rank: int = 4, alpha: float = 2.0, seed: int = 0,
                    targets: Iterable[str] = FLUX_DIFFUSERS_TARGETS) -> dict:
    """OneTrainer's Flux names: `lora_transformer_<diffusers path _>` with kohya suffixes and `.alpha`."""
    layers = {p: m for p, m in linear_layers(transformer).items() if p.endswith(tuple(targets))}
    return lora_pairs(layers, lambda p: "lora_transformer_" + p.replace(".", "_"), rank, alpha, seed)


def rename_prefix(state: Mapping[str, torch.Tensor], old: str, new: str) -> dict:
    return {(new + k[len(old):] if k.startswith(old) else k): v for k, v in state.items()}


# --------------------------------------------------------------------------------------------- text encoders

def kohya_text_encoders(clip, prefixes: Mapping[str, str], rank: int = 4, alpha: float = 2.0, seed: int = 0) -> dict:
    """kohya names for a ComfyUI CLIP's encoders: {comfy attribute: kohya prefix}, e.g. Flux
    {"clip_l": "lora_te1", "t5xxl": "lora_te3"} (sd-scripts networks/lora_flux.py). CLIP: attention + MLP
    linears of the encoder layers; T5: SelfAttention q/k/v/o and DenseReluDense wi_0/wi_1/wo."""
    state = {}
    for i, (attribute, prefix) in enumerate(prefixes.items()):
        encoder = getattr(clip.cond_stage_model, attribute).transformer
        layers = linear_layers(encoder, include=(".encoder.layers.", "encoder.block."))
        state.update(lora_pairs(layers, lambda p, prefix=prefix: f"{prefix}_" + p.replace(".", "_"), rank, alpha,
                                seed + 11 * i))
    return state
