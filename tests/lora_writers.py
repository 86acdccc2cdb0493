"""Independent writers of real LoRA file layouts, for tests (import: `from tests import lora_writers as lw`).

Each function returns a state dict exactly as the file would hold it ({key: tensor}); write it with
`save_safetensors` (`lycoris_network` returns LyCORIS's live wrapper instead, to compare against LyCORIS's own
forward and merge). Reference libraries are used where a real writer exists (LyCORIS for LyCORIS files, PEFT +
diffusers for diffusers files); kohya's layout and diffusers' old attention-processor layout are written by
our own small code here. Every factor is random and non-zero, so every module has a non-zero delta.

Tiny models keep tests fast: `tiny_unet()` (a diffusers UNet2DConditionModel, cross_attention_dim=768 like SD1)
and `tiny_text_encoder()` (a transformers CLIPTextModel, hidden 32, 2 layers). The helpers deep-copy the model
they adapt, so the caller's model is never modified.

Key examples (module names shortened):
  lycoris_state_dict(unet, "loha")      lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a, ... .alpha
  lycoris_state_dict(unet, "ia3")       lora_unet_..._to_q.weight, lora_unet_..._to_q.on_input
  peft_unet_state_dict(unet)            unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight
  peft_unet_state_dict(unet, layout="diffusers")   unet....attn1.to_q.lora.down.weight (proj_in keeps lora_A)
  peft_text_encoder_state_dict(te)      text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight
  peft_*(..., alpha_keys=True)          adds unet....attn1.to_q.alpha (the network_alphas convention)
  kohya_state_dict({"a.b": linear}, "lora_unet")   lora_unet_a_b.lora_down.weight, .lora_up.weight, .alpha
  processor_form_state_dict(unet)       unet....attn1.processor.to_q_lora.up.weight / .down.weight
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Iterable, Mapping, Optional

import torch

SD_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
LYCORIS_ALGOS = ("lora", "locon", "loha", "lokr", "glora", "ia3", "diag-oft", "boft", "full")


# --------------------------------------------------------------------------------------------- tiny models


def tiny_unet(seed: int = 0):
    """A small SD1-shaped diffusers UNet: 2 down/up blocks with cross-attention, context width 768."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=8,
    ).eval()


