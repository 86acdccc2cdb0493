"""Flux.2 [dev] end to end in the real host (ComfyUI 0.3.75 on CPU, tiny models built with its own classes):

* recognition that claims no Flux.1 state dict (ComfyUI or diffusers) and is claimed by no other family;
* the key map is a superset of core's: every alias core maps lands on the same weight and rows, except
  single-block `proj_mlp`, which core slices with Flux.1's rule (rows 3h..7h) and we with Flux.2's true layout
  (the gated MLP input: 2m = 6h rows after q | k | v);
* every writer's file equals core's loader where core reads it (1e-5 of the delta, at 1.0 and -0.6, same patched
  keys, one patch per fused weight), and core on the same tensors under names it reads where it cannot (asserted:
  core really drops or misreads them);
* the Mistral text encoder applies where the CLIP holds it and is reported as not applied otherwise;
* Flux.1 LoRAs on Flux.2 (and the reverse), deeper files and other families are refused naming both;
* blocks as data, named syntax inside the fused rows (the gated MLP part of linear1 is Flux.2's 2m rows),
  A1111 refused, Inspire equal to Inspire's own rule, block info / sweep; merged block-weighted stacks load to
  the stack's weights in core and ours, with Flux.2's metadata;
* `LoraPatcher(transformer=...)` on diffusers' Flux2Transformer2DModel equals diffusers' own `load_lora_weights`
  + `fuse_lora`.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from diffusers.loaders import Flux2LoraLoaderMixin

from tests.comfy_host import import_comfy
from tests.pack import block_stack_rows, diffusers_fuse_reference, host, loras_folder, node_module
from tests import dit_writers as dw
from tests import flux2_writers as f2
from tests import lora_writers as lw
from tests import tiny_flux2 as tf
from tests import tiny_models as tm
from tests.test_flux import EPS, assert_merged_file_equals_stack, assert_same, bake, compare
from tests.test_flux_blocks import inspire_reference

comfy = import_comfy()
import comfy.lora  # noqa: E402
import comfy.sd  # noqa: E402

from lora_core import blocks  # noqa: E402
from lora_core.api import LoraPatcher, LoraRequest  # noqa: E402
from lora_core.arch import bind_comfy_model, bind_diffusers, registry  # noqa: E402
from lora_core.arch.families import flux as flux_family  # noqa: E402
from lora_core.arch.families.flux2 import FAMILY, FLUX2_DEV  # noqa: E402
from lora_core.errors import LoraMatchError, LoraValueError  # noqa: E402
from lora_core.io import read_lora_file  # noqa: E402
from lora_core.types import LoraFile  # noqa: E402

H, M = tf.HIDDEN, tf.MLP


@pytest.fixture(scope="module")
def flux2():
    return tf.comfy_flux2(), tf.comfy_clip_flux2()


@pytest.fixture(scope="module")
def twin():
    return tf.diffusers_flux2_twin()


def core_log(model, clip, state) -> list[str]:
    """What core 0.3.75 logs at WARNING and above while loading `state` ('lora key not loaded', 'ERROR lora ...
    shape' for a patch it skips)."""
    records = []
    handler = logging.Handler()
    handler.setLevel(logging.WARNING)
    handler.emit = records.append
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        patched, _ = comfy.sd.load_lora_for_models(model, clip, state, 1.0, 1.0)
        bake(patched)   # shape errors surface when the patches are computed
    finally:
        root.removeHandler(handler)
    return [r.getMessage() for r in records if r.levelno >= logging.WARNING]


def stripped(model) -> dict:
    return {k[len("diffusion_model."):]: tuple(v.shape) for k, v in model.model.state_dict().items()
            if k.startswith("diffusion_model.")}


# ------------------------------------------------------------------------------------- recognition, key map

def test_recognition_claims_only_flux2(flux2, twin):
    model, _ = flux2
    keys = stripped(model)
    found = registry.detect_host(list(keys), keys, model.model.model_config.unet_config, "Flux2")
    assert found is not None and found[0] is FAMILY and found[1] is FLUX2_DEV
    spec = found[2]
    assert (spec.hidden, spec.depth, spec.depth_single, spec.mlp_hidden) == (H, tf.DEPTH, tf.DEPTH_SINGLE, M)
    alone = registry.detect_host(list(keys), None)[2]   # from the keys alone: the depths (widths: full size)
    assert (alone.depth, alone.depth_single, alone.hidden) == (tf.DEPTH, tf.DEPTH_SINGLE, 6144)
    sd = model.model.state_dict()
    assert bind_comfy_model({k: tuple(v.shape) for k, v in sd.items()}).config == spec
    dif = bind_diffusers(twin.state_dict())
    assert dif.arch is FLUX2_DEV and dif.config == spec and dif.unbound == []
    # Flux.1 (ComfyUI and diffusers) is not claimed, and Flux.1's recognition does not claim Flux.2
    flux1 = stripped(tm.comfy_flux())
    flux1_dif = {k: tuple(v.shape) for k, v in dw.diffusers_flux_twin().state_dict().items()}
    assert FAMILY.detect_host(list(flux1), flux1, None) is None and FAMILY.detect_diffusers(list(flux1_dif), flux1_dif) is None
    twin_keys = {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    assert flux_family.FAMILY.detect_host(list(keys), keys, None) is None
    assert flux_family.FAMILY.detect_diffusers(list(twin_keys), twin_keys) is None
    assert registry.detect_diffusers(list(flux1_dif), flux1_dif)[0] is flux_family.FAMILY


def test_clip_and_metadata_name_flux2():
    assert registry.arch_of_clip({"mistral3_24b"}) is FLUX2_DEV
    assert registry.arch_of_clip({"clip_l", "t5xxl"}) is flux_family.FLUX_DEV
    for meta in (f2.MUSUBI_METADATA, f2.AI_TOOLKIT_METADATA, {"modelspec.architecture": "Flux.2-dev/lora"}):
        assert registry.arch_of_metadata(meta) is FLUX2_DEV, meta
    for value in ("flux1", "flux-1-dev/lora", "flux_kontext", "flux"):   # Flux.1's strings stay Flux.1's
        assert registry.arch_of_metadata({"ss_base_model_version": value}).family is flux_family.FAMILY, value


def test_key_map_is_a_superset_of_cores(flux2):
    """Every name core maps (generic `diffusion_model.` / `lora_unet_`, its Flux branch's diffusers names
    `transformer.` / `lycoris_` / `lora_transformer_`, `linear1_qkv`, `text_encoders.mistral3_24b...`) resolves in
    ours to the same tensor and rows; the one difference is single-block `proj_mlp`: core slices linear1 rows
    (3h, 4h) (Flux.1's MLP), which on Flux.2 cut the gated MLP input (2m = 6h rows) short; ours takes all 2m."""
    model, clip = flux2
    core = comfy.lora.model_lora_keys_unet(model.model, {})
    core = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, core)
    km = host(model, clip).key_map
    assert km.arch is FLUX2_DEV and km.conflicts == []
    present = set(model.model.state_dict()) | set(clip.cond_stage_model.state_dict())
    checked, proj_mlp = 0, 0
    for name, target in core.items():
        key = target if isinstance(target, str) else target[0]
        if key not in present:
            continue   # core's Flux.1 names of weights Flux.2 lacks (img_mod, vector_in, biases ...)
        ours = km.resolve(name)
        assert ours is not None, f"core maps {name!r} -> {key}; ours does not"
        if isinstance(target, str):
            whole = ours.pieces is None or (all(p.dst == p.src and p.host_key == key for p in ours.pieces)
                                            and sum(p.length for p in ours.pieces) == ours.rows)
            assert key in ours.host_keys and whole, (name, ours)   # whole rows (split only by element kind)
        elif target[1] is not None:
            _, start, length = target[1]
            got = [(p.host_key, p.dst, p.src, p.length) for p in ours.pieces]
            if name.endswith("proj_mlp"):
                assert (start, length) == (3 * H, 4 * H) and got == [(key, 3 * H, 0, 2 * M)], (name, got)
                proj_mlp += 1
            else:
                assert got == [(key, start, 0, length)], (name, target, got)
        checked += 1
    assert checked > 150 and proj_mlp == 3 * tf.DEPTH_SINGLE
    assert km.resolve("transformer.transformer_blocks.1.ff.linear_in").path == "double_blocks.1.img_mlp.0"
    assert km.resolve("transformer.single_transformer_blocks.2.attn.to_qkv_mlp_proj").path == "single_blocks.2.linear1"
    assert km.resolve("transformer.double_stream_modulation_txt.linear").block == "MOD"
    assert km.resolve("lora_unet_single_blocks_0_linear2").block == "SB00"
    assert km.resolve("text_encoders.mistral3_24b.transformer.model.layers.1.mlp.up_proj").component == "te1"


# ------------------------------------------------------------------------------------- writers core reads

WRITERS_CORE_READS = {
    "comfy-native": lambda m, t: f2.comfy_native(m, seed=1),
    "comfy-native-lora_A/B": lambda m, t: f2.comfy_native(m, seed=2, peft_suffixes=True),
    "musubi": lambda m, t: f2.musubi(m, seed=3),
    "ai-toolkit": lambda m, t: f2.ai_toolkit(m, seed=4),
    "diffusion-pipe": lambda m, t: f2.diffusion_pipe(m, seed=5),
    "diffusers-peft-attention": lambda m, t: f2.diffusers_peft(t, seed=6, targets=f2.diffusers_targets(t, True)),
    "full-diffs": lambda m, t: dw.full_diffs(m, seed=7),
}


@pytest.mark.parametrize("writer", list(WRITERS_CORE_READS))
def test_writer_equals_core(flux2, twin, tmp_path, caplog, writer):
    model, _ = flux2
    state = WRITERS_CORE_READS[writer](model, twin)
    reports = compare(flux2, tmp_path, caplog, state)
    assert "Flux.2 [dev]" in reports[0]


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr", "full"])
def test_lycoris_inside_musubi_equals_core(flux2, tmp_path, caplog, algo):
    """LyCORIS through musubi / kohya (`network_module=lycoris.kohya`, prefix `lora_unet`) on every Linear of the
    blocks and the shared modulation, every algorithm."""
    model, _ = flux2
    parts = f2.lycoris_targets(model, ("double_blocks", "single_blocks", "double_stream_modulation_img",
                                       "single_stream_modulation"))
    state = lw.lycoris_state_dict(parts, algo, prefix="lora_unet", rank=4, alpha=2.0, seed=8,
                                  target_module=("Linear",))
    assert any(k.startswith("lora_unet_single_blocks_0_linear1.") for k in state)
    compare(flux2, tmp_path, caplog, state)


def test_lycoris_own_prefix_on_bfl_names(flux2, tmp_path, caplog):
    """LyCORIS's own wrapper with its default prefix on the BFL model (`lycoris_double_blocks_0_img_attn_qkv`):
    core's Flux branch maps `lycoris_` only before diffusers names and drops these; the truth is core on the same
    tensors under `lora_unet_`."""
    model, _ = flux2
    parts = f2.lycoris_targets(model, ("double_blocks", "single_blocks"))
    state = lw.lycoris_state_dict(parts, "lokr", prefix="lycoris", rank=4, alpha=2.0, seed=8,
                                  target_module=("Linear",))
    assert any("not loaded" in m for m in core_log(model, None, state))
    compare(flux2, tmp_path, caplog, state, core_state=f2.renamed(state, "lycoris_", "lora_unet_"))


def test_norm_scales_as_full_diffs(flux2, tmp_path, caplog):
    """RMSNorm scales (query_norm / key_norm) take `diff` patches under ComfyUI's generic names."""
    model, _ = flux2
    gen = torch.Generator().manual_seed(9)
    state = {k + ".diff": 0.01 * torch.randn(v.shape, generator=gen)
             for k, v in model.model.state_dict().items() if k.endswith("_norm.scale")}
    assert len(state) == 4 * tf.DEPTH + 2 * tf.DEPTH_SINGLE
    compare(flux2, tmp_path, caplog, state)


# ------------------------------------------------------------------------------------- writers core misreads

def test_diffusers_peft_every_linear_where_core_reads_only_attention(flux2, twin, tmp_path, caplog):
    """PEFT on diffusers' Flux2Transformer2DModel, every Linear: core 0.3.75 reads the attention slices but drops
    `ff.linear_in/out`, `to_qkv_mlp_proj`, single-block `attn.to_out`, the shared modulation `.linear` and
    `time_guidance_embed` (its Flux branch knows Flux.1's diffusers names only). The truth: core on the same
    tensors with those renamed to their BFL names (diffusers' single-file converter table)."""
    model, _ = flux2
    state = f2.diffusers_peft(twin, seed=10)
    assert any(".to_qkv_mlp_proj." in k for k in state) and any("double_stream_modulation_img.linear" in k
                                                                 for k in state)
    dropped = [m for m in core_log(model, None, state) if "not loaded" in m]
    assert any("linear_in" in m for m in dropped) and any("to_qkv_mlp_proj" in m for m in dropped)
    compare(flux2, tmp_path, caplog, state, core_state=f2.to_native(state))
    with loras_folder(tmp_path):
        ours, _ = node_module("loader").LoRACoreLoaderModelOnly().load(model, "lora.safetensors", 1.0)
    assert len(ours.patches) < len([k for k in state if "lora_A" in k]), "parts of a fused weight are one patch"


def test_diffsynth_bare_names_with_adapter_name(flux2, twin, tmp_path, caplog):
    """DiffSynth-Studio: bare diffusers names with PEFT's `.default.`; core maps no bare Flux.2 name."""
    model, _ = flux2
    state = f2.diffsynth(twin, seed=11)
    assert all(".default." in k and not k.startswith("transformer.") for k in state)
    assert core_log(model, None, state)
    compare(flux2, tmp_path, caplog, state, core_state=f2.to_native(f2.renamed(state, "", "transformer.")))


def test_peft_base_model_names(flux2, twin, tmp_path, caplog):
    model, _ = flux2
    state = f2.renamed(f2.diffusers_peft(twin, seed=12), "transformer.", "base_model.model.")
    assert core_log(model, None, state)
    compare(flux2, tmp_path, caplog, state,
            core_state=f2.to_native(f2.renamed(state, "base_model.model.", "transformer.")))


def test_bare_bfl_names(flux2, tmp_path, caplog):
    """BFL-style bare names (`double_blocks.0.img_attn.qkv.lora_A.weight`): core's Flux branch maps none."""
    model, _ = flux2
    state = f2.comfy_native(model, seed=13, prefix="", peft_suffixes=True)
    assert core_log(model, None, state)
    compare(flux2, tmp_path, caplog, state, core_state={"diffusion_model." + k: v for k, v in state.items()})


def test_flux1_style_proj_mlp_uses_flux2_rows(flux2, tmp_path, caplog):
    """Single blocks in Flux.1's diffusers split (`attn.to_q/k/v`, `proj_mlp`, `proj_out`): core slices
    `proj_mlp` into linear1 rows (3h, 4h) - Flux.1's MLP - so the 2m-row gated MLP input does not fit and core
    skips it with an error. Ours puts it on rows (3h, 2m). The truth: core on the same tensors as one LoRA on the
    fused native linear1 (block-diagonal up)."""
    model, _ = flux2
    state = f2.flux1_style_split(model, seed=14)
    errors = core_log(model, None, state)   # core: "ERROR lora ...linear1.weight shape '[4h, h]' is invalid ..."
    assert any("single_blocks.0.linear1.weight" in m and f"[{4 * H}, {H}]" in m for m in errors), errors
    compare(flux2, tmp_path, caplog, state, core_state=f2.fuse_split_single_blocks(state))


def test_lycoris_on_diffusers_names(flux2, twin, tmp_path, caplog):
    """SimpleTuner's LyCORIS on the diffusers transformer (`lycoris_transformer_blocks_0_ff_linear_in`): core maps
    only the attention names; the truth is core on the same tensors under the BFL names."""
    model, _ = flux2
    parts = f2.lycoris_targets(twin, ("transformer_blocks", "single_transformer_blocks"))
    state = lw.lycoris_state_dict(parts, "lokr", prefix="lycoris", rank=4, alpha=2.0, seed=15,
                                  target_module=("Linear",))
    assert any(k.startswith("lycoris_transformer_blocks_0_ff_linear_in.") for k in state)
    assert any("not loaded" in m for m in core_log(model, None, state))
    renames = {"ff_linear_in": "img_mlp_0", "ff_linear_out": "img_mlp_2", "ff_context_linear_in": "txt_mlp_0",
               "ff_context_linear_out": "txt_mlp_2", "attn_to_qkv_mlp_proj": "linear1", "attn_to_out.": "linear2."}

    def native(key):
        m = __import__("re").match(r"lycoris_(single_)?transformer_blocks_(\d+)_(.+)", key)
        single, index, rest = m.groups()
        for old, new in renames.items():
            if rest.startswith(old):
                return f"lora_unet_{'single' if single else 'double'}_blocks_{index}_{new}{rest[len(old):]}"
        return key

    compare(flux2, tmp_path, caplog, state, core_state={native(k): v for k, v in state.items()})


# ------------------------------------------------------------------------------------- text encoder

def test_text_encoder_applies_where_the_clip_holds_it(flux2, tmp_path, caplog):
    """Mistral modules under ComfyUI's generic names: equal to core with the Flux.2 CLIP; not applied (no CLIP
    connected) on a model-only load; on a Flux.1 CLIP not applied with the reason, the transformer part applied."""
    model, clip = flux2
    te = f2.text_encoder(clip, seed=16)
    modules = len({k.rsplit(".", 2)[0] for k in te if k.endswith(".weight")})
    state = {**f2.musubi(model, seed=17), **te}
    reports = compare(flux2, tmp_path, caplog, state, with_clip=True)
    assert f"te1 {modules}" in reports[0]
    loader = node_module("loader")
    with loras_folder(tmp_path):
        _, report = loader.LoRACoreLoaderModelOnly().load(model, "lora.safetensors", 1.0)
        assert f"not applied: te1 {modules} (no CLIP connected)" in report and "unmatched" not in report
        patched, clip_out, report = loader.LoRACoreLoader().load(model, "lora.safetensors", 1.0, 1.0,
                                                                 clip=tm.comfy_clip_flux())
    assert f"not applied: te1 {modules} (the CLIP has no Mistral-Small-3.1-24B)" in report, report
    assert "unmatched" not in report and patched.patches and not clip_out.patcher.patches


# ------------------------------------------------------------------------------------- fit and mismatch

def real_shape_lora(hidden: int, mlp: int, doubles=(0,), singles=(0,), meta=None) -> LoraFile:
    """A rank-1 musubi-style file with the full-size shapes of a Flux (no model needed)."""
    gen = torch.Generator().manual_seed(5)
    tensors = {}

    def pair(name, rows, cols):
        tensors[f"{name}.lora_down.weight"] = 0.01 * torch.randn(1, cols, generator=gen)
        tensors[f"{name}.lora_up.weight"] = 0.01 * torch.randn(rows, 1, generator=gen)

    gated = 2 if mlp == 3 * hidden else 1
    for i in doubles:
        pair(f"lora_unet_double_blocks_{i}_img_attn_qkv", 3 * hidden, hidden)
        pair(f"lora_unet_double_blocks_{i}_img_mlp_0", gated * mlp, hidden)
        pair(f"lora_unet_double_blocks_{i}_txt_mlp_2", hidden, mlp)
    for i in singles:
        pair(f"lora_unet_single_blocks_{i}_linear1", 3 * hidden + gated * mlp, hidden)
    return LoraFile(None, tensors, dict(meta or {}))


def test_detection_of_full_size_files():
    """Flux.1 and Flux.2 share block names: a file is told by its shapes (gated MLPs of 6 x the width, linear1 of
    9 x) or by blocks only one has, and musubi's / ai-toolkit's metadata."""
    assert registry.detect_lora(real_shape_lora(6144, 18432)) is FLUX2_DEV
    assert registry.detect_lora(real_shape_lora(6144, 18432, doubles=(), singles=(40,))) is FLUX2_DEV
    assert registry.detect_lora(real_shape_lora(3072, 12288)).family is flux_family.FAMILY
    assert registry.detect_lora(real_shape_lora(3072, 12288, doubles=(12,))).family is flux_family.FAMILY
    assert registry.detect_lora(real_shape_lora(64, 192)) is FLUX2_DEV   # the ratios hold at any size
    assert registry.base_model_name(real_shape_lora(6144, 18432, meta=f2.MUSUBI_METADATA)) == ("Flux.2", "metadata")


def test_loras_for_other_families_and_sizes_are_refused_naming_both(flux2, twin, tmp_path):
    model, _ = flux2
    flux1, sd15 = tm.comfy_flux(), tm.comfy_sd15()
    files = {
        "flux2_musubi": (f2.musubi(model, seed=20), None),
        "flux2_meta": (f2.musubi(model, seed=20), f2.MUSUBI_METADATA),
        "flux2_peft": (f2.diffusers_peft(twin, seed=21), None),
        "flux1_kohya": (dw.kohya_flux(flux1, seed=22), None),
        "flux1_peft": (dw.peft_flux(dw.diffusers_flux_twin(), seed=23)[0], None),
        "sd15": (lw.kohya_state_dict(lw.unet_targets(sd15.model.diffusion_model), "lora_unet", seed=24), None),
        "flux2_wide": (f2.comfy_native(tf.comfy_flux2(hidden=96, heads=3), seed=25), None),
        "flux2_deep": (f2.musubi(tf.comfy_flux2(depth=3, depth_single=4), seed=26), None),
        "flux2_full": (real_shape_lora(6144, 18432).tensors, None),
        "flux2_klein": (real_shape_lora(4096, 12288).tensors, {"ss_base_model_version": "flux_2_klein_9b"}),
    }
    for name, (state, meta) in files.items():
        lw.save_safetensors(state, tmp_path / f"{name}.safetensors", meta)
    loader = node_module("loader").LoRACoreLoaderModelOnly()

    def refused(on, name, *words):
        with pytest.raises(LoraMatchError) as caught:
            loader.load(on, f"{name}.safetensors", 1.0)
        text = str(caught.value)
        assert f"{name}.safetensors" in text and all(w in text for w in words), text
        return text

    with loras_folder(tmp_path):
        # the tiny Flux.1 has Flux.2's width: qkv and proj fit, the MLPs do not
        for name in ("flux2_musubi", "flux2_meta", "flux2_peft"):
            refused(flux1, name, "made for Flux.2 [dev]", "the model is Flux.1 [dev]")
        for name in ("flux1_kohya", "flux1_peft"):
            refused(model, name, "made for Flux.1 [dev]", "the model is Flux.2 [dev]")
        refused(model, "sd15", "made for Stable Diffusion 1.x", "Flux.2 [dev]")
        refused(sd15, "flux2_musubi", "made for Flux.2 [dev]", "Stable Diffusion 1.x")
        refused(model, "flux2_wide", "does not fit")
        refused(model, "flux2_full", "does not fit", "6144")
        refused(model, "flux2_klein", "does not fit", "4096")   # Klein (not loadable in 0.3.75): by its widths
        _, report = loader.load(model, "flux2_deep.safetensors", 1.0)   # the blocks this model has apply
    assert "WARNING" in report and "key for double block 2, but this Flux.2 [dev] model has 2 double blocks" in report
    assert "key for single block 3, but this Flux.2 [dev] model has 3 single blocks" in report


def test_reasons_for_names_this_model_lacks(flux2):
    model, _ = flux2
    km = host(model).key_map
    cases = {
        "lora_unet_double_blocks_0_img_mod_lin": "Flux.1",
        "transformer.transformer_blocks.0.norm1.linear": "no per-block modulation",
        "lora_unet_joint_blocks_0_x_block_attn_qkv": "SD3",
        "lora_unet_input_blocks_1_1_proj_in": "SD UNet",
        "transformer.time_text_embed.text_embedder.linear_1": "no pooled text input",
    }
    for name, words in cases.items():
        assert km.resolve(name) is None, name
        assert words in km.explain_unmatched(name), (name, km.explain_unmatched(name))
    flux1_km = host(tm.comfy_flux()).key_map   # Flux.2's own names on Flux.1 are explained as Flux.2's
    for name in ("transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj",
                 "lora_unet_double_stream_modulation_img_lin", "transformer.transformer_blocks.0.ff.linear_in"):
        assert flux1_km.resolve(name) is None and "Flux.2" in flux1_km.explain_unmatched(name), name


def test_training_uses_flux2s_own_train_spec(flux2):
    """Flux.2 trains with its own TrainSpec (musubi's lora_flux_2 set: attention and MLPs of the blocks, no shared
    modulation by default; guidance input), not another family's rules (tests/test_train_dit2.py trains it)."""
    arch, spec = node_module("train").model_train_spec(flux2[0])
    assert arch is FLUX2_DEV and spec.guidance_input is True
    assert spec.target_sets["attn+ff+proj"] == ("attn", "mlp") and "mod" in spec.target_sets["all layers"]
    assert spec.block_lists == ("double_blocks", "single_blocks")


# ------------------------------------------------------------------------------------- blocks

def test_block_layout_as_data():
    assert FLUX2_DEV.blocks == (("TE1", "IN", "MOD") + tuple(f"DB{i:02d}" for i in range(8))
                                + tuple(f"SB{i:02d}" for i in range(48)) + ("OUT",))
    layout = FLUX2_DEV.layout
    assert layout.groups["BASE"] == ("TE1",) and layout.other_blocks == ("IN", "MOD", "OUT")
    assert "shared modulation" in layout.descriptions["MOD"] and "gate|up" in layout.descriptions["SB47"]
    assert layout.element_groups["linear1"] == {"linear1_attn", "linear1_mlp"}
    assert layout.inspire_max_length == 57 and list(layout.inspire_layouts) == [57]
    with pytest.raises(LoraValueError, match="no positional layout for flux2: use named syntax"):
        blocks.resolve_vector("flux2", "a1111", ",".join(["1"] * 61))
    with pytest.raises(LoraValueError, match="is for Flux, not flux2"):   # Flux.1's 58-value presets misalign
        blocks.resolve_vector("flux2", "inspire", "FLUX-ALL", present_blocks=["DB00"])


def run_block_weight(model, tmp_path, name, state, vector, mode="named", clip=None, strength_clip=0.0):
    lw.save_safetensors(state, tmp_path / name)
    bw = node_module("block_weight").LoRACoreBlockWeight()
    with loras_folder(tmp_path):
        out = bw.load(model, name, 1.0, strength_clip, mode, "custom", vector, 0, 1.0, 1.0, False,
                      **({"clip": clip} if clip is not None else {}))
    return out


def test_named_syntax_inside_flux2s_fused_rows(flux2, twin, tmp_path):
    """`SB00.linear1_mlp=0` zeroes exactly linear1's gated MLP rows (3h .. 3h + 2m: Flux.2's layout; Flux.1's rule
    would stop at 4h) and keeps q|k|v; `SB01.linear2_mlp=0` the MLP columns of linear2; `DB00.img_mlp=0.5` both
    halves (gate | up) of the fused img_mlp.0; `MOD=0` the shared modulation. On a diffusers file, the rows
    `to_qkv_mlp_proj` puts into linear1 take the same factors."""
    model, _ = flux2
    base = model.model.state_dict()
    vector = "SB00.linear1_mlp=0, SB01.linear2_mlp=0, DB00.img_mlp=0.5, MOD=0"
    for name, state in (("m.safetensors", {**f2.musubi(model, seed=30),
                                           **dw.lora_pairs(dw.linear_layers(f2.net(model), include=("modulation",)),
                                                           lambda p: "lora_unet_" + p.replace(".", "_"), seed=31)}),
                        ("p.safetensors", f2.diffusers_peft(twin, seed=32))):
        got = bake(run_block_weight(model, tmp_path, name, state, vector)[0])
        whole = bake(run_block_weight(model, tmp_path, name, state, "")[0])
        d = {k: got[k] - base[k] for k in got}
        full = {k: whole[k] - base[k] for k in whole}
        p = "diffusion_model."
        l1 = p + "single_blocks.0.linear1.weight"
        assert full[l1][3 * H:].abs().min() > 0 and full[l1][3 * H:].shape[0] == 2 * M
        torch.testing.assert_close(d[l1][:3 * H], full[l1][:3 * H])
        assert torch.all(d[l1][3 * H:] == 0), "the whole gated MLP input (2m rows) is zeroed"
        l2 = p + "single_blocks.1.linear2.weight"
        torch.testing.assert_close(d[l2][:, :H], full[l2][:, :H])
        assert torch.all(d[l2][:, H:] == 0)
        for key in (p + "double_blocks.0.img_mlp.0.weight", p + "double_blocks.0.img_mlp.2.weight"):
            torch.testing.assert_close(d[key], 0.5 * full[key], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(d[p + "double_blocks.0.img_attn.qkv.weight"],
                                   full[p + "double_blocks.0.img_attn.qkv.weight"])
        assert not any("stream_modulation" in k for k in d) and any("stream_modulation" in k for k in full)


def test_inspire_mode_equals_inspires_rule(flux2, tmp_path):
    """Inspire's loader gives double_blocks / single_blocks ordinal slots (1 + 2 + 3 here) and puts everything else
    (Mistral, IN, MOD, OUT) in BASE; reference: a re-statement of Inspire's load_lbw on core's load_lora."""
    model, clip = flux2
    state = {**f2.comfy_native(model, seed=33), **f2.text_encoder(clip, seed=34)}
    lw.save_safetensors(state, tmp_path / "insp.safetensors")
    base = {k: v.clone() for k, v in model.model.state_dict().items()}
    base_clip = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    for vector in ("0.6,1,0,0.5,0.25,0,1,1,1,1,1,1", "1,0.3,0.7,0,0,1,0.2" + ",1" * 50):
        with loras_folder(tmp_path):
            ours, ours_clip, table = node_module("block_weight").LoRACoreBlockWeight().load(
                model, "insp.safetensors", 0.8, 0.7, "inspire", "custom", vector, 0, 1.0, 1.0, False, clip=clip)
        ref, ref_clip = inspire_reference(model, clip, state, 0.8, 0.7, vector)
        assert_same(bake(ours), bake(ref), base, f"inspire {vector[:12]}")
        assert_same(bake(ours_clip.patcher), bake(ref_clip.patcher), base_clip, "inspire CLIP")


def test_block_info_and_sweep(flux2, tmp_path):
    model, _ = flux2
    state = f2.comfy_native(model, seed=35)
    lw.save_safetensors(state, tmp_path / "info.safetensors", f2.MUSUBI_METADATA)
    tools = node_module("block_tools")
    with loras_folder(tmp_path):
        info = tools.block_info("info.safetensors", "auto", model=model)
        assert list(info["blocks"]) == ["IN", "MOD", "DB00", "DB01", "SB00", "SB01", "SB02", "OUT"]
        assert all(entry["norm"] > 0 for entry in info["blocks"].values())
        text, chart = tools.LoRACoreBlockInfo().inspect("info.safetensors", "auto")   # layout from metadata
        assert "Flux.2 [dev]" in text and "layout only" in text and chart.ndim == 4
        models, labels = tools.LoRACoreBlockSweep().sweep(model, "info.safetensors", 1.0, "blocks", 1.0, 0.0,
                                                          "named", "", 0, 1.0, 1.0)
    assert [label.split()[0] for label in labels[1:]] == ["IN", "MOD", "DB00", "DB01", "SB00", "SB01", "SB02", "OUT"]
    knocked = set(models[2].patches)   # MOD off
    assert knocked == {k for k in models[0].patches if "stream_modulation" not in k}


# ------------------------------------------------------------------------------------- merge / export

def test_merged_block_weighted_stack_loads_to_the_stacks_weights(flux2, twin, tmp_path):
    """A musubi file with the Mistral encoder and a diffusers PEFT file, block-weighted, merged into one file
    (exact): `lora_unet_<BFL path _>` and `text_encoders.mistral3_24b...`, Flux.2's metadata; core and our loader
    give the stack's weights."""
    model, clip = flux2
    a = {**f2.musubi(model, seed=36), **f2.text_encoder(clip, seed=37)}
    b = f2.diffusers_peft(twin, seed=38)
    lw.save_safetensors(a, tmp_path / "a.safetensors", f2.MUSUBI_METADATA)
    lw.save_safetensors(b, tmp_path / "b.safetensors")
    bw, mix = node_module("block_weight"), node_module("mix")
    rows = block_stack_rows(enabled_1=True, lora_1="a.safetensors", strength_model_1=0.9, strength_clip_1=0.6,
                vector_1="DB00=0.5, SB01.linear1_mlp=0, TE1=0.3", enabled_2=True, lora_2="b.safetensors",
                strength_model_2=-0.7, vector_2="SB02.linear2=0.25, MOD=0, IN=0.5")
    with loras_folder(tmp_path):
        stack = bw.LoRACoreBlockStack().build(0, 1.0, 1.0, False, **rows)[0]
        stacked, stacked_clip, _ = bw.LoRACoreApplyBlockStack().apply(model, stack, clip=clip)
        path, _ = mix.LoRACoreMergeSave().merge("exact", 0, 0.0, "flux2_merge", False, "auto", "fp32",
                                                block_stack=stack, model=model, clip=clip)["result"]
        merged = comfy.utils.load_torch_file(path, safe_load=True)
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            meta = handle.metadata()
        assert meta["ss_base_model_version"] == "flux_2_dev"
        assert meta["modelspec.architecture"] == "Flux.2-dev/lora"
        assert meta["ss_network_module"] == "networks.lora_flux_2"
        assert all(k.startswith(("lora_unet_", "text_encoders.mistral3_24b.")) for k in merged), sorted(merged)[:5]
        assert any(k.startswith("lora_unet_single_blocks_0_linear1.") for k in merged)
        assert any(k.startswith("text_encoders.mistral3_24b.") for k in merged)
        ours, ours_clip, _ = node_module("loader").LoRACoreLoader().load(model, "flux2_merge.safetensors", 1.0, 1.0,
                                                                         clip=clip)
    assert_merged_file_equals_stack(model, clip, merged, ours, ours_clip, stacked, stacked_clip)


# ------------------------------------------------------------------------------------- standalone (diffusers)

def diffusers_reference(path, transformer, scale):
    return diffusers_fuse_reference(Flux2LoraLoaderMixin, path, transformer, scale)


@pytest.mark.parametrize("scale", [1.0, -0.6])
def test_lora_patcher_on_flux2_transformer_equals_diffusers(twin, tmp_path, scale):
    """Every Linear of Flux2Transformer2DModel (fused to_qkv_mlp_proj, gated ff.linear_in, the shared modulation,
    norm_out) in PEFT's file: LoraPatcher equals diffusers' own load + fuse; restore is exact."""
    state = f2.diffusers_peft(twin, seed=39)
    path = str(lw.save_safetensors(state, tmp_path / "peft.safetensors"))
    reference = diffusers_reference(path, twin, scale)
    ours = copy.deepcopy(twin)
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    patcher = LoraPatcher(transformer=ours)
    plan = patcher.apply([LoraRequest(read_lora_file(path), scale, 0.0)])
    assert not plan.reports[0].unmatched and not plan.reports[0].unused_keys, plan.text()
    after = ours.state_dict()
    assert after.keys() == reference.keys()
    changed = 0
    for key in reference:
        delta = (reference[key] - base[key]).abs().max().item()
        error = (after[key] - reference[key]).abs().max().item()
        assert error <= 1e-5 * delta + 2 * EPS * reference[key].abs().max().item(), key
        changed += delta > 0
    assert changed == len([k for k in state if k.endswith("lora_A.weight")])
    patcher.restore()
    assert all(torch.equal(v, base[k]) for k, v in ours.state_dict().items())


def test_lora_patcher_on_flux2_transformer_reads_bfl_files(flux2, twin, tmp_path):
    """A musubi (BFL-named, fused) file on the diffusers transformer: the fused qkv lands on to_q / to_k / to_v,
    linear1 on to_qkv_mlp_proj whole; equal to core's delta on the ComfyUI model moved through the same names
    (diffusers' converter for ai-toolkit files hard-codes 8 / 48 blocks, so it cannot read a tiny file)."""
    model, _ = flux2
    state = f2.musubi(model, seed=40)
    path = str(lw.save_safetensors(state, tmp_path / "musubi.safetensors"))
    patched, _ = comfy.sd.load_lora_for_models(model, None, state, 1.0, 0.0)
    base_c = {k: v.clone() for k, v in model.model.state_dict().items()}
    core = bake(patched)
    ours = copy.deepcopy(twin)
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    plan = LoraPatcher(transformer=ours).apply([LoraRequest(read_lora_file(path), 1.0, 0.0)])
    assert not plan.reports[0].unmatched, plan.text()
    after = ours.state_dict()
    p = "diffusion_model."
    pairs = []
    for i in range(tf.DEPTH):
        c = f"{p}double_blocks.{i}."
        d = f"transformer_blocks.{i}."
        for j, x in enumerate("qkv"):
            pairs.append((c + "img_attn.qkv.weight", slice(j * H, (j + 1) * H), d + f"attn.to_{x}.weight"))
            pairs.append((c + "txt_attn.qkv.weight", slice(j * H, (j + 1) * H), d + f"attn.add_{x}_proj.weight"))
        pairs += [(c + "img_mlp.0.weight", slice(None), d + "ff.linear_in.weight"),
                  (c + "txt_mlp.2.weight", slice(None), d + "ff_context.linear_out.weight")]
    for i in range(tf.DEPTH_SINGLE):
        pairs += [(f"{p}single_blocks.{i}.linear1.weight", slice(None),
                   f"single_transformer_blocks.{i}.attn.to_qkv_mlp_proj.weight"),
                  (f"{p}single_blocks.{i}.linear2.weight", slice(None), f"single_transformer_blocks.{i}.attn.to_out.weight")]
    for comfy_key, rows, dif_key in pairs:
        want = (core[comfy_key] - base_c[comfy_key])[rows]
        got = after[dif_key] - base[dif_key]
        assert (got - want).abs().max() <= 1e-5 * want.abs().max() + 1e-7, dif_key
