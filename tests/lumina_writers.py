"""Independent writers of Z-Image and Lumina Image 2.0 LoRA files, for tests (import: `from tests import
lumina_writers as zw`).

Real writers are used where they are installable: PEFT on diffusers' own `ZImageTransformer2DModel` /
`Lumina2Transformer2DModel` (what `ZImagePipeline` / `Lumina2Pipeline.save_lora_weights` save, and what ai-toolkit,
diffusion-pipe and DiffSynth-Studio train), LyCORIS's own wrapper. The others follow their documented naming;
every rule cites its source (snapshots in /work/shared/reference/dit-families.md §5):

* ComfyUI native (its trainer #10927; `comfy/lora.py::model_lora_keys_unet`'s generic `diffusion_model.<path>`):
  `lora_up` / `lora_down` + `.alpha` on every Linear of NextDiT (tests.dit_writers.comfy_native); diffusion-pipe
  (`models/base.py` ComfyPipeline, `models/lumina_2.py`): PEFT `lora_A` / `lora_B` under `diffusion_model.<path>`,
  no alpha.
* kohya sd-scripts Lumina (`networks/lora_lumina.py`: `LUMINA_TARGET_REPLACE_MODULE = ["JointTransformerBlock",
  "FinalLayer"]`, `LORA_PREFIX_LUMINA = "lora_unet"`, name = prefix + module path with `_`, `lora_down` / `lora_up`
  + `.alpha`; qkv fused): `lora_unet_layers_0_attention_qkv`; its Gemma-2 encoder LoRA
  (`TEXT_ENCODER_TARGET_REPLACE_MODULE` = Gemma2Attention / Gemma2MLP, `LORA_PREFIX_TEXT_ENCODER = "lora_te"`, HF
  `Gemma2Model` paths without `model.`): `lora_te_layers_0_self_attn_q_proj`.
* musubi-tuner Z-Image (`networks/lora_zimage.py`: `ZIMAGE_TARGET_REPLACE_MODULES = ["ZImageTransformerBlock"]`,
  prefix `lora_unet`, default `exclude_patterns` `.*(_modulation|_refiner).*`; its model keeps diffusers' module
  names, `networks/convert_z_image_lora_to_comfy.py` renames `attention_to_out_0` -> `attention_out`):
  `lora_unet_layers_0_attention_to_q.lora_down.weight` + `.alpha`.
* ai-toolkit Z-Image (`extensions_built_in/diffusion_models/z_image/z_image.py`: PEFT on the diffusers transformer,
  `transformer.` -> `diffusion_model.` before saving, block list `["layers"]`): `diffusion_model.layers.0.attention.
  to_q.lora_A.weight`, no alpha.
* diffusers / PEFT: `transformer.<diffusers path>.lora_A.weight`; DiffSynth-Studio: bare `<diffusers path>.
  lora_A.default.weight` (PEFT's adapter name kept, alpha = rank: tests.qwen_image_writers' rule).
* Lumina 2 in diffusers naming (ComfyUI issue #7502's file): `transformer.layers.N.attn.to_k`, `feed_forward.
  linear_1`, `norm1.linear`.
* LyCORIS (`lycoris_` + the diffusers module path with `_`; ComfyUI's Lumina2 branch maps it for Z-Image).
* full diffs: `diffusion_model.<path>.diff` + `.diff_b`.
* text encoders: ComfyUI's generic `text_encoders.qwen3_4b.transformer.model.layers.N...` /
  `text_encoders.gemma2_2b.transformer...` (the only forms core maps).

`to_comfy_lumina2` / `fuse_qkv` give the truth for files core cannot read (or misreads): the same tensors under
ComfyUI's names, split q / k / v LoRAs fused into one exact `attention.qkv` LoRA (down stacked with each part's
alpha / rank folded in, up block-diagonal: musubi's convert_z_image_lora_to_comfy.py method), in the GQA row order
ComfyUI's NextDiT stores (q rows, then k, then v).
"""
from __future__ import annotations

import copy
import re
from typing import Iterable, Mapping

import torch

from tests import dit_writers as dw

# every Linear of ZImageTransformer2DModel but t_embedder's (diffusers fixes its middle width at 1024, ComfyUI's is
# min(dim, 1024): the tiny twins differ there)
Z_IMAGE_PEFT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3", "adaLN_modulation.0", "x_embedder.2-1",
                        "linear", "adaLN_modulation.1", "cap_embedder.1")
LUMINA2_PEFT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "linear_1", "linear_2", "linear_3", "norm1.linear",
                        "x_embedder", "caption_embedder.1")
KOHYA_METADATA = {  # kohya sd-scripts library/lumina_util.py + sai_model_spec.py; musubi architectures.py
    "lumina2": {"ss_base_model_version": "lumina2", "modelspec.architecture": "lumina-2/lora",
                "ss_network_module": "networks.lora_lumina"},
    "z_image": {"ss_base_model_version": "z_image", "modelspec.architecture": "Z-Image/lora",
                "ss_network_module": "networks.lora_zimage"},
}


