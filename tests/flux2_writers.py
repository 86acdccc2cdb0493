"""Independent writers of Flux.2 [dev] LoRA files, for tests (import: `from tests import flux2_writers as f2`).

Real writers are used where they are installable: PEFT on diffusers' own `Flux2Transformer2DModel` (what
`Flux2Pipeline.save_lora_weights` writes, Flux2LoraLoaderMixin reads, and DiffSynth-Studio trains), PEFT on
ComfyUI's own model (diffusion-pipe), LyCORIS's own wrapper. The others follow their naming; every rule cites its
source (snapshots listed in /work/shared/reference/dit-families.md §7):

* ComfyUI native (comfy/lora.py model_lora_keys_unet's generic map): `diffusion_model.<path>` with lora_up /
  lora_down (or lora_A / lora_B) + `.alpha` on every Linear of the model; BFL / bare `<path>`.
* musubi-tuner `networks/lora_flux_2.py`: `lora.create_network(["DoubleStreamBlock", "SingleStreamBlock"],
  "lora_unet", ...)` over musubi's BFL-named model (`flux_2/flux2_models.py`), default excludes `img_mod.lin|
  txt_mod.lin|modulation.lin` (absent in Flux.2's blocks) and `norm`; `networks/lora.py` names = prefix + "." +
  path, dots -> `_`, `lora_down` / `lora_up` + `.alpha`: `lora_unet_single_blocks_0_linear1`. Metadata
  (architectures.py, sai_model_spec.py): `ss_base_model_version` `flux_2_dev`, `modelspec.architecture`
  `Flux.2-dev/lora`, `ss_network_module` `networks.lora_flux_2`.
* ai-toolkit (`extensions_built_in/diffusion_models/flux2/flux2_model.py`: BFL model names, block list
  `["double_blocks", "single_blocks"]`, `transformer.` -> `diffusion_model.` before saving, PEFT lora_A / lora_B
  without alpha); metadata `ss_base_model_version` `flux2`.
* diffusion-pipe (`models/` ComfyPipeline: PEFT on ComfyUI's own model, `'diffusion_model.' + k`, no alpha key).
* diffusers / PEFT (loaders/lora_pipeline.py Flux2LoraLoaderMixin, prefix "transformer"): `transformer.<Flux2
  Transformer2DModel path>.lora_A.weight` / `.lora_B.weight`; raw PEFT state dicts `base_model.model.<path>`.
* DiffSynth-Studio (`examples/flux2/model_training/lora/*.sh`: `--lora_target_modules "to_q,to_k,to_v,to_out.0,
  add_q_proj,add_k_proj,add_v_proj,to_add_out,linear_in,linear_out,to_qkv_mlp_proj,single_transformer_blocks.N.
  attn.to_out"`, `--remove_prefix_in_ckpt "pipe.dit."`, PEFT with lora_alpha = rank): bare diffusers names with
  PEFT's adapter name kept, `transformer_blocks.0.attn.to_q.lora_A.default.weight`.
* LyCORIS' own wrapper (`lycoris_` + module path with `_`) on the BFL model, and SimpleTuner's LyCORIS on the
  diffusers model (`lycoris_<diffusers path _>`); every algorithm.
* Flux.1-style diffusers names on a Flux.2 file (a Flux.1 converter's split of a BFL file: diffusers'
  `_convert_..._flux_lora` splits `linear1` into `attn.to_q/k/v` + `proj_mlp`): `proj_mlp` holds the whole gated
  MLP input (gate | up, 2m rows).
* lightx2v-style full diffs `diffusion_model.<path>.diff`.
* text encoder: ComfyUI's generic `text_encoders.mistral3_24b.transformer.<path>` (the only form core maps).

`to_native` renames diffusers Flux.2 names to the BFL ones from diffusers' own single-file converter table
(loaders/single_file_utils.py `convert_flux2_transformer_checkpoint_to_diffusers`, read in reverse), written out
here independently of the family file. Every factor is random and non-zero, so every module has a non-zero delta.
"""
from __future__ import annotations

import copy
import re
from typing import Iterable, Mapping

import torch

from tests import dit_writers as dw

MUSUBI_METADATA = {"ss_base_model_version": "flux_2_dev", "modelspec.architecture": "Flux.2-dev/lora",
                   "modelspec.implementation": "https://github.com/black-forest-labs/flux2",
                   "ss_network_module": "networks.lora_flux_2"}
AI_TOOLKIT_METADATA = {"ss_base_model_version": "flux2"}


def net(model) -> torch.nn.Module:
    return model.model.diffusion_model if hasattr(model, "model") else model