def tiny_text_encoder(seed: int = 0):
    """A small CLIPTextModel (HF CLIP naming: text_model.encoder.layers.N.self_attn.q_proj ...)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=32)
    return CLIPTextModel(config).eval()


# --------------------------------------------------------------------------------------------- LyCORIS


def lycoris_state_dict(module: torch.nn.Module, algo: str, prefix: str = "lora_unet", rank: int = 4,
                       alpha: float = 2.0, seed: int = 0, dora: bool = False,
                       target_module: Iterable[str] = ("Linear", "Conv2d"),
                       module_options: Optional[Mapping] = None, **kw) -> dict[str, torch.Tensor]:
    """Wrap every Linear/Conv2d of `module` with `lycoris.create_lycoris(algo=...)` and return the state dict
    LyCORIS saves (`net.save_weights` writes `net.state_dict()`), after randomising every adapter weight.

    Names are `<prefix>_<module path with . -> _>.<tensor>`: with prefix "lora_unet" on a diffusers UNet they
    are kohya's SD1 names; LyCORIS' own default prefix is "lycoris". `dora=True` sets dora_wd (DoRA);
    `weight_decompose=True` is accepted as an alias. Other kwargs go to create_lycoris (e.g. use_tucker=True,
    factor=4, decompose_both=True, rescaled=True, constraint=...). `module_options` are per-module
    constructor options create_lycoris does not forward (e.g. {"train_on_input": True} for (IA)^3); they go
    through LyCORIS' preset `module_algo_map`. Algos: lora/locon, loha, lokr, glora,
    ia3, diag-oft (alias "oft"), boft, full.
    """
    network = lycoris_network(copy.deepcopy(module), algo, prefix, rank, alpha, seed, dora, target_module,
                              module_options, **kw)
    state = {k: v.detach().clone() for k, v in network.state_dict().items()}
    network.restore()
    if not state:
        raise RuntimeError(f"LyCORIS created no modules for algo {algo!r} on {type(module).__name__}")
    return state


def lycoris_network(model: torch.nn.Module, algo: str, prefix: str = "lora_unet", rank: int = 4,
                    alpha: float = 2.0, seed: int = 0, dora: bool = False,
                    target_module: Iterable[str] = ("Linear", "Conv2d"),
                    module_options: Optional[Mapping] = None, **kw):
    """LyCORIS's own wrapper on `model` itself (not a copy), applied (`network.apply_to()`: the wrapped layers'
    forward runs LyCORIS at `network.set_multiplier(...)`) with every adapter weight randomised; arguments as
    in lycoris_state_dict. `network.restore()` unwraps `model`."""
    from lycoris import LycorisNetwork, create_lycoris

    algo = {"oft": "diag-oft"}.get(algo, algo)
    if kw.pop("weight_decompose", False):
        dora = True
    if dora:
        kw["dora_wd"] = True
    saved = _lycoris_class_state(LycorisNetwork)
    level = logging.getLogger("LyCORIS").level
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    try:
        # create_lycoris applies a named preset ("full" sets only enable_conv and the kohya-wrapper lists), so
        # the targets and prefix set here on the class are the ones the generic wrapper uses.
        algo_map = {cls: {"algo": algo, **module_options} for cls in target_module} if module_options else {}
        LycorisNetwork.apply_preset({"enable_conv": True, "target_module": list(target_module),
                                     "target_name": [], "module_algo_map": algo_map, "name_algo_map": {},
                                     "lora_prefix": prefix, "exclude_name": []})
        network = create_lycoris(model, 1.0, linear_dim=rank, linear_alpha=alpha, algo=algo,
                                 preset="full", warn_on_unmatched=False, **kw)
        network.apply_to()
        _randomise_lycoris(network, seed)
    finally:
        _restore_lycoris_class_state(LycorisNetwork, saved)
        logging.getLogger("LyCORIS").setLevel(level)
    return network


_LYCORIS_CLASS_ATTRS = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "LORA_PREFIX",
                        "MODULE_ALGO_MAP", "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")


def _lycoris_class_state(cls) -> dict:
    """LycorisNetwork keeps preset state on the class: save it so one test cannot leak into another."""
    return {name: copy.deepcopy(getattr(cls, name)) for name in _LYCORIS_CLASS_ATTRS if hasattr(cls, name)}


def _restore_lycoris_class_state(cls, saved: dict) -> None:
    for name, value in saved.items():
        setattr(cls, name, value)


@torch.no_grad()
def _randomise_lycoris(network: torch.nn.Module, seed: int) -> None:
    """LyCORIS zero-initialises one factor of each adapter (delta 0); give every parameter random values."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in network.named_parameters():
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        if name.endswith("dora_scale"):
            # a magnitude: keep it positive, near the original norm
            param.mul_(1.0 + 0.1 * noise.abs().to(param.dtype))
        elif name.endswith("rescale"):
            # OFT/BOFT's per-row scale, initialised to 1: keep it near 1
            param.copy_(1.0 + 0.1 * noise.to(param.dtype))
        else:
            param.copy_(0.1 * noise.to(param.dtype))


# --------------------------------------------------------------------------------------------- PEFT / diffusers


def peft_unet_state_dict(unet: torch.nn.Module, rank: int = 4, alpha: float = 8, seed: int = 0,
                         target_modules: Iterable[str] = SD_UNET_TARGETS, layout: str = "peft",
                         alpha_keys: bool = False, use_dora: bool = False) -> dict[str, torch.Tensor]:
    """The UNet part of a diffusers LoRA file: PEFT adapter on `unet`, keys prefixed `unet.`.

    layout "peft": `get_peft_model_state_dict` as `StableDiffusionPipeline.save_lora_weights` writes it
    (lora_A / lora_B). layout "diffusers": after `convert_state_dict_to_diffusers`, as diffusers' training
    scripts save it (`to_q.lora.down`, unmapped modules keep lora_A). `alpha_keys=True` adds
    `unet.<module>.alpha` = alpha (kohya-converted / network_alphas files).
    """
    return _peft_state_dict(unet, "unet", rank, alpha, seed, target_modules, layout, alpha_keys, use_dora)


