"""Independent writers of HunyuanVideo LoRA files, for tests (import: `from tests import hunyuan_video_writers as hw`).

Real writers are used where they are installable: PEFT on diffusers' own `HunyuanVideoTransformer3DModel` (what
`HunyuanVideoPipeline.save_lora_weights` saves), LyCORIS's own wrapper. Trainers that are not installable get a
small writer following their naming; each cites the rule's source (snapshots in
/work/shared/reference/dit-families.md §6). None of them asks LoRA Core for a name.

* Tencent's module names (HunyuanVideo `hyvideo/modules/models.py`, `token_refiner.py`, `embed_layers.py`), which
  ComfyUI renames on load (`comfy/supported_models.py::HunyuanVideo.process_unet_state_dict`, lines 862-876; the
  inverse is `TENCENT_RENAMES` below): `img_mod.linear`, `img_attn_qkv`, `img_attn_proj`, `img_mlp.fc1` / `fc2`,
  `modulation.linear`, `time_in.mlp.0`, `txt_in.t_embedder.mlp.0`, `txt_in.c_embedder.linear_1`, refiner
  `self_attn_qkv` / `self_attn_proj` / `mlp.fc1`.
* diffusion-pipe (`models/hunyuan_video.py`: PEFT on Tencent's transformer, every Linear of the double / single
  blocks, saved with `transformer.` prefixed to PEFT's keys, no alpha; "This format will directly work with
  ComfyUI", docs/supported_models.md:112): `transformer.double_blocks.0.img_attn_qkv.lora_A.weight`. Older
  diffusion-pipe releases and musubi-tuner's `convert_lora.py --target other` (docs/hunyuan_video.md): the same
  under `diffusion_model.`.
* musubi-tuner (`networks/lora.py`: `HUNYUAN_TARGET_REPLACE_MODULES = ["MMDoubleStreamBlock",
  "MMSingleStreamBlock"]`, prefix `lora_unet`, name = prefix + "." + block path + "." + child with `.` -> `_`,
  `lora_down` / `lora_up` + `.alpha`; default `exclude_patterns` drop `img_mod|txt_mod|modulation`, line 382):
  `lora_unet_double_blocks_0_img_mlp_fc1`.
* musubi-tuner's HunyuanVideo 1.5 network (`networks/lora_hv_1_5.py` on `MMDoubleStreamBlock`, whose attention
  has separate q / k / v Linears; `networks/convert_hunyuan_video_1_5_lora_to_comfy.py` fuses them into ComfyUI's
  `img_attn.qkv`): `lora_unet_double_blocks_0_img_attn_q` ... (`musubi_split_qkv`, on the 1.0 model's widths).
* ComfyUI native (comfy/lora.py `model_lora_keys_unet`, generic `diffusion_model.<path>`): lora_up / lora_down (or
  lora_A / lora_B) + alpha on every Linear; full diffs `<path>.diff` / `.diff_b` (lightx2v-style).
* diffusers / PEFT (`HunyuanVideoLoraLoaderMixin`, transformer prefix "transformer"):
  `transformer.<HunyuanVideoTransformer3DModel path>.lora_A.weight`. diffusers' converter
  (`_convert_hunyuan_video_lora_to_diffusers`) is the source of `DIFFUSERS_TO_COMFY` (its renames, inverted).
* LyCORIS on the ComfyUI transformer (prefix `lycoris`, SimpleTuner's convention): `lycoris_<path _>`.
* text encoders: CLIP-L under kohya's `lora_te1_` (ComfyUI maps it, `model_lora_keys_clip`); LLaVA-Llama-3-8B under
  ComfyUI's generic `text_encoders.llama.transformer.<HF path>` (the only form core maps).

Every factor is random and non-zero, so every module has a non-zero delta.
"""
from __future__ import annotations

import copy
import re
from typing import Iterable, Mapping

import torch

from tests import dit_writers as dw