def block_linears(model) -> dict:
    """Every Linear inside the double and single blocks (musubi's and ai-toolkit's targets)."""
    return dw.linear_layers(net(model), include=("double_blocks.", "single_blocks."))


def comfy_native(model, seed: int = 0, **kw) -> dict:
    return dw.comfy_native(model, seed=seed, **kw)


def musubi(model, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> dict:
    return dw.lora_pairs(block_linears(model), lambda p: "lora_unet_" + p.replace(".", "_"), rank, alpha, seed)


def ai_toolkit(model, rank: int = 4, seed: int = 0) -> dict:
    return dw.lora_pairs(block_linears(model), lambda p: "diffusion_model." + p, rank, None, seed,
                         ".lora_B.weight", ".lora_A.weight", "")


def _peft(module, targets, rank: int, alpha: float, seed: int, adapter_names: bool = False) -> dict:
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True)
    adapted = inject_adapter_in_model(config, copy.deepcopy(module))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    if adapter_names:
        return {k: v.detach().clone() for k, v in adapted.named_parameters() if "lora_" in k}
    return {k: v.contiguous() for k, v in get_peft_model_state_dict(adapted).items()}


def diffusion_pipe(model, rank: int = 4, seed: int = 0) -> dict:
    """Real PEFT on ComfyUI's own Flux.2 model (every Linear of the blocks), saved with `diffusion_model.`."""
    state = _peft(net(model), list(block_linears(model)), rank, rank, seed)
    return {"diffusion_model." + k: v for k, v in state.items()}


def diffusers_targets(transformer, attention_only: bool = False) -> list[str]:
    """Full module names of every Linear of Flux2Transformer2DModel (or only the attention names core 0.3.75
    maps: to_q/k/v, add_*_proj, to_out.0, to_add_out, and x_embedder / context_embedder / proj_out / norm_out)."""
    names = list(dw.linear_layers(transformer))
    if attention_only:
        keep = re.compile(r"(attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)|^x_embedder|^context_embedder|"
                          r"^proj_out|^norm_out\.linear)$")
        names = [n for n in names if keep.search(n)]
    return names


def peft_state(transformer, rank: int = 4, alpha: float = 8, seed: int = 0, targets=None,
               adapter_names: bool = False) -> dict:
    """Real PEFT on diffusers' Flux2Transformer2DModel (factors randomised); keys without prefix."""
    targets = diffusers_targets(transformer) if targets is None else list(targets)
    return _peft(transformer, targets, rank, alpha, seed, adapter_names)


def diffusers_peft(transformer, seed: int = 0, **kw) -> dict:
    return {"transformer." + k: v for k, v in peft_state(transformer, seed=seed, **kw).items()}


DIFFSYNTH_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                     "linear_in", "linear_out", "to_qkv_mlp_proj")


def diffsynth(transformer, seed: int = 0, rank: int = 4) -> dict:
    single = [f"single_transformer_blocks.{i}.attn.to_out" for i in range(len(transformer.single_transformer_blocks))]
    return peft_state(transformer, rank=rank, alpha=rank, seed=seed, targets=list(DIFFSYNTH_TARGETS) + single,
                      adapter_names=True)


