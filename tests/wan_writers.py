"""Independent writers of Wan 2.1 / 2.2 LoRA files, for tests (import: `from tests import wan_writers as ww`).

Real writers are used where they are installable: PEFT on diffusers' own `WanTransformer3DModel` (what
`WanPipeline.save_lora_weights` writes), PEFT on ComfyUI's own WanModel (the original Wan module tree, which
diffusion-pipe and DiffSynth-Studio wrap), LyCORIS's own wrapper. The others follow their documented naming; every
rule cites its source (snapshots listed in /work/shared/reference/dit-families.md §3):

* ComfyUI native (`comfy/lora.py::model_lora_keys_unet`'s generic map): `diffusion_model.<path>` + lora_up/down or
  lora_A/B + `.alpha`, on every Linear (tests.dit_writers.comfy_native); full diffs `diffusion_model.<path>.diff`
  for every weight (the Conv3d patch embedding, norms, and the `modulation` parameters under their full key,
  `diffusion_model.blocks.0.modulation.diff`, as core's generic map names non-`.weight` tensors), `.diff_b` biases.
* musubi-tuner (`networks/lora_wan.py`: `WAN_TARGET_REPLACE_MODULES = ["WanAttentionBlock"]`, prefix `lora_unet`,
  default exclude `.*(patch_embedding|text_embedding|time_embedding|time_projection|norm|head).*`; `networks/
  lora.py` names `prefix + "." + path` with dots -> `_`, `lora_down` / `lora_up` + `.alpha`):
  `lora_unet_blocks_0_self_attn_q`, `..._cross_attn_k_img` on 2.1 I2V. Metadata (`dataset/architectures.py`,
  `utils/sai_model_spec.py`): `ss_base_model_version` `wan`, `modelspec.architecture` `wan2.1/lora`,
  `ss_network_module` `networks.lora_wan`; with --min/max_timestep `modelspec.timestep_range` "min,max"
  (`training/trainer_base.py`), e.g. "875,1000" for the T2V high-noise expert (`docs/wan.md`).
* Wan-Fun / VideoX-Fun: `lora_unet__blocks_0_cross_attn_k` (double underscore; ComfyUI's `convert_lora_wan_fun`
  triggers on `lora_unet__blocks_0_cross_attn_k.lora_down.weight`).
* diffusion-pipe (`models/wan/wan.py`, "ComfyUI format": PEFT on the original WanModel's WanAttentionBlock Linears,
  keys `diffusion_model.` + PEFT's, no alpha): real PEFT on ComfyUI's WanModel.
* ai-toolkit (`toolkit/models/wan21/wan_lora_convert.py::convert_to_original`: diffusers PEFT names -> original
  names with `diffusion_model.`; `attn1` -> `self_attn`, `attn2` -> `cross_attn`, `to_q/k/v` -> `q/k/v`,
  `to_out.0` -> `o`, `add_k_proj` / `add_v_proj` -> `k_img` / `v_img`, `ffn.net.0.proj` -> `ffn.0`, `ffn.net.2` ->
  `ffn.2`): `ORIGINAL_OF_DIFFUSERS` below. Metadata `ss_base_model_version` `wan_2.1` / `wan_2.2_14b` /
  `wan_2.2_5b` (`toolkit/models/wan21/wan21.py`); 2.2 14B runs save `*_high_noise` / `*_low_noise` files.
* DiffSynth-Studio (PEFT `inject_adapter_in_model` on its own copy of the original modules, saved with the
  parameter names, adapter name kept): bare `blocks.0.self_attn.q.lora_A.default.weight`, no alpha.
* lightx2v distill LoRAs (https://huggingface.co/lightx2v/Wan2.1-T2V-14B-StepDistill-CfgDistill-Lightx2v; keys
  quoted in kijai/ComfyUI-WanVideoWrapper#807 and diffusers' `_convert_non_diffusers_wan_lora_to_diffusers`):
  `diffusion_model.<path>.lora_down.weight` / `lora_up` + `.alpha`, `.diff_b` for biases, `.diff` for norms, and
  `diffusion_model.blocks.N.diff_m` for the block modulation.
* diffusers / PEFT (`WanLoraLoaderMixin`, transformer prefix `transformer`): `transformer.blocks.0.attn1.to_q.
  lora_A.weight`; SimpleTuner LyCORIS: LyCORIS's wrapper on the diffusers transformer, prefix `lycoris`.
* text encoder: ComfyUI's generic `text_encoders.umt5xxl.transformer.<path>` (the only form core maps), and
  kohya-style `lora_te_` / `lora_te1_` for a writer that uses them.

Every factor is random and non-zero, so every module has a non-zero delta.
"""
from __future__ import annotations