# ComfyUI path -> Tencent path (the inverse of process_unet_state_dict's renames), applied in order
TENCENT_RENAMES = (
    (r"^time_in\.in_layer$", "time_in.mlp.0"), (r"^time_in\.out_layer$", "time_in.mlp.2"),
    (r"^guidance_in\.in_layer$", "guidance_in.mlp.0"), (r"^guidance_in\.out_layer$", "guidance_in.mlp.2"),
    (r"^txt_in\.t_embedder\.in_layer$", "txt_in.t_embedder.mlp.0"),
    (r"^txt_in\.t_embedder\.out_layer$", "txt_in.t_embedder.mlp.2"),
    (r"^txt_in\.c_embedder\.in_layer$", "txt_in.c_embedder.linear_1"),
    (r"^txt_in\.c_embedder\.out_layer$", "txt_in.c_embedder.linear_2"),
    (r"_mod\.lin$", "_mod.linear"), (r"\.modulation\.lin$", ".modulation.linear"),
    (r"_attn\.qkv$", "_attn_qkv"), (r"_attn\.proj$", "_attn_proj"),
    (r"mlp\.0$", "mlp.fc1"), (r"mlp\.2$", "mlp.fc2"),
)
MUSUBI_EXCLUDE = re.compile(r".*(img_mod|txt_mod|modulation).*")   # musubi networks/lora.py default
KOHYA_FLUX_METADATA = {"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-dev/lora",
                       "ss_network_module": "networks.lora_flux"}
MUSUBI_METADATA = {"ss_base_model_version": "hunyuan_video", "modelspec.architecture": "hunyuan-video/lora",
                   "ss_network_module": "networks.lora"}
PEFT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
                "norm.linear", "norm1.linear", "norm1_context.linear", "norm_out.linear", "proj_in", "linear_1",
                "linear_2")


def net(model) -> torch.nn.Module:
    return model.model.diffusion_model if hasattr(model, "model") else model


def tencent(path: str) -> str:
    for pattern, replacement in TENCENT_RENAMES:
        if pattern.startswith("^") and re.match(pattern, path):
            return re.sub(pattern, replacement, path)   # an embedder: a whole-path rename
        path = re.sub(pattern, replacement, path)
    return path


def block_linears(model, exclude=None) -> dict:
    """Every Linear inside double_blocks / single_blocks (musubi's and diffusion-pipe's targets)."""
    layers = dw.linear_layers(net(model), include=("double_blocks.", "single_blocks."))
    if exclude is not None:
        layers = {p: m for p, m in layers.items() if not exclude.match(p)}
    return layers


def comfy_native(model, seed: int = 0, **kw) -> dict:
    return dw.comfy_native(model, seed=seed, **kw)


def full_diffs(model, seed: int = 0, **kw) -> dict:
    return dw.full_diffs(model, seed=seed, **kw)


def diffusion_pipe(model, seed: int = 0, rank: int = 4, prefix: str = "transformer.", layers=None) -> dict:
    """PEFT lora_A / lora_B under Tencent's names, no alpha (diffusion-pipe)."""
    layers = block_linears(model) if layers is None else layers
    return dw.lora_pairs(layers, lambda p: prefix + tencent(p), rank, None, seed, ".lora_B.weight", ".lora_A.weight",
                         "")


def musubi(model, seed: int = 0, rank: int = 4, alpha: float = 2.0, exclude_mod: bool = True) -> dict:
    layers = block_linears(model, MUSUBI_EXCLUDE if exclude_mod else None)
    return dw.lora_pairs(layers, lambda p: "lora_unet_" + tencent(p).replace(".", "_"), rank, alpha, seed)


def musubi_split_qkv(model, seed: int = 0, rank: int = 4, alpha: float = 2.0) -> tuple[dict, dict]:
    """(musubi 1.5's split q / k / v LoRAs of every double block's attention, the same change as one fused
    `..._attn_qkv` LoRA per stream: down = the three downs stacked, up = the ups block-diagonal, alpha x 3 for the
    tripled rank - what musubi's converter writes for ComfyUI)."""
    generator = torch.Generator().manual_seed(seed)
    split, fused = {}, {}
    for i, block in enumerate(net(model).double_blocks):
        for stream in ("img", "txt"):
            qkv = getattr(block, f"{stream}_attn").qkv
            h = qkv.in_features
            downs, ups = [], []
            for x in "qkv":
                name = f"lora_unet_double_blocks_{i}_{stream}_attn_{x}"
                down = 0.1 * torch.randn(rank, h, generator=generator)
                up = 0.1 * torch.randn(qkv.out_features // 3, rank, generator=generator)
                split.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                              f"{name}.alpha": torch.tensor(alpha)})
                downs.append(down)
                ups.append(up)
            name = f"lora_unet_double_blocks_{i}_{stream}_attn_qkv"
            fused.update({f"{name}.lora_down.weight": torch.cat(downs), f"{name}.lora_up.weight": torch.block_diag(*ups),
                          f"{name}.alpha": torch.tensor(3 * alpha)})
    return split, fused