def text_encoder(clip, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> dict:
    """ComfyUI's generic text-encoder names for every Linear of Mistral's layers:
    `text_encoders.mistral3_24b.transformer.model.layers.0.self_attn.q_proj.lora_up.weight`."""
    encoder = clip.cond_stage_model.mistral3_24b.transformer
    layers = dw.linear_layers(encoder, include=("model.layers.",))
    return dw.lora_pairs(layers, lambda p: "text_encoders.mistral3_24b.transformer." + p, rank, alpha, seed)


def flux1_style_split(model, rank: int = 4, seed: int = 0) -> dict:
    """Flux.1-style diffusers names for the single blocks (`transformer.single_transformer_blocks.N.attn.to_q/k/v`
    with h rows each, `proj_mlp` with the gated MLP input's 2m rows, `proj_out` = linear2), lora_A / lora_B, no
    alpha."""
    gen = torch.Generator().manual_seed(seed)
    h = net(model).hidden_size
    state = {}
    for i, block in enumerate(net(model).single_blocks):
        mlp_rows = block.linear1.out_features - 3 * h
        for name, rows, cols in (("attn.to_q", h, h), ("attn.to_k", h, h), ("attn.to_v", h, h),
                                 ("proj_mlp", mlp_rows, h), ("proj_out", h, block.linear2.in_features)):
            key = f"transformer.single_transformer_blocks.{i}.{name}"
            state[key + ".lora_A.weight"] = 0.1 * torch.randn(rank, cols, generator=gen)
            state[key + ".lora_B.weight"] = 0.1 * torch.randn(rows, rank, generator=gen)
    return state


def fuse_split_single_blocks(state: Mapping[str, torch.Tensor]) -> dict:
    """The truth for `flux1_style_split`: the same tensors as one LoRA on the fused native `linear1` (down = the
    four downs stacked, up = block-diagonal: q | k | v | gate+up rows in order; scale 1 as without alpha) and
    `proj_out` as `linear2`."""
    out = {}
    blocks = sorted({int(m.group(1)) for k in state for m in [re.search(r"single_transformer_blocks\.(\d+)\.", k)] if m})
    for i in blocks:
        p = f"transformer.single_transformer_blocks.{i}."
        parts = [p + n for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
        downs = [state[n + ".lora_A.weight"] for n in parts]
        ups = [state[n + ".lora_B.weight"] for n in parts]
        out[f"diffusion_model.single_blocks.{i}.linear1.lora_A.weight"] = torch.cat(downs, 0)
        out[f"diffusion_model.single_blocks.{i}.linear1.lora_B.weight"] = torch.block_diag(*ups)
        out[f"diffusion_model.single_blocks.{i}.linear2.lora_A.weight"] = state[p + "proj_out.lora_A.weight"]
        out[f"diffusion_model.single_blocks.{i}.linear2.lora_B.weight"] = state[p + "proj_out.lora_B.weight"]
    return out


# diffusers' single-file converter (BFL -> diffusers), read in reverse: diffusers module -> BFL module. Names
# whose diffusers form core 0.3.75 already reads (to_q/k/v, add_*_proj slices; to_out.0, to_add_out, x_embedder,
# context_embedder, proj_out, norm_out.linear) are left as they are.
_TO_NATIVE = (
    (r"^transformer_blocks\.(\d+)\.ff\.linear_in$", r"double_blocks.\1.img_mlp.0"),
    (r"^transformer_blocks\.(\d+)\.ff\.linear_out$", r"double_blocks.\1.img_mlp.2"),
    (r"^transformer_blocks\.(\d+)\.ff_context\.linear_in$", r"double_blocks.\1.txt_mlp.0"),
    (r"^transformer_blocks\.(\d+)\.ff_context\.linear_out$", r"double_blocks.\1.txt_mlp.2"),
    (r"^single_transformer_blocks\.(\d+)\.attn\.to_qkv_mlp_proj$", r"single_blocks.\1.linear1"),
    (r"^single_transformer_blocks\.(\d+)\.attn\.to_out$", r"single_blocks.\1.linear2"),
    (r"^double_stream_modulation_(img|txt)\.linear$", r"double_stream_modulation_\1.lin"),
    (r"^single_stream_modulation\.linear$", r"single_stream_modulation.lin"),
    (r"^time_guidance_embed\.timestep_embedder\.linear_1$", r"time_in.in_layer"),
    (r"^time_guidance_embed\.timestep_embedder\.linear_2$", r"time_in.out_layer"),
    (r"^time_guidance_embed\.guidance_embedder\.linear_1$", r"guidance_in.in_layer"),
    (r"^time_guidance_embed\.guidance_embedder\.linear_2$", r"guidance_in.out_layer"),
)


def to_native(state: Mapping[str, torch.Tensor], prefix: str = "transformer.") -> dict:
    """The same tensors with every diffusers Flux.2 name core 0.3.75 cannot read renamed to its BFL name under
    `diffusion_model.`; the names core reads move to `transformer.` (its diffusers prefix). PEFT's `.default.`
    adapter name is dropped."""
    out = {}
    for key, value in state.items():
        assert key.startswith(prefix), key
        body = key[len(prefix):].replace(".default.", ".")
        module, suffix = re.match(r"(.+?)(\.lora_[AB]\.weight|\.alpha)$", body).groups()
        for pattern, repl in _TO_NATIVE:
            if re.match(pattern, module):
                out["diffusion_model." + re.sub(pattern, repl, module) + suffix] = value
                break
        else:
            out["transformer." + module + suffix] = value
    return out


def renamed(state: Mapping[str, torch.Tensor], old: str, new: str) -> dict:
    return dw.rename_prefix(state, old, new)


def lycoris_targets(transformer, names: Iterable[str]) -> torch.nn.Module:
    """A ModuleDict exposing the named children of a model, for LyCORIS wrappers over part of it."""
    return torch.nn.ModuleDict({n: getattr(net(transformer), n) for n in names})