import copy
import re
from typing import Iterable, Mapping

import torch

from tests import dit_writers as dw

# diffusers WanTransformer3DModel module name -> original (ComfyUI) name, as ai-toolkit's convert_to_original and
# diffusers' own converter pair them (the reverse of _convert_non_diffusers_wan_lora_to_diffusers)
ORIGINAL_OF_DIFFUSERS = (
    (r"^blocks\.(\d+)\.attn1\.to_q$", r"blocks.\1.self_attn.q"), (r"^blocks\.(\d+)\.attn1\.to_k$", r"blocks.\1.self_attn.k"),
    (r"^blocks\.(\d+)\.attn1\.to_v$", r"blocks.\1.self_attn.v"),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0$", r"blocks.\1.self_attn.o"),
    (r"^blocks\.(\d+)\.attn2\.to_q$", r"blocks.\1.cross_attn.q"), (r"^blocks\.(\d+)\.attn2\.to_k$", r"blocks.\1.cross_attn.k"),
    (r"^blocks\.(\d+)\.attn2\.to_v$", r"blocks.\1.cross_attn.v"),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0$", r"blocks.\1.cross_attn.o"),
    (r"^blocks\.(\d+)\.attn2\.add_k_proj$", r"blocks.\1.cross_attn.k_img"),
    (r"^blocks\.(\d+)\.attn2\.add_v_proj$", r"blocks.\1.cross_attn.v_img"),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj$", r"blocks.\1.ffn.0"), (r"^blocks\.(\d+)\.ffn\.net\.2$", r"blocks.\1.ffn.2"),
    (r"^condition_embedder\.time_proj$", "time_projection.1"),
    (r"^condition_embedder\.text_embedder\.linear_1$", "text_embedding.0"),
    (r"^condition_embedder\.text_embedder\.linear_2$", "text_embedding.2"),
    (r"^condition_embedder\.time_embedder\.linear_1$", "time_embedding.0"),
    (r"^condition_embedder\.time_embedder\.linear_2$", "time_embedding.2"),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj$", "img_emb.proj.1"),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2$", "img_emb.proj.3"),
    (r"^proj_out$", "head.head"),
)
DIFFUSERS_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj", "ffn.net.0.proj", "ffn.net.2",
                     "time_proj", "linear_1", "linear_2", "ff.net.0.proj", "ff.net.2", "proj_out")
ORIGINAL_TARGETS = ("q", "k", "v", "o", "k_img", "v_img", "ffn.0", "ffn.2")   # diffusion-pipe / DiffSynth blocks
MUSUBI_EXCLUDE = re.compile(r".*(patch_embedding|text_embedding|time_embedding|time_projection|norm|head).*")
MUSUBI_METADATA = {"ss_base_model_version": "wan", "modelspec.architecture": "wan2.1/lora",
                   "ss_network_module": "networks.lora_wan",
                   "modelspec.implementation": "https://github.com/Wan-Video/Wan2.1"}


def net(model) -> torch.nn.Module:
    return model.model.diffusion_model if hasattr(model, "model") else model


def original_name(diffusers_path: str) -> str:
    for pattern, repl in ORIGINAL_OF_DIFFUSERS:
        if re.match(pattern, diffusers_path):
            return re.sub(pattern, repl, diffusers_path)
    raise KeyError(diffusers_path)