def tencent_inputs(model, seed: int = 0, rank: int = 4) -> dict:
    """The embedders and the token refiner under Tencent's names with `transformer.` (diffusion-pipe style; core
    maps only those whose Tencent name its rename reaches)."""
    layers = {p: m for p, m in dw.linear_layers(net(model)).items()
              if p.startswith(("time_in.", "guidance_in.", "vector_in.", "txt_in.", "final_layer."))}
    return dw.lora_pairs(layers, lambda p: "transformer." + tencent(p), rank, None, seed, ".lora_B.weight",
                         ".lora_A.weight", "")


def to_comfy_names(state: Mapping[str, torch.Tensor]) -> dict:
    """Tencent / musubi names -> ComfyUI's (`diffusion_model.<path>`, kohya suffixes kept): the truth for files core
    cannot read, the same tensors under names it maps."""
    inverse = (
        ("mlp.fc1", "mlp.0"), ("mlp.fc2", "mlp.2"), ("_mod.linear", "_mod.lin"), (".modulation.linear", ".modulation.lin"),
        ("_attn_qkv", "_attn.qkv"), ("_attn_proj", "_attn.proj"), ("time_in.mlp.0", "time_in.in_layer"),
        ("time_in.mlp.2", "time_in.out_layer"), ("guidance_in.mlp.0", "guidance_in.in_layer"),
        ("guidance_in.mlp.2", "guidance_in.out_layer"), ("t_embedder.mlp.0", "t_embedder.in_layer"),
        ("t_embedder.mlp.2", "t_embedder.out_layer"), ("c_embedder.linear_1", "c_embedder.in_layer"),
        ("c_embedder.linear_2", "c_embedder.out_layer"))
    out = {}
    for key, value in state.items():
        module, suffix = re.match(r"(.+?)(\.(?:lora_(?:up|down|A|B)\.weight|alpha))$", key).groups()
        if module.startswith("lora_unet_"):
            body = module[len("lora_unet_"):]
            # musubi's underscored Tencent names: map the known words back, then dots per ComfyUI's module tree
            for old, new in (("img_mlp_fc1", "img_mlp_0"), ("img_mlp_fc2", "img_mlp_2"), ("txt_mlp_fc1", "txt_mlp_0"),
                             ("txt_mlp_fc2", "txt_mlp_2"), ("img_mod_linear", "img_mod_lin"),
                             ("txt_mod_linear", "txt_mod_lin"), ("modulation_linear", "modulation_lin")):
                body = body.replace(old, new)
            out["lora_unet_" + body + suffix] = value
            continue
        body = module.split(".", 1)[1] if module.startswith(("transformer.", "diffusion_model.")) else module
        for old, new in inverse:
            body = body.replace(old, new)
        out["diffusion_model." + body + suffix] = value
    return out


def lycoris(model, algo: str, seed: int = 0) -> dict:
    from tests import lora_writers as lw

    blocks = torch.nn.ModuleDict({"double_blocks": net(model).double_blocks, "single_blocks": net(model).single_blocks})
    return lw.lycoris_state_dict(blocks, algo, prefix="lycoris", rank=4, alpha=2.0, seed=seed,
                                 target_module=("Linear",))


# ------------------------------------------------------------------------------------------- diffusers