def nextdit(model) -> torch.nn.Module:
    return model.model.diffusion_model


def comfy_native(model, seed: int = 0, **kw) -> dict:
    return dw.comfy_native(model, seed=seed, **kw)


def diffusion_pipe(model, rank: int = 4, seed: int = 0) -> dict:
    """PEFT on ComfyUI-named blocks (JointTransformerBlock's Linears), `diffusion_model.` + lora_A / lora_B."""
    layers = dw.linear_layers(nextdit(model), include=("layers.", "noise_refiner.", "context_refiner."))
    return dw.lora_pairs(layers, lambda p: "diffusion_model." + p, rank, None, seed, ".lora_B.weight",
                         ".lora_A.weight", "")


def kohya_lumina(model, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> dict:
    """kohya sd-scripts Lumina: every Linear of the blocks (refiners included) and of the final layer."""
    layers = dw.linear_layers(nextdit(model), include=("layers.", "noise_refiner.", "context_refiner.", "final_layer."))
    return dw.lora_pairs(layers, lambda p: "lora_unet_" + p.replace(".", "_"), rank, alpha, seed)


def kohya_gemma(clip, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> dict:
    """kohya Lumina's Gemma-2 LoRA: attention and MLP Linears, `lora_te_<Gemma2Model path _>`."""
    encoder = clip.cond_stage_model.gemma2_2b.transformer
    layers = dw.linear_layers(encoder, include=(".self_attn.", ".mlp."))
    return dw.lora_pairs(layers, lambda p: "lora_te_" + p[len("model."):].replace(".", "_"), rank, alpha, seed)


def comfy_text_encoder(clip, attribute: str, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> dict:
    """ComfyUI's generic `text_encoders.<attribute>.transformer.<path>` on every Linear of the encoder's layers."""
    encoder = getattr(clip.cond_stage_model, attribute).transformer
    layers = dw.linear_layers(encoder, include=("model.layers.",))
    return dw.lora_pairs(layers, lambda p: f"text_encoders.{attribute}.transformer." + p, rank, alpha, seed)


def peft_state(transformer, rank: int = 4, alpha: float = 4, seed: int = 0, targets: Iterable[str] = (),
               adapter_names: bool = False) -> dict:
    """Real PEFT on a diffusers transformer, factors randomised, keys without prefix (see
    tests.qwen_image_writers.peft_state)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    # PEFT matches a target as a name suffix: resolve the suffixes to the Linears they name (`adaLN_modulation.0` is
    # a Linear in the blocks, a SiLU in the final layer)
    names = [p for p, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)
             and any(p == t or p.endswith("." + t) for t in targets)]
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, init_lora_weights=True)
    adapted = inject_adapter_in_model(config, copy.deepcopy(transformer))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    if adapter_names:
        return {k: v.detach().clone() for k, v in adapted.named_parameters() if "lora_" in k}
    return {k: v.contiguous() for k, v in get_peft_model_state_dict(adapted).items()}


def peft_z_image(twin, seed: int = 0, **kw) -> dict:
    """diffusers ZImagePipeline.save_lora_weights: `transformer.` + PEFT names (every Linear of the model)."""
    return {f"transformer.{k}": v for k, v in peft_state(twin, seed=seed, targets=Z_IMAGE_PEFT_TARGETS, **kw).items()}


def ai_toolkit_z_image(twin, seed: int = 0, rank: int = 4) -> dict:
    """ai-toolkit Z-Image: PEFT on the `layers` blocks, saved under `diffusion_model.`, no alpha (alpha = rank)."""
    state = peft_state(twin, rank=rank, alpha=rank, seed=seed,
                       targets=("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3", "adaLN_modulation.0"))
    return {f"diffusion_model.{k}": v for k, v in state.items() if k.startswith("layers.")}


def diffsynth_z_image(twin, seed: int = 0, rank: int = 4) -> dict:
    """DiffSynth-Studio: bare diffusers names with PEFT's adapter name (`.lora_A.default.weight`), alpha = rank."""
    return peft_state(twin, rank=rank, alpha=rank, seed=seed, targets=("to_q", "to_k", "to_v", "to_out.0", "w1", "w2",
                                                                        "w3", "adaLN_modulation.0"), adapter_names=True)


def musubi_z_image(twin, rank: int = 4, alpha: float = 2.0, seed: int = 0, exclude: bool = True,
                   comfy_names: bool = False) -> dict:
    """musubi-tuner Z-Image: `lora_unet_<diffusers path _>` on the blocks' Linears; its default excludes every
    `_modulation` / `_refiner` module (networks/lora_zimage.py). `comfy_names`: the same tensors under
    `diffusion_model.<diffusers path>` (what musubi's `convert_lora.py --target other` writes; core reads it)."""
    layers = dw.linear_layers(twin, include=("layers.", "noise_refiner.", "context_refiner."))
    names = {p: "lora_unet_" + p.replace(".", "_") for p in layers}
    if exclude:
        layers = {p: m for p, m in layers.items() if not re.match(r".*(_modulation|_refiner).*", names[p])}
    if comfy_names:
        names = {p: "diffusion_model." + p for p in layers}
    return dw.lora_pairs(layers, lambda p: names[p], rank, alpha, seed)


def peft_lumina2(twin, seed: int = 0, **kw) -> dict:
    """diffusers Lumina2Pipeline.save_lora_weights: `transformer.layers.N.attn.to_q.lora_A.weight` ..."""
    return {f"transformer.{k}": v for k, v in peft_state(twin, seed=seed, targets=LUMINA2_PEFT_TARGETS, **kw).items()}


def full_diffs(model, seed: int = 0, prefix: str = "diffusion_model.") -> dict:
    """`.diff` for every weight of NextDiT (linears and RMS norms; not the pad tokens) and `.diff_b` per bias."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, param in sorted(nextdit(model).named_parameters()):
        module, _, kind = name.rpartition(".")
        if kind == "weight":
            state[f"{prefix}{module}.diff"] = 0.01 * torch.randn(param.shape, generator=generator)
        elif kind == "bias":
            state[f"{prefix}{module}.diff_b"] = 0.01 * torch.randn(param.shape, generator=generator)
    return state


# ------------------------------------------------------------------------------------- truths for core

# Lumina2Transformer2DModel -> ComfyUI NextDiT module names: the reverse of diffusers' loaders/single_file_utils.py
# convert_lumina2_to_diffusers (LUMINA_KEY_MAP, ATTENTION_NORM_MAP, CONTEXT_REFINER_MAP, FINAL_LAYER_MAP).
_LUMINA2_RENAMES = (
    (r"time_caption_embed\.caption_embedder\.", "cap_embedder."),
    (r"time_caption_embed\.timestep_embedder\.linear_1", "t_embedder.mlp.0"),
    (r"time_caption_embed\.timestep_embedder\.linear_2", "t_embedder.mlp.2"),
    (r"norm_out\.linear_1", "final_layer.adaLN_modulation.1"),
    (r"norm_out\.linear_2", "final_layer.linear"),
    (r"\.attn\.to_out\.0", ".attention.out"),
    (r"\.attn\.norm_q", ".attention.q_norm"),
    (r"\.attn\.norm_k", ".attention.k_norm"),
    (r"\.attn\.to_([qkv])", r".attention.to_\1"),
    (r"\.feed_forward\.linear_([123])", r".feed_forward.w\1"),
    (r"\.norm1\.linear", ".adaLN_modulation.1"),
)
_SPLIT = re.compile(r"^(?P<prefix>.*?)(?P<block>(?:layers|noise_refiner|context_refiner)\.\d+)\.attention\.to_(?P<x>[qkv])"
                    r"(?P<suffix>\..+)$")


def to_comfy_lumina2(state: Mapping[str, torch.Tensor], prefix: str = "transformer.") -> dict:
    """Lumina2Transformer2DModel names -> `diffusion_model.` + ComfyUI's (q / k / v still split: see fuse_qkv)."""
    out = {}
    for key, value in state.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        for pattern, repl in _LUMINA2_RENAMES:
            name = re.sub(pattern, repl, name)
        out["diffusion_model." + name] = value
    return out


def fuse_qkv(state: Mapping[str, torch.Tensor]) -> dict:
    """Every `<block>.attention.to_q / to_k / to_v` LoRA (lora_A/B or lora_down/up, optional alpha) fused into one
    exact `<block>.attention.qkv` LoRA in kohya form (rows q, k, v; scale folded into down, no alpha)."""
    groups: dict = {}
    out = {}
    for key, value in state.items():
        m = _SPLIT.match(key)
        if not m:
            out[key] = value
            continue
        groups.setdefault((m.group("prefix"), m.group("block")), {}).setdefault(m.group("x"), {})[m.group("suffix")] = value
    for (prefix, block), parts in groups.items():
        assert set(parts) == {"q", "k", "v"}, (block, sorted(parts))
        downs, ups = [], []
        for x in "qkv":
            t = parts[x]
            down = next(v for s, v in t.items() if s in (".lora_A.weight", ".lora_down.weight", ".lora_A.default.weight"))
            up = next(v for s, v in t.items() if s in (".lora_B.weight", ".lora_up.weight", ".lora_B.default.weight"))
            scale = float(t[".alpha"]) / down.shape[0] if ".alpha" in t else 1.0
            downs.append(down * scale)
            ups.append(up)
        name = f"{prefix}{block}.attention.qkv"
        out[name + ".lora_down.weight"] = torch.cat(downs, 0)
        out[name + ".lora_up.weight"] = torch.block_diag(*ups)
    return out


def rename(state: Mapping[str, torch.Tensor], old: str, new: str) -> dict:
    return dw.rename_prefix(state, old, new)