def block_linears(model) -> dict:
    """Every Linear inside the blocks (musubi's WanAttentionBlock targets before its exclude patterns)."""
    return dw.linear_layers(net(model), include=("blocks.",))


def comfy_native(model, seed: int = 0, **kw) -> dict:
    return dw.comfy_native(model, seed=seed, **kw)


def musubi(model, rank: int = 4, alpha: float = 2.0, seed: int = 0, prefix: str = "lora_unet_") -> dict:
    layers = {p: m for p, m in block_linears(model).items() if not MUSUBI_EXCLUDE.match(p)}
    return dw.lora_pairs(layers, lambda p: prefix + p.replace(".", "_"), rank, alpha, seed)


def wan_fun(model, seed: int = 0) -> dict:
    return musubi(model, seed=seed, prefix="lora_unet__")


def full_diffs(model, seed: int = 0, prefix: str = "diffusion_model.") -> dict:
    """`.diff` for every weight and parameter of the WanModel (the modulation parameters by their full key),
    `.diff_b` for every bias."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, param in sorted(net(model).named_parameters()):
        module, _, kind = name.rpartition(".")
        if kind == "bias":
            state[f"{prefix}{module}.diff_b"] = 0.01 * torch.randn(param.shape, generator=generator)
        elif kind == "weight":
            state[f"{prefix}{module}.diff"] = 0.01 * torch.randn(param.shape, generator=generator)
        else:   # blocks.N.modulation, head.modulation
            state[f"{prefix}{name}.diff"] = 0.01 * torch.randn(param.shape, generator=generator)
    return state


def lightx2v(model, rank: int = 4, alpha: float = 4.0, seed: int = 0, norms: bool = True,
             modulation: bool = True) -> tuple[dict, dict]:
    """(lightx2v's file, the same tensors under the names core 0.3.75 reads: `diff_m` -> `modulation.diff`).
    `norms` / `modulation`: include the norm3 diffs / the `diff_m` modulation diffs."""
    generator = torch.Generator().manual_seed(seed)
    layers = block_linears(model)
    state = dw.lora_pairs(layers, lambda p: "diffusion_model." + p, rank, alpha, seed)
    wan = net(model)
    for path, layer in layers.items():
        state[f"diffusion_model.{path}.diff_b"] = 0.01 * torch.randn(layer.bias.shape, generator=generator)
    for i, block in enumerate(wan.blocks):
        if modulation:
            state[f"diffusion_model.blocks.{i}.diff_m"] = 0.01 * torch.randn(block.modulation.shape,
                                                                            generator=generator)
        if not norms:
            continue
        state[f"diffusion_model.blocks.{i}.norm3.diff"] = 0.01 * torch.randn(block.norm3.weight.shape,
                                                                               generator=generator)
        state[f"diffusion_model.blocks.{i}.norm3.diff_b"] = 0.01 * torch.randn(block.norm3.bias.shape,
                                                                                 generator=generator)
    truth = {(k[:-len(".diff_m")] + ".modulation.diff" if k.endswith(".diff_m") else k): v for k, v in state.items()}
    return state, truth


def peft_on(module: torch.nn.Module, targets, rank: int = 4, alpha: float = 4, seed: int = 0,
            adapter_names: bool = False) -> dict:
    """Real PEFT (`inject_adapter_in_model`) on a copy of `module`, factors randomised; keys without prefix.
    With `adapter_names` the module's own parameter names (`...lora_A.default.weight`), else
    `get_peft_model_state_dict`'s (`...lora_A.weight`)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True,
                        target_modules=targets if isinstance(targets, str) else list(targets))
    adapted = inject_adapter_in_model(config, copy.deepcopy(module))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    if adapter_names:
        return {k: v.detach().clone() for k, v in adapted.named_parameters() if "lora_" in k}
    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(adapted).items()}


def original_blocks(model) -> torch.nn.Module:
    """The WanModel's blocks as a module whose names are the original paths (`blocks.0.self_attn.q`)."""
    return torch.nn.ModuleDict({"blocks": net(model).blocks})