def peft_text_encoder_state_dict(text_encoder: torch.nn.Module, rank: int = 4, alpha: float = 8, seed: int = 0,
                                 target_modules: Iterable[str] = CLIP_TARGETS, layout: str = "peft",
                                 alpha_keys: bool = False, prefix: str = "text_encoder",
                                 use_dora: bool = False) -> dict[str, torch.Tensor]:
    """The text-encoder part of a diffusers LoRA file (`text_encoder.text_model.encoder.layers.N...`).
    layout "diffusers" gives `q_proj.lora_linear_layer.down.weight`; see peft_unet_state_dict."""
    return _peft_state_dict(text_encoder, prefix, rank, alpha, seed, target_modules, layout, alpha_keys,
                            use_dora)


def peft_adapter_state_dict(model: torch.nn.Module, rank: int = 4, alpha: float = 8, seed: int = 0,
                            target_modules: Iterable[str] = SD_UNET_TARGETS, use_dora: bool = False):
    """Unprefixed `get_peft_model_state_dict` output plus the LoraConfig, for `save_lora_weights`."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=True,
                        use_dora=use_dora)
    adapted = inject_adapter_in_model(config, copy.deepcopy(model))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_" in name:  # lora_B starts at zero; lora_magnitude_vector stays as PEFT set it
                if "magnitude" in name:
                    param.mul_(1.0 + 0.1 * torch.rand(param.shape, generator=generator))
                else:
                    param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return get_peft_model_state_dict(adapted), config


def _peft_state_dict(model, prefix, rank, alpha, seed, target_modules, layout, alpha_keys, use_dora):
    state, _ = peft_adapter_state_dict(model, rank, alpha, seed, target_modules, use_dora)
    if layout == "diffusers":
        from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers

        state = convert_state_dict_to_diffusers(state)
    elif layout != "peft":
        raise ValueError(f"layout must be 'peft' or 'diffusers', got {layout!r}")
    result = {f"{prefix}.{key}": value.contiguous() for key, value in state.items()}
    if alpha_keys:
        for key in list(result):
            for down in (".lora_A.weight", ".lora.down.weight", ".lora_linear_layer.down.weight"):
                if key.endswith(down):
                    result[key[: -len(down)] + ".alpha"] = torch.tensor(float(alpha))
    return result


def save_diffusers_lora(directory: str, unet: Optional[torch.nn.Module] = None,
                        text_encoder: Optional[torch.nn.Module] = None, rank: int = 4, alpha: float = 8,
                        seed: int = 0, with_adapter_metadata: bool = True) -> str:
    """Write a LoRA file with diffusers' own `StableDiffusionPipeline.save_lora_weights`; returns its path
    (`<directory>/pytorch_lora_weights.safetensors`). With adapter metadata the header carries the
    LoraConfig (`lora_adapter_metadata`: lora_alpha, r, ...) instead of `.alpha` keys."""
    from diffusers import StableDiffusionPipeline

    kwargs = {}
    if unet is not None:
        state, config = peft_adapter_state_dict(unet, rank, alpha, seed)
        kwargs["unet_lora_layers"] = state
        if with_adapter_metadata:
            kwargs["unet_lora_adapter_metadata"] = config.to_dict()
    if text_encoder is not None:
        state, config = peft_adapter_state_dict(text_encoder, rank, alpha, seed + 1, CLIP_TARGETS)
        kwargs["text_encoder_lora_layers"] = state
        if with_adapter_metadata:
            kwargs["text_encoder_lora_adapter_metadata"] = config.to_dict()
    StableDiffusionPipeline.save_lora_weights(directory, safe_serialization=True, **kwargs)
    return os.path.join(directory, "pytorch_lora_weights.safetensors")


def processor_form_state_dict(unet: torch.nn.Module, rank: int = 4, seed: int = 0,
                              prefix: str = "unet") -> dict[str, torch.Tensor]:
    """diffusers <= 0.16 attention-processor LoRA (our own writer): for every attention module
    `<path>.processor.to_{q,k,v,out}_lora.{up,down}.weight`, no alpha (scale 1)."""
    from diffusers.models.attention_processor import Attention

    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for path, module in unet.named_modules():
        if not isinstance(module, Attention):
            continue
        for proj, linear in (("to_q", module.to_q), ("to_k", module.to_k), ("to_v", module.to_v),
                             ("to_out", module.to_out[0])):
            base = f"{prefix}.{path}.processor.{proj}_lora"
            state[f"{base}.down.weight"] = 0.1 * torch.randn(rank, linear.in_features, generator=generator)
            state[f"{base}.up.weight"] = 0.1 * torch.randn(linear.out_features, rank, generator=generator)
    return state


# --------------------------------------------------------------------------------------------- kohya


def kohya_state_dict(named_linear_modules: Mapping[str, torch.nn.Module], prefix: str = "lora_unet",
                     rank: int = 4, alpha: Optional[float] = 2.0, seed: int = 0,
                     tucker: bool = False) -> dict[str, torch.Tensor]:
    """kohya sd-scripts naming, written by us: `<prefix>_<path with . -> _>.lora_down.weight`,
    `.lora_up.weight`, `.alpha` (0-dim; omitted when alpha is None, like old files).

    Linear: down (rank, in), up (out, rank). Conv (LoCon): down (rank, in, k, k), up (out, rank, 1, 1); with
    `tucker=True` a k>1 conv gets LyCORIS' Tucker layout: down (rank, in, 1, 1), mid (rank, rank, k, k),
    up (out, rank, 1, 1).
    """
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return 0.1 * torch.randn(*shape, generator=generator)

    state: dict[str, torch.Tensor] = {}
    for path, module in named_linear_modules.items():
        name = f"{prefix}_{path}".replace(".", "_")
        if isinstance(module, torch.nn.Linear):
            state[f"{name}.lora_down.weight"] = rand(rank, module.in_features)
            state[f"{name}.lora_up.weight"] = rand(module.out_features, rank)
        elif isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            if tucker and (kh, kw) != (1, 1):
                state[f"{name}.lora_down.weight"] = rand(rank, module.in_channels, 1, 1)
                state[f"{name}.lora_mid.weight"] = rand(rank, rank, kh, kw)
            else:
                state[f"{name}.lora_down.weight"] = rand(rank, module.in_channels, kh, kw)
            state[f"{name}.lora_up.weight"] = rand(module.out_channels, rank, 1, 1)
        else:
            raise TypeError(f"{path}: kohya LoRA targets Linear or Conv2d, not {type(module).__name__}")
        if alpha is not None:
            state[f"{name}.alpha"] = torch.tensor(float(alpha))
    return state


def unet_targets(unet: torch.nn.Module, suffixes: Iterable[str] = SD_UNET_TARGETS,
                 convs: bool = False) -> dict[str, torch.nn.Module]:
    """{module path: module} of a UNet's Linear layers whose path ends with one of `suffixes`
    (plus every Conv2d when `convs`), for kohya_state_dict."""
    suffixes = tuple(suffixes)
    found = {}
    for path, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and path.endswith(suffixes):
            found[path] = module
        elif convs and isinstance(module, torch.nn.Conv2d):
            found[path] = module
    return found


# --------------------------------------------------------------------------------------------- files


def save_safetensors(sd: Mapping[str, torch.Tensor], path, metadata: Optional[Mapping[str, str]] = None) -> str:
    """Write with safetensors directly (independent of lora_core.io.save_lora_file); returns the path."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in sd.items()}, os.fspath(path),
              metadata=dict(metadata) if metadata else None)
    return os.fspath(path)
