"""The Wan family: Wan 2.1 T2V 14B and 1.3B, Wan 2.1 I2V 14B, Wan 2.2 T2V-A14B / I2V-A14B (each expert, high
noise and low noise, has the 2.1 14B shapes) and Wan 2.2 TI2V-5B (48-channel VAE).

Canonical names are ComfyUI's (comfy/ldm/wan/model.py, the original Wan-Video module names, which musubi-tuner,
diffusion-pipe, ai-toolkit's `convert_to_original`, lightx2v and DiffSynth write too). The tree, d = dim:

* `blocks.N` (14B: 40, 1.3B / 5B: 30): `self_attn.q` / `k` / `v` / `o` (d x d) with RMSNorms `self_attn.norm_q` /
  `norm_k`; `norm3` (the affine LayerNorm before cross-attention); `cross_attn.q` / `k` / `v` / `o` (+ `norm_q` /
  `norm_k`), and in Wan 2.1 I2V the image branch `cross_attn.k_img` / `v_img` / `norm_k_img`; `ffn.0` (ffn x d),
  `ffn.2`; `modulation`, a **parameter** [1, 6, d] (shift, scale, gate of self-attention, then of the FFN), not a
  Linear. **Nothing is fused**: no row parts anywhere.
* top level: `patch_embedding` (a Conv3d, kernel (1, 2, 2)), `text_embedding.0` / `.2` (4096 -> d),
  `time_embedding.0` / `.2`, `time_projection.1` (6d), `head.head`, `head.modulation` (a parameter [1, 2, d]:
  shift, scale); Wan 2.1 I2V adds the CLIP-image projection `img_emb.proj.0` (LayerNorm) / `.1` / `.3` / `.4`
  (LayerNorm).

Writers and their names (tests/wan_writers.py cites each rule's source):

* ComfyUI native, diffusion-pipe ("ComfyUI format", PEFT on the original modules + `diffusion_model.`), ai-toolkit
  (`wan_lora_convert.py::convert_to_original`), lightx2v distill LoRAs: `diffusion_model.<path>` (lora_A/B or
  lora_down/up, + `.alpha`); full diffs `.diff` / `.diff_b`, and lightx2v's modulation diff `blocks.N.diff_m`
  (read as `blocks.N.modulation.diff`; core 0.3.75 drops it);
* musubi-tuner (`networks/lora_wan.py`, prefix `lora_unet`): `lora_unet_<path _>`; Wan-Fun / VideoX-Fun:
  `lora_unet__<path _>` (core's `convert_lora_wan_fun`); LyCORIS' wrapper on the ComfyUI model: `lycoris_<path _>`;
* DiffSynth-Studio and some official LoRAs: bare `<path>` (DiffSynth with PEFT's `.lora_A.default.weight`);
* diffusers / PEFT (`WanPipeline.save_lora_weights`, WanTransformer3DModel): `transformer.<diffusers path>`:
  `blocks.N.attn1.to_q` / `to_k` / `to_v` / `to_out.0` (self-attention), `attn2.*` (cross-attention; `add_k_proj`
  / `add_v_proj` / `norm_added_k` = `k_img` / `v_img` / `norm_k_img`), `ffn.net.0.proj` / `ffn.net.2`, `norm2` (=
  ComfyUI's `norm3`), `scale_shift_table` (= `modulation`, same row order), `condition_embedder.text_embedder.
  linear_1/2`, `time_embedder.linear_1/2`, `time_proj`, `image_embedder.ff.net.0.proj` / `ff.net.2` / `norm1` /
  `norm2`, `proj_out` (= `head.head`), top-level `scale_shift_table` (= `head.modulation`); also bare and
  `base_model.model.`; OneTrainer-style `lora_transformer_<diffusers path _>`; SimpleTuner LyCORIS `lycoris_<
  diffusers path _>`. Core 0.3.75 has no Wan branch: none of these, bare names, nor `lycoris_` load there.

Text encoder: UMT5-XXL (te1, ComfyUI's `umt5xxl`, comfy/text_encoders/wan.py; T5 naming `encoder.block.N.layer.0.
SelfAttention.q`). Core maps it only as `text_encoders.umt5xxl.transformer.<path>` (its `lora_te*` aliases are for
`t5xxl` only); we read `lora_te_` / `lora_te1_` / `text_encoder.` too. No trainer in the sources trains it.

Variants from the structure (ComfyUI model_detection.py reads the same tensors): `head.head` rows / 4 = 48 ->
TI2V-5B; `img_emb` / `k_img` -> 2.1 I2V 14B; patch in-channels 36 without `img_emb` -> 2.2 I2V-A14B; d 1536 ->
2.1 1.3B; otherwise T2V 14B (2.1 T2V-14B and each 2.2 T2V-A14B expert are the same model to a LoRA). musubi writes
`ss_base_model_version` `wan` and `modelspec.architecture` `wan2.1/lora` for all of them; ai-toolkit `wan_2.1`,
`wan_2.2_14b`, `wan_2.2_5b`. Which 2.2 expert a file is for is only in musubi's `modelspec.timestep_range` or the
file name (lora_core.pairs).

Variants of other Wan model classes (ComfyUI 0.3.75 comfy/ldm/wan/model.py, model_animate.py; model_detection.py
sets `model_type` from the marker tensors below; each keeps the base Wan tree above and adds modules):

* VACE (`VaceWanModel`, marker `vace_patch_embedding`): `vace_blocks.N` (14B: 8, 1.3B: 15; ComfyUI counts them),
  each a Wan block (`self_attn`, `cross_attn`, `ffn`, `norm3`, `modulation`) plus `after_proj` and, in block 0,
  `before_proj`; `vace_patch_embedding` (Conv3d, 96 channels in). diffusers' WanVACETransformer3DModel names them
  `vace_blocks.N.attn1.to_q` ..., `proj_in` (= before_proj), `proj_out` (= after_proj), `scale_shift_table`.
  DiffSynth-Studio trains VACE LoRAs on its VACE model (`--lora_base_model vace`, targets `q,k,v,o,ffn.0,ffn.2`,
  examples/wanvideo/model_training/lora/Wan2.2-VACE-Fun-A14B.sh), saved bare: `vace_blocks.0.self_attn.q.lora_A.
  weight`.
* Fun Camera (`CameraWanModel`, marker `control_adapter.conv`; 2.1 with the CLIP-image branch, `camera_2.2`
  without): `control_adapter.conv` (Conv2d), `control_adapter.residual_blocks.0.conv1` / `conv2`.
* S2V (`WanModel_S2V`, marker `casual_audio_encoder.encoder.final_linear`): `casual_audio_encoder.*`,
  `audio_injector.*`, `cond_encoder`, `trainable_cond_mask`, `frame_packer.*`.
* HuMo (`HumoWanModel`, marker `audio_proj.audio_proj_glob_1.layer`): per block `blocks.N.audio_cross_attn_wrapper.
  audio_cross_attn.{q,k,v,o,norm_q,norm_k}` and `norm1_audio`; `audio_proj.*`.
* Animate (`AnimateWanModel`, marker `face_adapter.fuser_blocks.0.k_norm`): `face_adapter.*`, `face_encoder.*`,
  `motion_encoder.*`, `pose_patch_embedding`.

VACE blocks and the camera and HuMo modules are described from the structure; every other tensor of a host that
the tree above does not describe (S2V's and Animate's adapters, FLF2V's `img_emb.emb_pos`, `ref_conv`) becomes a
module of its own, read from the host's keys (`WanSpec.extras`), named natively (`diffusion_model.<key>`, bare,
`lora_unet_`, `lycoris_`): a LoRA or full diff on it applies instead of being reported unmatched. Core reads the
`diffusion_model.` / `lora_unet_` forms of all of them (its generic map); no trainer in the sources trains them
but DiffSynth's VACE blocks.

Blocks: `TE1`, `IN` (patch / text / time embeddings, time_projection, img_emb; VACE's patch embedding),
`B00`-`B39` (1.3B / 5B: `B00`-`B29`; `B` is the group of all), `OUT` (head.head, head.modulation). Inspire Pack routes `blocks.` to its
BASE (no slots) and sends `text_embedding` keys to the CLIP, where they are lost; hako-mikan's A1111 extension has
no Wan layout: use named syntax (`B00-B19=0.5`, `B*.cross_attn=0`). VACE variants add `V00`-`V07` (1.3B:
`V00`-`V14`; group `V`), the camera / S2V / HuMo / Animate variants `AUX` (their adapters; HuMo's audio
attention stays in its block, kind `audio_attn`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Mapping, Optional, Sequence

from ..family import Alias, ArchSpec, BlockLayout, ComponentSpec, Family, ModuleDef, TrainSpec
from ..text_encoders import TextEncoderSpec, register_encoder

UMT5_XXL = register_encoder(TextEncoderSpec("UMT5-XXL", "umt5xxl", 4096, 24, 24, 10240, 64, kind="t5"))

BASE, IN, OUT, BLOCKS, VACE, AUX = "BASE", "IN", "OUT", "B", "V", "AUX"
HEAD = 128   # ComfyUI's detector: num_heads = dim / 128

ELEMENT_KINDS = (
    "self_attn", "cross_attn",     # blocks.N.self_attn.{q,k,v,o} / cross_attn.{q,k,v,o}
    "img_attn",                    # Wan 2.1 I2V's image cross-attention cross_attn.k_img / v_img
    "ffn",                         # blocks.N.ffn.0 / ffn.2
    "mod",                         # blocks.N.modulation (a parameter)
    "norm",                        # RMS q/k norms, norm3 (LayerNorm), img_emb's LayerNorms
    "patch_embed", "text_embed", "time_embed", "time_proj", "img_emb",   # IN
    "head", "head_mod",            # OUT: head.head, head.modulation
    "te_attn", "te_mlp", "te_embed", "proj",   # text encoder
    "vace_proj", "vace_embed",     # VACE: vace_blocks.N.before_proj / after_proj, vace_patch_embedding
    "audio_attn",                  # HuMo: blocks.N.audio_cross_attn_wrapper.audio_cross_attn
    "control", "audio", "cond", "face", "motion", "pose", "adapter",   # AUX: the variants' adapters
)
ELEMENT_GROUPS: dict[str, frozenset] = {kind: frozenset([kind]) for kind in ELEMENT_KINDS}
ELEMENT_GROUPS.update({
    "attn": frozenset({"self_attn", "cross_attn", "img_attn", "te_attn", "audio_attn"}),
    "mlp": frozenset({"ffn", "te_mlp"}),
    "modulation": frozenset({"mod", "time_proj", "head_mod"}),
    "embed": frozenset({"patch_embed", "text_embed", "time_embed", "img_emb", "te_embed", "vace_embed"}),
})
# ComfyUI model_detection.py's marker tensor per model_type, in its order
MODEL_TYPE_MARKERS = (("vace", "vace_patch_embedding.weight"), ("camera", "control_adapter.conv.weight"),
                      ("s2v", "casual_audio_encoder.encoder.final_linear.weight"),
                      ("humo", "audio_proj.audio_proj_glob_1.layer.bias"),
                      ("animate", "face_adapter.fuser_blocks.0.k_norm.weight"))
# leading words of the variants' adapter modules -> element kind (block AUX)
AUX_KINDS = (("control_adapter", "control"), ("casual_audio_encoder", "audio"), ("audio_injector", "audio"),
             ("audio_proj", "audio"), ("cond_encoder", "cond"), ("trainable_cond_mask", "cond"),
             ("frame_packer", "cond"), ("face_adapter", "face"), ("face_encoder", "face"),
             ("motion_encoder", "motion"), ("pose_patch_embedding", "pose"))
VACE_PROJ = (("before_proj", "proj_in"), ("after_proj", "proj_out"))   # original -> diffusers, in vace_blocks.N
HUMO_AUDIO = (("audio_cross_attn_wrapper.audio_cross_attn.q", "audio_attn"),
              ("audio_cross_attn_wrapper.audio_cross_attn.k", "audio_attn"),
              ("audio_cross_attn_wrapper.audio_cross_attn.v", "audio_attn"),
              ("audio_cross_attn_wrapper.audio_cross_attn.o", "audio_attn"),
              ("audio_cross_attn_wrapper.audio_cross_attn.norm_q", "norm"),
              ("audio_cross_attn_wrapper.audio_cross_attn.norm_k", "norm"),
              ("audio_cross_attn_wrapper.norm1_audio", "norm"))
# adapters described from the structure (so a full-size layout has them without a host), the rest read off a host
AUX_MODULES = {"s2v": (("cond_encoder", "cond"), ("trainable_cond_mask", "cond"),
                       ("casual_audio_encoder.encoder.final_linear", "audio")),
               "humo": (("audio_proj.audio_proj_glob_1.layer", "audio"),
                        ("audio_proj.audio_proj_glob_2.layer", "audio"),
                        ("audio_proj.audio_proj_glob_3.layer", "audio")),
               "animate": (("pose_patch_embedding", "pose"), ("face_encoder.out_proj", "face"))}
CAMERA_MODULES = ("control_adapter.conv", "control_adapter.residual_blocks.0.conv1",
                  "control_adapter.residual_blocks.0.conv2")

# (path inside blocks.N, element kind, diffusers path inside blocks.N, i2v only)
BLOCK_MODULES = (
    ("self_attn.q", "self_attn", "attn1.to_q", False), ("self_attn.k", "self_attn", "attn1.to_k", False),
    ("self_attn.v", "self_attn", "attn1.to_v", False), ("self_attn.o", "self_attn", "attn1.to_out.0", False),
    ("self_attn.norm_q", "norm", "attn1.norm_q", False), ("self_attn.norm_k", "norm", "attn1.norm_k", False),
    ("norm3", "norm", "norm2", False),
    ("cross_attn.q", "cross_attn", "attn2.to_q", False), ("cross_attn.k", "cross_attn", "attn2.to_k", False),
    ("cross_attn.v", "cross_attn", "attn2.to_v", False), ("cross_attn.o", "cross_attn", "attn2.to_out.0", False),
    ("cross_attn.norm_q", "norm", "attn2.norm_q", False), ("cross_attn.norm_k", "norm", "attn2.norm_k", False),
    ("cross_attn.k_img", "img_attn", "attn2.add_k_proj", True), ("cross_attn.v_img", "img_attn", "attn2.add_v_proj", True),
    ("cross_attn.norm_k_img", "norm", "attn2.norm_added_k", True),
    ("ffn.0", "ffn", "ffn.net.0.proj", False), ("ffn.2", "ffn", "ffn.net.2", False),
)
# (canonical path, block, kind, diffusers path, i2v only)
TOP_MODULES = (
    ("patch_embedding", IN, "patch_embed", "patch_embedding", False),
    ("text_embedding.0", IN, "text_embed", "condition_embedder.text_embedder.linear_1", False),
    ("text_embedding.2", IN, "text_embed", "condition_embedder.text_embedder.linear_2", False),
    ("time_embedding.0", IN, "time_embed", "condition_embedder.time_embedder.linear_1", False),
    ("time_embedding.2", IN, "time_embed", "condition_embedder.time_embedder.linear_2", False),
    ("time_projection.1", IN, "time_proj", "condition_embedder.time_proj", False),
    ("img_emb.proj.0", IN, "norm", "condition_embedder.image_embedder.norm1", True),
    ("img_emb.proj.1", IN, "img_emb", "condition_embedder.image_embedder.ff.net.0.proj", True),
    ("img_emb.proj.3", IN, "img_emb", "condition_embedder.image_embedder.ff.net.2", True),
    ("img_emb.proj.4", IN, "norm", "condition_embedder.image_embedder.norm2", True),
    ("head.head", OUT, "head", "proj_out", False),
)
MODULATION = "modulation"   # the parameter name of blocks.N.modulation and head.modulation
DIFFUSERS_PREFIXES = ("transformer.", "", "base_model.model.", "transformer.base_model.model.")
_WRITER_PREFIXES = (r"(?:diffusion_model\.|model\.diffusion_model\.|transformer\.|base_model\.model\.|"
                    r"transformer\.base_model\.model\.|lora_unet__?|lycoris_|lora_transformer_)?")


@dataclass(frozen=True)
class WanSpec:
    """Structure of a Wan transformer: width `dim`, blocks, FFN width, latent channels in / out, the text
    encoder's width, and whether it has Wan 2.1 I2V's image branch (img_emb, cross_attn.k_img / v_img)."""

    dim: int = 5120
    depth: int = 40
    ffn: int = 13824
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    i2v: bool = False
    img_dim: int = 1280
    model_type: str = "t2v"       # ComfyUI's: t2v, i2v, vace, camera, camera_2.2, s2v, humo, animate
    vace_layers: int = 0
    vace_in_dim: int = 96
    # (key, rows) of host tensors the tree does not describe (see the module docstring); rows 0 = not a matrix
    extras: tuple = ()

    @property
    def has_aux(self) -> bool:
        return self.model_type in ("camera", "camera_2.2", "s2v", "humo", "animate")

    @classmethod
    def from_comfy_config(cls, config: Mapping) -> "WanSpec":
        return cls(dim=int(config.get("dim", 5120)), depth=int(config.get("num_layers", 40)),
                   ffn=int(config.get("ffn_dim", 13824)), in_dim=int(config.get("in_dim", 16)),
                   out_dim=int(config.get("out_dim", 16)), text_dim=int(config.get("text_dim", 4096)),
                   freq_dim=int(config.get("freq_dim", 256)), i2v=config.get("model_type") == "i2v"
                   and int(config.get("in_dim", 16)) != 48, model_type=str(config.get("model_type", "t2v")),
                   vace_layers=int(config.get("vace_layers") or 0),
                   vace_in_dim=int(config.get("vace_in_dim") or 96))


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys for m in [rx.match(k)] if m}
    return max(found) + 1 if found else 0


def spec_from_keys(keys: Sequence[str], shapes: Optional[Mapping[str, tuple]],
                   config: Optional[Mapping] = None) -> Optional[WanSpec]:
    """WanSpec of a ComfyUI / original Wan state dict given without prefix (ComfyUI's marker: `head.modulation`,
    with the blocks' `self_attn.q`), else None. Sizes from the shapes as model_detection.py reads them, else from
    ComfyUI's `unet_config`, else the 14B's."""
    keyset = set(keys)
    if "head.modulation" not in keyset or "blocks.0.self_attn.q.weight" not in keyset:
        return None
    shapes = shapes or {}
    base = WanSpec.from_comfy_config(config) if config else WanSpec()

    def dim(key: str, axis: int, default: int) -> int:
        return int(shapes[key][axis]) if key in shapes else default

    width = dim("head.modulation", -1, base.dim)
    head = shapes.get("head.head.weight")
    out_dim = int(head[0]) // 4 if head is not None else base.out_dim
    i2v = "blocks.0.cross_attn.k_img.weight" in keyset
    model_type = next((t for t, marker in MODEL_TYPE_MARKERS if marker in keyset), "i2v" if i2v else "t2v")
    if model_type == "camera" and "img_emb.proj.0.bias" not in keyset:
        model_type = "camera_2.2"
    spec = WanSpec(dim=width, depth=_count(keyset, r"blocks\.(\d+)\."), ffn=dim("blocks.0.ffn.0.weight", 0, base.ffn),
                   in_dim=dim("patch_embedding.weight", 1, base.in_dim), out_dim=out_dim,
                   text_dim=dim("text_embedding.0.weight", 1, base.text_dim),
                   freq_dim=dim("time_embedding.0.weight", 1, base.freq_dim), i2v=i2v,
                   img_dim=dim("img_emb.proj.1.weight", 1, 1280), model_type=model_type,
                   vace_layers=_count(keyset, r"vace_blocks\.(\d+)\."),
                   vace_in_dim=dim("vace_patch_embedding.weight", 1, base.vace_in_dim))
    return replace(spec, extras=_extras(spec, keyset, shapes))


def _extras(spec: "WanSpec", keyset: set, shapes: Mapping) -> tuple:
    """(key, rows) of the host's tensors that `FAMILY.modules(spec)` does not describe: each `.weight`, and each
    other tensor whose module has no weight (a bias or norm beside a weight is that module's parameter)."""
    described = {m.key for m in FAMILY.modules(spec)}
    paths = {m.path for m in FAMILY.modules(spec) if m.param == "weight"}
    out = []
    for key in sorted(keyset - described):
        parent = key.rpartition(".")[0]
        if key.endswith(".weight"):
            if parent in paths:
                continue
            shape = shapes.get(key)
            out.append((key, int(shape[0]) if shape is not None and len(shape) >= 2 else 0))
        elif parent not in paths and parent + ".weight" not in keyset:
            out.append((key, 0))
    return tuple(out)


def spec_from_diffusers(keys: Sequence[str], shapes: Optional[Mapping[str, tuple]]) -> Optional[WanSpec]:
    """WanSpec of diffusers' WanTransformer3DModel (`blocks.0.attn1.to_q`, `condition_embedder.time_proj`)."""
    keyset = set(keys)
    if "blocks.0.attn1.to_q.weight" not in keyset or "condition_embedder.time_proj.weight" not in keyset \
            or "scale_shift_table" not in keyset:
        return None
    shapes = shapes or {}

    def dim(key: str, axis: int, default: int) -> int:
        return int(shapes[key][axis]) if key in shapes else default

    width = dim("scale_shift_table", -1, 5120)
    vace = "vace_patch_embedding.weight" in keyset
    i2v = "blocks.0.attn2.add_k_proj.weight" in keyset
    return WanSpec(dim=width, depth=_count(keyset, r"blocks\.(\d+)\."),
                   model_type="vace" if vace else "i2v" if i2v else "t2v",
                   vace_layers=_count(keyset, r"vace_blocks\.(\d+)\."),
                   vace_in_dim=dim("vace_patch_embedding.weight", 1, 96),
                   ffn=dim("blocks.0.ffn.net.0.proj.weight", 0, 13824), in_dim=dim("patch_embedding.weight", 1, 16),
                   out_dim=dim("proj_out.weight", 0, 64) // 4,
                   text_dim=dim("condition_embedder.text_embedder.linear_1.weight", 1, 4096),
                   freq_dim=dim("condition_embedder.time_embedder.linear_1.weight", 1, 256),
                   i2v="blocks.0.attn2.add_k_proj.weight" in keyset,
                   img_dim=dim("condition_embedder.image_embedder.ff.net.0.proj.weight", 1, 1280))


def _block(i: int) -> str:
    return f"B{i:02d}"


def _vace_block(i: int) -> str:
    return f"V{i:02d}"


def _extra_place(key: str, spec: "WanSpec") -> tuple[str, str]:
    """(block, element kind) of a host tensor read into `WanSpec.extras`."""
    m = re.match(r"blocks\.(\d+)\.", key)
    if m:
        return _block(int(m.group(1))), "audio_attn" if "audio" in key else "norm" if "norm" in key else "adapter"
    if key.startswith(("img_emb.", "ref_conv.")):
        return IN, "img_emb" if key.startswith("img_emb.") else "patch_embed"
    kind = next((k for word, k in AUX_KINDS if key.startswith(word + ".") or key == word), "adapter")
    return (AUX if spec.has_aux else IN), kind


class WanFamily(Family):
    name = "wan"
    title = "Wan 2.1 / 2.2 (T2V 14B / 1.3B, I2V 14B, A14B experts, TI2V-5B)"
    denoiser = "transformer"
    # Names only Wan uses. The diffusers forms are anchored at the start: an SD UNet's diffusers names hold
    # `...transformer_blocks.0.attn1.to_q`, which must not read as Wan's `blocks.0.attn1`.
    markers = (
        (r"(^|[._])(self_attn|cross_attn)[._](q|k|v|o|k_img|v_img|norm_q|norm_k|norm_k_img)$",
         "Wan (self_attn / cross_attn)"),
        (r"(^|[._])blocks[._]\d+[._]ffn[._][02]$", "Wan (blocks.N.ffn)"),
        (r"(^|[._])(text_embedding|time_embedding|time_projection)[._]\d$", "Wan (text / time embedding)"),
        (r"^" + _WRITER_PREFIXES + r"head[._]head$", "Wan (head.head)"),
        (r"^" + _WRITER_PREFIXES + r"blocks[._]\d+[._](attn1|attn2)[._](to_q|to_k|to_v|to_out[._]0|add_k_proj|"
         r"add_v_proj)$", "Wan (diffusers blocks.N.attn1 / attn2)"),
        (r"^" + _WRITER_PREFIXES + r"condition_embedder[._]", "Wan (diffusers condition_embedder)"),
        (r"^" + _WRITER_PREFIXES + r"vace_(blocks[._]\d+|patch_embedding)", "Wan VACE (vace_blocks)"),
    )
    # ai-toolkit's `wan_2.1` / `wan_2.2_14b` and musubi's `wan` / `wan2.1` name the family (musubi's for 2.2 as
    # well), not the size: the variant then comes from the file's shapes, among Wan's.
    metadata_match = ("wan",)

    def __init__(self):
        self._layouts: dict[str, BlockLayout] = {}
        components = {
            "transformer": ComponentSpec("transformer", ""),
            "te1": ComponentSpec("te1", "TE1", UMT5_XXL, ("lora_te_", "lora_te1_"), "text_encoder."),
        }

        def variant(name, title, short, aliases, spec, layout_key, match=(), model_type=""):
            # musubi-tuner's strings (dataset/architectures.py, utils/sai_model_spec.py) for every Wan; musubi's
            # header does not tell the 5B from the 14B, so a 5B file also names its variant in `ss_model_type`
            # (one of the variant's `match` strings, which arch_of_metadata reads)
            return ArchSpec(name=name, title=title, family=self, config=spec, components=components,
                            aliases=aliases, layout_key=layout_key,
                            metadata={"ss_base_model_version": "wan", "modelspec.architecture": "wan2.1",
                                      "modelspec.implementation": "https://github.com/Wan-Video/Wan2.1",
                                      "ss_network_module": "networks.lora_wan", "resolution": 720, "short": short,
                                      "match": match, **({"ss_model_type": model_type} if model_type else {})})

        self.T2V_14B = variant("Wan-T2V-14B", "Wan 2.1 T2V 14B / Wan 2.2 T2V-A14B", "Wan T2V 14B",
                               ("wan", "wan2.1", "wan21", "wan2.1-t2v-14b", "wan-t2v-14b", "wan2.2-t2v-a14b",
                                "wan22-t2v"), WanSpec(), "wan_40")
        self.I2V_14B = variant("Wan2.1-I2V-14B", "Wan 2.1 I2V 14B", "Wan 2.1 I2V 14B",
                               ("wan2.1-i2v-14b", "wan21-i2v", "wan-i2v"), WanSpec(in_dim=36, i2v=True), "wan_40",
                               ("wan2.1-i2v", "wan2.1_i2v", "wan_2.1_i2v"))
        self.I2V_A14B = variant("Wan2.2-I2V-A14B", "Wan 2.2 I2V-A14B", "Wan 2.2 I2V-A14B",
                                ("wan2.2-i2v-a14b", "wan22-i2v"), WanSpec(in_dim=36), "wan_40",
                                ("wan2.2-i2v", "wan2.2_i2v", "wan_2.2_i2v"))
        self.T2V_1_3B = variant("Wan2.1-T2V-1.3B", "Wan 2.1 T2V 1.3B", "Wan 2.1 1.3B",
                                ("wan2.1-t2v-1.3b", "wan-1.3b", "wan21-1.3b", "wan1.3b"),
                                WanSpec(dim=1536, depth=30, ffn=8960), "wan_30", ("wan2.1-t2v-1.3b", "wan_2.1_1.3b"))
        self.TI2V_5B = variant("Wan2.2-TI2V-5B", "Wan 2.2 TI2V-5B", "Wan 2.2 5B",
                               ("wan2.2-ti2v-5b", "wan22-5b", "wan-5b", "wan2.2-5b"),
                               WanSpec(dim=3072, depth=30, ffn=14336, in_dim=48, out_dim=48), "wan_30",
                               ("wan_2.2_5b", "wan2.2-ti2v-5b", "wan2.2_5b"), model_type="wan2.2-ti2v-5b")
        self.VACE_14B = variant("Wan2.1-VACE-14B", "Wan VACE 14B", "Wan VACE 14B",
                                ("wan2.1-vace-14b", "wan-vace", "wan-vace-14b", "wan2.2-vace-fun-a14b"),
                                WanSpec(model_type="vace", vace_layers=8), "wan_vace_40")
        self.VACE_1_3B = variant("Wan2.1-VACE-1.3B", "Wan VACE 1.3B", "Wan VACE 1.3B",
                                 ("wan2.1-vace-1.3b", "wan-vace-1.3b"),
                                 WanSpec(dim=1536, depth=30, ffn=8960, model_type="vace", vace_layers=15),
                                 "wan_vace_30")
        self.CAMERA = variant("Wan2.1-Fun-Camera-14B", "Wan 2.1 Fun Camera (Control Camera)", "Wan 2.1 Fun Camera",
                              ("wan2.1-fun-camera", "wan-fun-camera"),
                              WanSpec(in_dim=32, i2v=True, model_type="camera"), "wan_aux_40")
        self.CAMERA_22 = variant("Wan2.2-Fun-Camera-A14B", "Wan 2.2 Fun Camera (Control Camera) A14B",
                                 "Wan 2.2 Fun Camera", ("wan2.2-fun-camera", "wan2.2-fun-a14b-control-camera"),
                                 WanSpec(in_dim=36, model_type="camera_2.2"), "wan_aux_40")
        self.S2V = variant("Wan2.2-S2V-14B", "Wan 2.2 S2V 14B", "Wan 2.2 S2V", ("wan2.2-s2v-14b", "wan-s2v"),
                           WanSpec(model_type="s2v"), "wan_aux_40")
        self.HUMO = variant("Wan-HuMo", "Wan HuMo (17B / 1.7B)", "Wan HuMo", ("humo", "wan-humo"),
                            WanSpec(model_type="humo"), "wan_aux_40")
        self.ANIMATE = variant("Wan2.2-Animate-14B", "Wan 2.2 Animate 14B", "Wan 2.2 Animate",
                               ("wan2.2-animate-14b", "wan-animate"),
                               WanSpec(in_dim=36, i2v=True, model_type="animate"),
                               "wan_aux_40")
        self.variants = (self.T2V_14B, self.I2V_14B, self.I2V_A14B, self.T2V_1_3B, self.TI2V_5B, self.VACE_14B,
                         self.VACE_1_3B, self.CAMERA, self.CAMERA_22, self.S2V, self.HUMO, self.ANIMATE)

    # ----------------------------------------------------------------------------- recognition
    def variant_of_spec(self, spec: WanSpec) -> ArchSpec:
        by_type = {"vace": self.VACE_1_3B if spec.dim == 1536 else self.VACE_14B, "camera": self.CAMERA,
                   "camera_2.2": self.CAMERA_22, "s2v": self.S2V, "humo": self.HUMO, "animate": self.ANIMATE}
        if spec.model_type in by_type:
            return by_type[spec.model_type]
        if spec.out_dim == 48:
            return self.TI2V_5B
        if spec.i2v:
            return self.I2V_14B
        if spec.in_dim == 36:
            return self.I2V_A14B
        if spec.dim == 1536:
            return self.T2V_1_3B
        return self.T2V_14B

    def detect_host(self, keys, shapes, config=None, config_name=""):
        spec = spec_from_keys(keys, shapes, config if config and config.get("image_model") == "wan2.1" else None)
        if spec is None:
            return None
        return self.variant_of_spec(spec), spec

    def detect_diffusers(self, keys, shapes):
        spec = spec_from_diffusers(keys, shapes)
        return (self.variant_of_spec(spec), spec) if spec is not None else None

    def variant_of_clip(self, comfy_names: set) -> Optional[ArchSpec]:
        return self.T2V_14B if comfy_names == {UMT5_XXL.comfy_name} else None

    def clip_components(self, comfy_names: set, variant: Optional[ArchSpec]) -> dict[str, str]:
        return {UMT5_XXL.comfy_name: "te1"}

    # ----------------------------------------------------------------------------- modules
    def modules(self, spec: WanSpec, variant=None) -> list[ModuleDef]:
        d = spec.dim
        rows = {"patch_embedding": d, "text_embedding.0": d, "text_embedding.2": d, "time_embedding.0": d,
                "time_embedding.2": d, "time_projection.1": 6 * d, "img_emb.proj.1": spec.img_dim,
                "img_emb.proj.3": d, "head.head": 4 * spec.out_dim}
        out = [ModuleDef(path, block, kind, rows.get(path, 0)) for path, block, kind, _, i2v in TOP_MODULES
               if not i2v or spec.i2v]
        head = out.pop()   # head.head goes last, after the blocks
        for i in range(spec.depth):
            for sub, kind, _, i2v in BLOCK_MODULES:
                if i2v and not spec.i2v:
                    continue
                width = spec.ffn if sub == "ffn.0" else 0 if kind == "norm" else d
                out.append(ModuleDef(f"blocks.{i}.{sub}", _block(i), kind, width))
            if spec.model_type == "humo":
                out += [ModuleDef(f"blocks.{i}.{sub}", _block(i), kind, 0 if kind == "norm" else d)
                        for sub, kind in HUMO_AUDIO]
            out.append(ModuleDef(f"blocks.{i}", _block(i), "mod", param=MODULATION))
        if spec.vace_layers:
            out.append(ModuleDef("vace_patch_embedding", IN, "vace_embed", d))
        for i in range(spec.vace_layers):
            block, p = _vace_block(i), f"vace_blocks.{i}"
            for sub, kind, _, i2v in BLOCK_MODULES:
                if not i2v:
                    out.append(ModuleDef(f"{p}.{sub}", block, kind, spec.ffn if sub == "ffn.0" else 0 if kind == "norm"
                                         else d))
            out += [ModuleDef(f"{p}.{sub}", block, "vace_proj", d) for sub, _ in VACE_PROJ
                    if sub != "before_proj" or i == 0]
            out.append(ModuleDef(p, block, "mod", param=MODULATION))
        if spec.model_type in ("camera", "camera_2.2"):
            out += [ModuleDef(path, AUX, "control", d) for path in CAMERA_MODULES]
        out += [ModuleDef(path, AUX, kind) for path, kind in AUX_MODULES.get(spec.model_type, ())]
        for key, rows in spec.extras:
            block, kind = _extra_place(key, spec)
            if key.endswith(".weight"):
                out.append(ModuleDef(key[:-len(".weight")], block, kind, rows))
            else:   # a tensor of its own (padding tokens, emb_pos, a kernel): named by its key
                out.append(ModuleDef(key, block, kind, param=""))
        out += [head, ModuleDef("head", OUT, "head_mod", param=MODULATION)]
        return out

    def _diffusers_name(self, module: ModuleDef) -> Optional[str]:
        """diffusers' name (WanTransformer3DModel, WanVACETransformer3DModel), None where diffusers has none."""
        if module.param == MODULATION:   # diffusers' scale_shift_table: the same rows in the same order
            return "scale_shift_table" if module.path == "head" else f"{module.path}.scale_shift_table"
        if module.param != "weight":
            return None
        m = re.match(r"(blocks|vace_blocks)\.(\d+)\.(.+)$", module.path)
        if m:
            sub = m.group(3)
            dif = next((d for s, _, d, _ in BLOCK_MODULES if s == sub), None) or \
                (dict(VACE_PROJ).get(sub) if m.group(1) == "vace_blocks" else None)
            return f"{m.group(1)}.{m.group(2)}.{dif}" if dif else None
        if module.path == "vace_patch_embedding":
            return module.path
        return next((dif for path, _, _, dif, _ in TOP_MODULES if path == module.path), None)

    def aliases(self, module: ModuleDef, spec: WanSpec, variant=None) -> list[Alias]:
        if module.param == MODULATION:
            # a parameter: ComfyUI names it by its full key (`diffusion_model.blocks.0.modulation`); diffusers'
            # scale_shift_table; the underscored forms of both
            path, dif = f"{module.path}.{MODULATION}", self._diffusers_name(module)
            under = path.replace(".", "_")
            names = [f"diffusion_model.{path}", f"model.diffusion_model.{path}", path, f"lora_unet_{under}",
                     f"lycoris_{under}"] + [p + dif for p in DIFFUSERS_PREFIXES] + \
                    [p + dif.replace(".", "_") for p in ("lora_transformer_", "lycoris_")]
            return [Alias(n) for n in dict.fromkeys(names)]
        out = self.native_aliases(module.path)
        if module.param == "":   # a tensor of its own: its native names only
            return out
        out.append(Alias("lora_unet__" + module.path.replace(".", "_")))   # Wan-Fun (core: convert_lora_wan_fun)
        dif = self._diffusers_name(module)
        if dif is not None:
            out += self.diffusers_aliases(dif, prefixes=DIFFUSERS_PREFIXES, underscored=("lora_transformer_",
                                                                                          "lycoris_"))
        # lycoris_ of the diffusers path equals lycoris_ of the native one only where the names agree
        # (patch_embedding): the first claim is the same target either way
        return out

    def diffusers_names(self, spec: WanSpec) -> dict:
        return {m.path: (self._diffusers_name(m),) for m in self.modules(spec)
                if m.param == "weight" and self._diffusers_name(m) is not None}

    def diffusers_host_pieces(self, spec: WanSpec, variant=None) -> dict:
        """diffusers key -> (canonical path, None (the whole tensor), param)."""
        out = {}
        for m in self.modules(spec):
            dif = self._diffusers_name(m)
            if dif is None:
                continue
            key = dif if m.param == MODULATION else f"{dif}.{m.param}"
            out[key] = (m.path, None, m.param)
        return out

    def export_name(self, target) -> Optional[str]:
        """A merged file's name for a modulation parameter: ComfyUI's generic full key (the one name core reads)."""
        if target.param == MODULATION:
            return f"diffusion_model.{target.path}.{MODULATION}"
        return super().export_name(target)

    def lora_votes(self, modules, variant, key_map) -> int:
        """+1 / -1 per block module whose input width is / is not this variant's (d; ffn.2: the FFN width), per
        FFN-in / patch-embedding whose rows or input channels fit / contradict it (1.3B: d 1536, ffn 8960; 5B:
        3072, 14336, 48 channels; 14B: 5120, 13824; I2V: 36 input channels)."""
        from ... import adapters

        votes = 0
        spec = variant.config
        for name, module in modules.items():
            target = key_map.resolve(name)
            if target is None or target.component != "transformer" or module.algo not in ("lora", "loha", "lokr",
                                                                                           "full"):
                continue
            try:
                shape = tuple(adapters.natural_shape(module))
            except Exception:
                continue
            if len(shape) < 2:
                continue
            if target.path == "patch_embedding":
                votes += 1 if shape[1] in (spec.in_dim, spec.in_dim * 4) else -1
                continue
            if not target.path.startswith(("blocks.", "vace_blocks.")) or "audio" in target.path:
                continue   # HuMo's audio attention reads the audio tokens' width
            wanted_in = spec.ffn if target.path.endswith("ffn.2") else spec.dim
            votes += 1 if shape[1] == wanted_in else -1
            if target.path.endswith("ffn.0"):
                votes += 1 if shape[0] == spec.ffn else -1
        return votes

    def preferred_variant(self, names):
        # the T2V 14B and the 2.2 I2V-A14B share every module but the patch embedding: without it (musubi's
        # default) nothing tells them apart, and T2V is the far more common target
        # (VACE: the 14B, the commoner; a file of the variants' own modules names its variant by them)
        for variant in (self.T2V_14B, self.T2V_1_3B, self.TI2V_5B, self.I2V_14B, self.VACE_14B, self.VACE_1_3B):
            if variant.name in names:
                return variant.name
        return None

    def denoiser_words(self):
        return ("blocks", "patch_embedding", "text_embedding", "time_embedding", "time_projection", "img_emb",
                "head", "condition_embedder", "proj_out", "scale_shift_table", "vace_blocks", "vace_patch_embedding",
                "control_adapter") + tuple(word for word, _ in AUX_KINDS[1:])

    def explain(self, km, name: str, rest: str) -> Optional[str]:
        spec = km.config
        if not isinstance(spec, WanSpec):
            return None
        title = km.arch.title if km.arch is not None else self.title
        m = re.match(r"blocks[._](\d+)[._]", rest)
        if m and int(m.group(1)) >= spec.depth:
            return (f"{name!r}: key for block {m.group(1)}, but this {title} model has {spec.depth} blocks "
                    f"(0-{spec.depth - 1}): this LoRA was made for a deeper model (Wan 14B and the 2.2 A14B "
                    "experts have 40, 1.3B and 5B 30)")
        m = re.match(r"vace_blocks[._](\d+)[._]", rest)
        if m and spec.vace_layers and int(m.group(1)) >= spec.vace_layers:
            return (f"{name!r}: key for VACE block {m.group(1)}, but this {title} model has {spec.vace_layers} VACE "
                    f"blocks (0-{spec.vace_layers - 1}): this LoRA was made for another VACE size (14B: 8, 1.3B: 15)")
        for words, made, mine in (("vace_(?:blocks|patch_embedding)", "Wan VACE", spec.vace_layers),
                                  ("control_adapter", "Wan Fun Camera", spec.model_type.startswith("camera")),
                                  ("(?:casual_audio_encoder|audio_injector|cond_encoder|frame_packer|"
                                   "trainable_cond_mask)", "Wan 2.2 S2V", spec.model_type == "s2v"),
                                  ("(?:audio_proj|blocks[._]\\d+[._]audio_cross_attn_wrapper)", "Wan HuMo",
                                   spec.model_type == "humo"),
                                  ("(?:face_adapter|face_encoder|motion_encoder|pose_patch_embedding)",
                                   "Wan 2.2 Animate", spec.model_type == "animate")):
            if not mine and re.match(words + r"(?:[._]|$)", rest):
                return (f"{name!r}: key for {made}'s own modules, which this {title} model does not have: this LoRA "
                        f"was made for {made}; its other modules apply")
        if re.search(r"(k_img|v_img|norm_k_img|add_k_proj|add_v_proj|norm_added_k)$", rest) or \
                re.match(r"(img_emb|condition_embedder[._]image_embedder)[._]", rest):
            return (f"{name!r}: key for Wan 2.1 I2V's CLIP-image branch (img_emb, cross_attn.k_img / v_img), which "
                    f"this {title} model does not have (Wan 2.2 I2V-A14B and T2V models have none): this LoRA was "
                    "made for Wan 2.1 I2V; its other modules apply")
        return (f"{name!r}: Wan-style key that names no module of this {title} model; check the LoRA's base model "
                "(or the module is not a weight)")

    # ----------------------------------------------------------------------------- layout
    def block_layout(self, variant: ArchSpec) -> BlockLayout:
        layout = self._layouts.get(variant.layout_key)
        if layout is not None:
            return layout
        blocks = tuple(_block(i) for i in range(variant.config.depth))
        descriptions = {"TE1": f"text encoder 1 ({UMT5_XXL.family})",
                        IN: "input embeddings (patch_embedding, text_embedding, time_embedding, time_projection, "
                            "img_emb)",
                        OUT: "output (head.head, head.modulation)"}
        for i, b in enumerate(blocks):
            descriptions[b] = f"block {i} (self-attention, cross-attention, FFN, modulation)"
        spec = variant.config
        vace = tuple(_vace_block(i) for i in range(spec.vace_layers))
        for i, b in enumerate(vace):
            descriptions[b] = f"VACE block {i} (a Wan block on the control context, plus after_proj" + \
                (", before_proj)" if i == 0 else ")")
        if vace:
            descriptions[IN] += ", vace_patch_embedding"
        aux = (AUX,) if spec.has_aux else ()
        if aux:
            descriptions[AUX] = ("the variant's adapters (camera control_adapter; S2V audio encoder / injector, cond "
                                 "encoder, frame packer; HuMo audio_proj; Animate face adapter / encoders)")
        groups = {BASE: ("TE1",), BLOCKS: blocks}
        if vace:
            groups[VACE] = vace
        layout = BlockLayout(
            key=variant.layout_key, blocks=("TE1", IN) + blocks + vace + aux + (OUT,), te_blocks=("TE1",),
            other_blocks=(IN,) + aux + (OUT,), descriptions=descriptions, groups=groups,
            element_kinds=ELEMENT_KINDS, element_groups=ELEMENT_GROUPS,
        )
        self._layouts[variant.layout_key] = layout
        return layout

    # ----------------------------------------------------------------------------- training
    def train_spec(self, variant: ArchSpec, config=None) -> Optional[TrainSpec]:
        """musubi-tuner's Wan training (networks/lora_wan.py, docs/wan.md): LoRA on the Linears of every
        WanAttentionBlock (WAN_TARGET_REPLACE_MODULES) - self_attn / cross_attn q, k, v, o (and Wan 2.1 I2V's
        k_img / v_img) and ffn.0 / ffn.2 - with its default exclusion of `patch_embedding|text_embedding|
        time_embedding|time_projection|norm|head`, named `lora_unet_<native path _>` (ss_network_module
        networks.lora_wan). "all layers" adds the text / time embeddings, the time projection, the I2V image
        projection and head.head (every Linear of the denoiser; the Conv3d patch embedding and the modulation
        parameters are not LoRA targets). musubi trains no text encoder (UMT5-XXL); ours can, through ComfyUI's
        generic names. Flow matching at the model's shift (ComfyUI's WAN21: ModelSamplingDiscreteFlow, shift 8,
        multiplier 1000), logit-normal shifted by it (musubi `--timestep_sampling shift --discrete_flow_shift`);
        latents are 5-D (B, 16, frames, h, w) - images train as one-frame videos. One Wan 2.2 expert trains with
        its timestep range (`timestep_ranges`).

        Wan 2.2 TI2V-5B (musubi `--task ti2v-5B`) trains the same way on its 48-channel latents (Wan 2.2 VAE, 16x
        spatial): ComfyUI's WAN22 gives each token its own timestep only through a `denoise_mask` (image-to-video's
        clean first frame, process_timestep); text-to-video training passes none, so every token gets the batch
        item's one timestep, and its in_dim equals the latent's (no concat conditioning). musubi's names and
        header; the file names the 5B in `ss_model_type`."""
        return TrainSpec(kinds=WAN_TRAIN_KINDS, target_sets=WAN_TARGET_SETS, conv_kinds=(), text_encoders=("te1",),
                         guidance_input=False, timestep_sampling="logit-normal, model shift", resolution_shift=None,
                         block_lists=("blocks",), latent_dims=3)

    def timestep_ranges(self, variant: ArchSpec) -> dict[str, tuple[int, int]]:
        """The Wan 2.2 experts' timestep ranges on musubi's 0-1000 scale (docs/wan.md: T2V low noise 0-875, high
        noise 875-1000, the T2V boundary 0.875; I2V's boundary 0.9, wan/configs/wan_i2v_A14B.py). TI2V-5B is one
        model, not a pair of experts: none (a numeric range still works)."""
        if variant.config.out_dim == 48:
            return {}
        boundary = WAN22_BOUNDARY["i2v"] if variant.config.in_dim == 36 else WAN22_BOUNDARY["t2v"]
        return {"high noise": (boundary, 1000), "low noise": (0, boundary)}


# Training kinds -> element kinds (the train node's target choices name training kinds).
WAN_TRAIN_KINDS = {
    "attn": frozenset({"self_attn", "cross_attn", "img_attn"}),
    "mlp": frozenset({"ffn"}),
    "embed": frozenset({"text_embed", "time_embed", "time_proj", "img_emb"}),
    "final": frozenset({"head"}),
}
# The first (the node's default) is musubi's default: every Linear of the WanAttentionBlocks (attention and FFN;
# "attn+ff" is the same set); "all layers" adds the embeddings' Linears and head.head.
WAN_TARGET_SETS = {
    "attn+ff+proj": ("attn", "mlp"),
    "attn+proj": ("attn",),
    "attn+ff": ("attn", "mlp"),
    "attn": ("attn",),
    "all layers": tuple(WAN_TRAIN_KINDS),
}
# Wan 2.2's expert boundary on the 0-1000 scale (musubi docs/wan.md, --timestep_boundary defaults)
WAN22_BOUNDARY = {"t2v": 875, "i2v": 900}


FAMILY = WanFamily()
(WAN_T2V_14B, WAN21_I2V_14B, WAN22_I2V_A14B, WAN21_T2V_1_3B, WAN22_TI2V_5B, WAN_VACE_14B, WAN_VACE_1_3B, WAN21_CAMERA,
 WAN22_CAMERA, WAN22_S2V, WAN_HUMO, WAN22_ANIMATE) = FAMILY.variants