def diffusion_pipe(model, seed: int = 0) -> dict:
    state = peft_on(original_blocks(model), rf"blocks\.\d+\.(self_attn|cross_attn)\.({'|'.join(ORIGINAL_TARGETS[:6])})"
                                            rf"|blocks\.\d+\.ffn\.[02]", seed=seed)
    return {f"diffusion_model.{k}": v for k, v in state.items()}


def diffsynth(model, seed: int = 0, rank: int = 4) -> dict:
    return peft_on(original_blocks(model), rf"blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o)|blocks\.\d+\.ffn\.[02]",
                   rank=rank, alpha=rank, seed=seed, adapter_names=True)


def diffusers_peft(transformer, seed: int = 0, targets: Iterable[str] = DIFFUSERS_TARGETS, **kw) -> dict:
    return {f"transformer.{k}": v for k, v in peft_on(transformer, targets, seed=seed, **kw).items()}


def ai_toolkit(transformer, seed: int = 0) -> dict:
    """ai-toolkit's saved file: diffusers PEFT names converted to the original ones (`convert_to_original`)."""
    out = {}
    for key, value in peft_on(transformer, DIFFUSERS_TARGETS, seed=seed).items():
        module, _, suffix = key.rpartition(".lora_")
        out[f"diffusion_model.{original_name(module)}.lora_{suffix}"] = value
    return out


def to_original(state: Mapping[str, torch.Tensor], prefix: str = "transformer.", underscored: bool = False) -> dict:
    """The same tensors under `diffusion_model.<original name>` (the truth for diffusers-named files core cannot
    read). `underscored`: names like `lycoris_blocks_0_attn1_to_q` (LyCORIS on the diffusers model)."""
    out = {}
    for key, value in state.items():
        assert key.startswith(prefix), key
        rest = key[len(prefix):]
        module, dot, suffix = rest.partition(".")
        if not underscored:
            for cut in (".lora_A", ".lora_B", ".lora_down", ".lora_up", ".alpha", ".diff"):
                if cut in rest:
                    module, suffix = rest.split(cut, 1)[0], cut[1:] + rest.split(cut, 1)[1]
                    break
            out[f"diffusion_model.{original_name(module)}.{suffix}"] = value
        else:
            dotted = _dotted(module)
            out[f"diffusion_model.{original_name(dotted)}.{suffix}"] = value
    return out


_DIFFUSERS_DOTTED = re.compile(r"^(blocks)_(\d+)_(attn1|attn2|ffn)_(.+)$")


def _dotted(under: str) -> str:
    """`blocks_0_attn1_to_out_0` -> `blocks.0.attn1.to_out.0` (diffusers' Wan names, underscored)."""
    m = _DIFFUSERS_DOTTED.match(under)
    if m:
        tail = {"to_out_0": "to_out.0", "net_0_proj": "net.0.proj", "net_2": "net.2"}.get(m.group(4), m.group(4))
        return f"{m.group(1)}.{m.group(2)}.{m.group(3)}.{tail}"
    table = {"condition_embedder_time_proj": "condition_embedder.time_proj", "proj_out": "proj_out"}
    for part in ("text_embedder", "time_embedder"):
        for n in (1, 2):
            table[f"condition_embedder_{part}_linear_{n}"] = f"condition_embedder.{part}.linear_{n}"
    return table[under]


def text_encoder(clip, rank: int = 4, alpha: float = 2.0, seed: int = 0, prefix: str = "text_encoders.umt5xxl.transformer.",
                 underscored: bool = False) -> dict:
    """Every Linear of the UMT5's blocks: ComfyUI's generic `text_encoders.umt5xxl.transformer.encoder.block.0.layer.0.
    SelfAttention.q` (default), or `<prefix><path _>` with `underscored` (`lora_te_encoder_block_0_...`)."""
    encoder = clip.cond_stage_model.umt5xxl.transformer
    layers = dw.linear_layers(encoder, include=("encoder.block.",))
    name = (lambda p: prefix + p.replace(".", "_")) if underscored else (lambda p: prefix + p)
    return dw.lora_pairs(layers, name, rank, alpha, seed)