def peft_state(transformer, rank: int = 4, alpha: float = 8, seed: int = 0,
               targets: Iterable[str] = PEFT_TARGETS) -> dict:
    """Real PEFT on diffusers' HunyuanVideoTransformer3DModel, factors randomised; `transformer.` keys as
    `HunyuanVideoPipeline.save_lora_weights` writes them (no alpha key)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
    adapted = inject_adapter_in_model(config, copy.deepcopy(transformer))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return {f"transformer.{k}": v.contiguous() for k, v in get_peft_model_state_dict(adapted).items()}


# diffusers path -> ComfyUI path (diffusers' converter renames, inverted), per module of a block
_DIF_DOUBLE = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "norm1.linear": "img_mod.lin",
               "norm1_context.linear": "txt_mod.lin", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
               "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
_DIF_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
_DIF_REFINER = {"attn.to_out.0": "self_attn.proj", "ff.net.0.proj": "mlp.0", "ff.net.2": "mlp.2",
                "norm_out.linear": "adaLN_modulation.1"}
_DIF_TOP = {"x_embedder.proj": "img_in.proj", "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
            "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
            "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
            "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
            "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
            "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
            "context_embedder.proj_in": "txt_in.input_embedder",
            "context_embedder.time_text_embed.timestep_embedder.linear_1": "txt_in.t_embedder.in_layer",
            "context_embedder.time_text_embed.timestep_embedder.linear_2": "txt_in.t_embedder.out_layer",
            "context_embedder.time_text_embed.text_embedder.linear_1": "txt_in.c_embedder.in_layer",
            "context_embedder.time_text_embed.text_embedder.linear_2": "txt_in.c_embedder.out_layer",
            "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}
# fused groups: diffusers modules whose outputs are the rows of one ComfyUI weight, in row order
_FUSED = ((r"transformer_blocks\.(\d+)\.attn\.", ("to_q", "to_k", "to_v"), "double_blocks.{}.img_attn.qkv"),
          (r"transformer_blocks\.(\d+)\.attn\.", ("add_q_proj", "add_k_proj", "add_v_proj"),
           "double_blocks.{}.txt_attn.qkv"),
          (r"single_transformer_blocks\.(\d+)\.", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
           "single_blocks.{}.linear1"),
          (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.attn\.", ("to_q", "to_k", "to_v"),
           "txt_in.individual_token_refiner.blocks.{}.self_attn.qkv"))


def diffusers_to_comfy(state: Mapping[str, torch.Tensor]) -> dict:
    """A PEFT file on diffusers' names (no alpha: scale 1) as the same change under ComfyUI's names, which core
    reads: renamed modules as they are; the parts of a fused weight as one LoRA of rank sum(r) (down = the parts'
    downs stacked, up = their ups block-diagonal: the same tensors, the same product); `norm_out.linear`'s
    [scale | shift] up rows swapped to the canonical [shift | scale]."""
    modules: dict[str, dict] = {}
    for key, value in state.items():
        module, which = re.match(r"transformer\.(.+)\.lora_([AB])\.weight$", key).groups()
        modules.setdefault(module, {})[which] = value
    out, used = {}, set()
    for pattern, members, target in _FUSED:
        for module in list(modules):
            m = re.fullmatch(pattern + re.escape(members[0]), module)
            if not m or module in used:
                continue
            if pattern.startswith("transformer_blocks") and module.startswith("single_"):
                continue
            base = module[:-len(members[0])]
            parts = [modules[base + name] for name in members]
            used.update(base + name for name in members)
            out[f"diffusion_model.{target.format(m.group(1))}.lora_down.weight"] = torch.cat([p["A"] for p in parts])
            out[f"diffusion_model.{target.format(m.group(1))}.lora_up.weight"] = torch.block_diag(*[p["B"] for p in parts])
    for module, pair in modules.items():
        if module in used:
            continue
        name, up = None, pair["B"]
        if module in _DIF_TOP:
            name = _DIF_TOP[module]
            if module == "norm_out.linear":
                half = up.shape[0] // 2
                up = torch.cat([up[half:], up[:half]])
        else:
            for pattern, table, canonical in ((r"transformer_blocks\.(\d+)\.(.+)", _DIF_DOUBLE, "double_blocks.{}.{}"),
                                              (r"single_transformer_blocks\.(\d+)\.(.+)", _DIF_SINGLE,
                                               "single_blocks.{}.{}"),
                                              (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.(.+)",
                                               _DIF_REFINER, "txt_in.individual_token_refiner.blocks.{}.{}")):
                m = re.fullmatch(pattern, module)
                if m and m.group(2) in table:
                    name = canonical.format(m.group(1), table[m.group(2)])
                    break
        assert name is not None, module
        out[f"diffusion_model.{name}.lora_down.weight"] = pair["A"]
        out[f"diffusion_model.{name}.lora_up.weight"] = up
    return out


# ------------------------------------------------------------------------------------------- text encoders

def text_encoders(clip, seed: int = 0, rank: int = 4, alpha: float = 2.0) -> dict:
    """kohya `lora_te1_` names for CLIP-L's attention / MLP linears and ComfyUI's generic names for every Linear of
    the Llama's layers (`text_encoders.llama.transformer.model.layers.0.self_attn.q_proj.lora_up.weight`)."""
    state = dw.kohya_text_encoders(clip, {"clip_l": "lora_te1"}, rank, alpha, seed)
    llama = clip.cond_stage_model.llama.transformer
    layers = dw.linear_layers(llama, include=("model.layers.",))
    state.update(dw.lora_pairs(layers, lambda p: "text_encoders.llama.transformer." + p, rank, alpha, seed + 1))
    return state
