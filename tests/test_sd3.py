"""SD3 / SD3.5 end to end in the real host (ComfyUI 0.3.75 on CPU, tiny models built with its own classes):

* the key map is a superset of core's (every alias core maps lands on the same weight and rows; core's
  swap_scale_shift on the same rows), for the model and for every subset of the SD3 CLIP;
* every writer's file loads and equals core's loader where core reads it (1e-5 of the delta, at 1.0 and -0.6,
  same patched keys, one patch per fused weight), and equals core on the same tensors under names core reads
  where core cannot read the original (asserted: core really drops it);
* text-encoder modules apply where the CLIP holds that encoder and are reported as not applied otherwise;
* LoRAs for another family or size are refused naming both; block layout, named syntax inside fused weights,
  Inspire (BASE only), Block Info / sweep; merged block-weighted stacks load to the stack's weights;
* `LoraPatcher(transformer=...)` on diffusers' SD3Transformer2DModel equals diffusers' own
  `SD3LoraLoaderMixin.load_lora_weights` + `fuse_lora` (PEFT files), and core through core's own
  MMDiT <-> diffusers map (kohya files; diffusers has no kohya SD3 converter).
"""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers.loaders import SD3LoraLoaderMixin

from tests.comfy_host import import_comfy
from tests.pack import block_stack_rows, core_drops, diffusers_fuse_reference, host, loras_folder, node_module
from tests import dit_writers as dw
from tests import lora_writers as lw
from tests import sd3_writers as sw
from tests import tiny_models as tm
from tests import tiny_sd3 as ts
from tests.test_flux import EPS, assert_merged_file_equals_stack, assert_same, bake, compare
from tests.test_flux_blocks import inspire_reference

comfy = import_comfy()
import comfy.lora  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

from lora_core import blocks  # noqa: E402
from lora_core.api import LoraPatcher, LoraRequest  # noqa: E402
from lora_core.arch import bind_comfy_model, bind_diffusers, build_key_map, registry  # noqa: E402
from lora_core.arch.families.sd3 import SD35_LARGE, SD35_MEDIUM, SD3_MEDIUM  # noqa: E402
from lora_core.errors import LoraMatchError, LoraValueError  # noqa: E402
from lora_core.io import read_lora_file  # noqa: E402
from lora_core.types import LoraFile  # noqa: E402

VARIANTS = {"medium": SD3_MEDIUM, "3.5-medium": SD35_MEDIUM, "3.5-large": SD35_LARGE}


@pytest.fixture(scope="module")
def medium():
    return ts.comfy_sd3("medium"), ts.comfy_clip_sd3()


@pytest.fixture(scope="module")
def medium35():
    return ts.comfy_sd3("3.5-medium"), ts.comfy_clip_sd3()


@pytest.fixture(scope="module")
def twin():
    return ts.diffusers_sd3_twin("medium")


@pytest.fixture(scope="module")
def twin35():
    return ts.diffusers_sd3_twin("3.5-medium")


# ------------------------------------------------------------------------------------- key map vs core

def check_superset(km, theirs: dict, sd: dict) -> tuple[int, list]:
    """Every alias of core's map whose weight exists resolves to the same weight and rows; returns (checked,
    aliases we do not resolve)."""
    checked, missing = 0, []
    gen = torch.Generator().manual_seed(0)
    for alias, target in theirs.items():
        key = target if isinstance(target, str) else target[0]
        if key not in sd:
            continue   # core lists weights the model does not have (attn2 of other blocks, pre-only parts)
        ours = km.resolve(alias)
        if ours is None or ours.component in km.absent:   # absent: a name we know, for an encoder not there
            missing.append(alias)
            continue
        if isinstance(target, str):
            assert ours.pieces is None and ours.host_key == key, (alias, target, ours)
        elif target[1] is not None:   # (key, (dim, start, length)): a row slice of a fused weight
            _, start, length = target[1]
            assert [(p.host_key, p.dst, p.src, p.length) for p in ours.pieces] == [(key, start, 0, length)], alias
        else:                         # (key, None, fn): core transforms the delta (swap_scale_shift)
            delta = torch.randn(sd[key].shape[0], 3, generator=gen)
            moved = torch.full_like(delta, float("nan"))
            for p in ours.pieces:
                assert p.host_key == key
                moved[p.dst:p.dst + p.length] = delta[p.src:p.src + p.length]
            assert torch.equal(moved, target[2](delta)), alias
        checked += 1
    return checked, missing


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_model_key_map_is_a_superset_of_cores(variant):
    model = ts.comfy_sd3(variant)
    km = host(model).key_map
    assert km.arch is VARIANTS[variant] and km.conflicts == []
    sd = model.model.state_dict()
    theirs = comfy.lora.model_lora_keys_unet(model.model, {})
    checked, missing = check_superset(km, theirs, sd)
    # the position table `pos_embed` too (a parameter of the model itself: tests/test_param_diffs.py)
    assert missing == []
    assert checked > 200 and len(km) > checked
    assert any(isinstance(t, tuple) and t[1] is None for t in theirs.values())   # the swap rows were checked


CLIP_SUBSETS = {"l+g+t5": {}, "l+g": dict(t5=False), "l+t5": dict(clip_g=False), "g+t5": dict(clip_l=False),
                "t5": dict(clip_l=False, clip_g=False), "l": dict(clip_g=False, t5=False)}


@pytest.mark.parametrize("subset", list(CLIP_SUBSETS))
def test_clip_key_map_is_a_superset_of_cores(medium, subset):
    model, _ = medium
    clip = ts.comfy_clip_sd3(**CLIP_SUBSETS[subset])
    km = host(model, clip).key_map
    assert km.conflicts == []
    sd = clip.cond_stage_model.state_dict()
    theirs = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    checked, missing = check_superset(km, theirs, sd)
    held = subset.split("+")
    if "l" in held or "g" not in held:
        assert missing == []
    else:
        # Without CLIP-L core names CLIP-G like SDXL's refiner (`lora_te_`, `text_encoder.`); kohya's SD3 files
        # name it `lora_te2_` whatever the CLIP holds, which we read (those two stay CLIP-L's names).
        assert missing and all(a.startswith(("lora_te_", "text_encoder.")) for a in missing)
        t = km.resolve("lora_te2_text_model_encoder_layers_0_self_attn_q_proj")
        assert t.component == "te2" and t.host_key.startswith("clip_g.")
    assert checked > 20
    for name, component in (("lora_te1_text_model_encoder_layers_0_mlp_fc1", "te1"),
                            ("lora_te3_encoder_block_0_layer_0_SelfAttention_q", "te3")):
        target = km.resolve(name)
        assert target is not None and target.component == component
        assert (component in km.absent) == (target.host_key not in sd)   # absent encoders: known, not there


# ------------------------------------------------------------------------------------- detection

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_from_comfy_state_dicts_and_diffusers_twins(variant):
    model = ts.comfy_sd3(variant)
    sd = model.model.state_dict()
    with_config = bind_comfy_model(sd, model.model.model_config.unet_config, config_name="SD3")
    from_shapes = bind_comfy_model({k: tuple(v.shape) for k, v in sd.items()})
    from_keys = bind_comfy_model(list(sd))
    assert with_config.arch is from_shapes.arch is from_keys.arch is VARIANTS[variant]
    assert with_config.config == from_shapes.config == from_keys.config
    spec = with_config.config
    config = model.model.model_config.unet_config
    assert spec.hidden == 64 * config["depth"] and spec.blocks == config["depth"]
    assert spec.attn2 == tuple(config["x_block_self_attn_layers"]) and spec.qk_norm == ("qk_norm" in config)
    twin = ts.diffusers_sd3_twin(variant)
    dif = bind_diffusers(twin.state_dict())
    assert dif.arch is VARIANTS[variant] and dif.config == spec and dif.unbound == []
    # neither is taken for another family (Flux's diffusers class also has transformer_blocks.N.attn.to_q)
    flux = dw.diffusers_flux_twin()
    assert bind_diffusers(flux.state_dict()).family is not SD3_MEDIUM.family


def test_clip_objects_and_metadata_name_the_variant():
    assert registry.arch_of_clip({"clip_l", "clip_g", "t5xxl"}).family is SD3_MEDIUM.family
    assert registry.arch_of_clip({"clip_g", "t5xxl"}).family is SD3_MEDIUM.family
    assert registry.arch_of_clip({"clip_l", "clip_g"}).name == "SDXL"   # SD3 without T5: the model decides
    for model_type, variant in (("medium", SD3_MEDIUM), ("5-medium", SD35_MEDIUM), ("5-large", SD35_LARGE)):
        meta = sw.KOHYA_METADATA[model_type]
        assert registry.arch_of_metadata({"ss_base_model_version": meta["ss_base_model_version"]}) is variant
        assert registry.arch_of_metadata({"modelspec.architecture": meta["modelspec.architecture"]}) is variant


def real_shape_lora(hidden: int, blocks=(0,), attn2: bool = False, mod_rows: int = 0, meta=None) -> LoraFile:
    """A rank-1 kohya file with the full-size shapes of an SD3 variant (no model needed)."""
    gen = torch.Generator().manual_seed(5)
    tensors = {}

    def pair(name, rows, cols):
        tensors[f"{name}.lora_down.weight"] = 0.01 * torch.randn(1, cols, generator=gen)
        tensors[f"{name}.lora_up.weight"] = 0.01 * torch.randn(rows, 1, generator=gen)

    for i in blocks:
        pair(f"lora_unet_joint_blocks_{i}_x_block_attn_qkv", 3 * hidden, hidden)
        pair(f"lora_unet_joint_blocks_{i}_context_block_mlp_fc1", 4 * hidden, hidden)
        if attn2:
            pair(f"lora_unet_joint_blocks_{i}_x_block_attn2_qkv", 3 * hidden, hidden)
        if mod_rows:
            pair(f"lora_unet_joint_blocks_{i}_x_block_adaLN_modulation_1", mod_rows, hidden)
    return LoraFile(None, tensors, dict(meta or {}))


def test_variant_of_a_file_from_its_shapes_when_metadata_names_only_the_family():
    """ai-toolkit writes `sd_3` for every SD3: the variant then comes from the shapes (hidden 1536 / 2432,
    attn2, 9h vs 6h modulation rows), among SD3's variants only."""
    sd_3 = {"ss_base_model_version": "sd_3"}
    assert registry.arch_of_metadata(sd_3) is None and registry.family_of_metadata(sd_3) is SD3_MEDIUM.family
    assert registry.detect_lora(real_shape_lora(2432, meta=sd_3)) is SD35_LARGE
    assert registry.detect_lora(real_shape_lora(1536, attn2=True, meta=sd_3)) is SD35_MEDIUM
    assert registry.detect_lora(real_shape_lora(1536, mod_rows=6 * 1536, meta=sd_3)) is SD3_MEDIUM
    assert registry.detect_lora(real_shape_lora(1536, mod_rows=9 * 1536)) is SD35_MEDIUM
    assert registry.detect_lora(real_shape_lora(2432, blocks=(0, 30))) is SD35_LARGE   # block 30: Large only
    assert registry.base_model_name(real_shape_lora(2432, meta=sd_3)) == ("SD3.5 Large", "metadata")
    # SD3 Medium and 3.5 Medium share every plain module: nothing tells them apart, so no guess
    assert registry.detect_lora(real_shape_lora(1536)) is None


# ------------------------------------------------------------------------------------- writers core reads

def test_kohya_names_with_all_three_text_encoders(medium, tmp_path, caplog):
    model, clip = medium
    state = sw.kohya_sd3(model, seed=1)
    assert "lora_unet_x_embedder_proj.lora_down.weight" in state   # emb_dims: the conv patch embedder
    te = sw.kohya_text_encoders(clip, seed=2)
    assert {k.split("_")[1] for k in te} == {"te1", "te2", "te3"}
    reports = compare(medium, tmp_path, caplog, {**state, **te}, with_clip=True)
    assert "Stable Diffusion 3 Medium" in reports[0]
    applied = next(line for line in reports[0].splitlines() if "applied modules:" in line)
    assert all(f"{c} " in applied for c in ("te1", "te2", "te3", "transformer"))


def test_kohya_names_on_sd35_medium_with_attn2(medium35, tmp_path, caplog):
    model, clip = medium35
    state = sw.kohya_sd3(model, seed=3)
    assert any("_x_block_attn2_qkv." in k for k in state)
    reports = compare(medium35, tmp_path, caplog, {**state, **sw.kohya_text_encoders(clip, seed=4)}, with_clip=True)
    assert "Stable Diffusion 3.5 Medium" in reports[0]


@pytest.mark.parametrize("variant", ["medium", "3.5-large"])
def test_comfy_native_names_every_layer(medium, variant, tmp_path, caplog):
    model = ts.comfy_sd3(variant)
    pair = (model, medium[1])
    compare(pair, tmp_path, caplog, sw.comfy_native(model, seed=5))
    compare(pair, tmp_path, caplog, sw.comfy_native(model, seed=6, peft_suffixes=True))


def test_full_diffs_with_bias(medium35, tmp_path, caplog):
    model, _ = medium35
    state = sw.full_diffs(model, seed=7)
    assert "diffusion_model.joint_blocks.0.x_block.attn2.ln_q.diff" in state   # norms of 3.5 too
    compare(medium35, tmp_path, caplog, state)


@pytest.mark.parametrize("which", ["medium", "3.5-medium"])
def test_diffusers_peft_file_sliced_into_fused_weights(medium, medium35, twin, twin35, tmp_path, caplog, which):
    """PEFT on diffusers' SD3Transformer2DModel (diffusers, ai-toolkit, diffusion-pipe): to_q/to_k/to_v and
    add_*_proj land on rows of the fused qkv (attn2.to_* on x_block.attn2.qkv), norm_out.linear and the last
    block's norm1_context.linear swap their halves."""
    pair, transformer = (medium, twin) if which == "medium" else (medium35, twin35)
    state, _ = sw.peft_sd3(transformer, seed=8)
    last = transformer.config.num_layers - 1
    assert f"transformer.transformer_blocks.{last}.norm1_context.linear.lora_A.weight" in state
    assert any(".attn2.to_q." in k for k in state) == (which == "3.5-medium")
    compare(pair, tmp_path, caplog, state)
    with loras_folder(tmp_path):
        ours, _ = node_module("loader").LoRACoreLoaderModelOnly().load(pair[0], "lora.safetensors", 1.0)
    assert len(ours.patches) < len([k for k in state if "lora_A" in k]), "parts of a fused weight are one patch"


def test_onetrainer_and_simpletuner_lycoris_names(medium35, twin35, tmp_path, caplog):
    compare(medium35, tmp_path, caplog, sw.onetrainer_sd3(twin35, seed=9))
    state = lw.lycoris_state_dict(twin35, "lokr", prefix="lycoris", rank=4, alpha=2.0, seed=10,
                                  target_module=("Linear",))
    assert any(k.startswith("lycoris_transformer_blocks_0_attn2_to_q.") for k in state)
    compare(medium35, tmp_path, caplog, state)


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr", "full"])
def test_lycoris_inside_kohya_on_the_comfy_model(medium, tmp_path, caplog, algo):
    model, _ = medium
    blocks_ = torch.nn.ModuleDict({"joint_blocks": sw.mmdit(model).joint_blocks})
    state = lw.lycoris_state_dict(blocks_, algo, prefix="lora_unet", rank=4, alpha=2.0, seed=11,
                                  target_module=("Linear",))
    compare(medium, tmp_path, caplog, state)


def test_peft_base_model_names(medium, twin, tmp_path, caplog):
    """flash-sd3 / PEFT scripts: `base_model.model.<diffusers path>` (core reads these for SD3)."""
    state, _ = sw.peft_sd3(twin, seed=12)
    compare(medium, tmp_path, caplog, sw.rename(state, "transformer.", "base_model.model."))


# ------------------------------------------------------------------------------------- writers core misreads

def test_bare_diffusers_and_bare_native_names(medium, twin, tmp_path, caplog):
    """Bare diffusers names (`transformer_blocks.0.attn.to_q`) and bare MMDiT names: core maps neither. The
    truth: core on the same tensors under `transformer.` / `diffusion_model.`."""
    model, _ = medium
    state, _ = sw.peft_sd3(twin, seed=13)
    bare = sw.rename(state, "transformer.", "")
    assert core_drops(model, None, bare)
    compare(medium, tmp_path, caplog, bare, core_state=state)
    native = sw.comfy_native(model, seed=14, prefix="")
    assert core_drops(model, None, native)
    compare(medium, tmp_path, caplog, native, core_state={"diffusion_model." + k: v for k, v in native.items()})


# ------------------------------------------------------------------------------------- text encoders

def diffusers_te(clip, seed: int, prefixes=(("clip_l", "text_encoder."), ("clip_g", "text_encoder_2."))) -> dict:
    """diffusers' text-encoder LoRA names (`text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.
    weight`; SD3LoraLoaderMixin loads text_encoder / text_encoder_2); `text_encoder_3.` follows the pipeline's
    attribute for T5 (StableDiffusion3Pipeline.text_encoder_3)."""
    state = {}
    for i, (attribute, prefix) in enumerate(prefixes):
        encoder = getattr(clip.cond_stage_model, attribute).transformer
        layers = dw.linear_layers(encoder, include=(".encoder.layers.", "encoder.block."))
        state.update(dw.lora_pairs(layers, lambda p, prefix=prefix: prefix + p, 4, None, seed + i,
                                   ".lora_B.weight", ".lora_A.weight", ""))
    return state


def test_diffusers_text_encoder_names(medium, tmp_path, caplog):
    model, clip = medium
    unet = sw.kohya_sd3(model, seed=14, embedders=False)   # the model part (every comparison needs a delta)
    reports = compare(medium, tmp_path, caplog, {**unet, **diffusers_te(clip, 15)}, with_clip=True)
    assert "te2" in reports[0]
    # text_encoder_3. (T5): core has no such name; the truth is core on kohya's lora_te3_ names
    t5 = diffusers_te(clip, 16, (("t5xxl", "text_encoder_3."),))
    assert core_drops(model, clip, t5)
    kohya = {"lora_te3_" + k[len("text_encoder_3."):].replace(".lora_A.weight", "").replace(".lora_B.weight", "")
             .replace(".", "_") + (".lora_down.weight" if "lora_A" in k else ".lora_up.weight"): v
             for k, v in t5.items()}
    compare(medium, tmp_path, caplog, {**unet, **t5}, core_state={**unet, **kohya}, with_clip=True)


def test_clip_without_clip_l_reads_kohya_te2_and_te3_where_core_drops_them(medium, tmp_path, caplog):
    """An SD3 CLIP holding CLIP-G and T5 only: kohya names them lora_te2_ and lora_te3_; core numbers by the
    encoders present (CLIP-G `lora_te_`, T5 `lora_te2_`) and drops both. Truth: core under its numbering."""
    model, _ = medium
    clip = ts.comfy_clip_sd3(clip_l=False)
    state = {**sw.kohya_sd3(model, seed=16), **sw.kohya_text_encoders(clip, seed=17)}
    assert core_drops(model, clip, state)
    renamed = {("lora_te_" + k[len("lora_te2_"):] if k.startswith("lora_te2_") else
                "lora_te2_" + k[len("lora_te3_"):] if k.startswith("lora_te3_") else k): v for k, v in state.items()}
    reports = compare((model, clip), tmp_path, caplog, state, core_state=renamed, with_clip=True)
    assert "te2" in reports[0] and "te3" in reports[0]


def test_t5_under_cores_numbering_when_clips_are_missing(medium, tmp_path, caplog):
    """ComfyUI names T5 lora_te2_ next to CLIP-L alone and lora_te1_ alone (its count of encoders): read too."""
    model, _ = medium
    for kwargs, prefix in ((dict(clip_g=False), "lora_te2"), (dict(clip_l=False, clip_g=False), "lora_te1")):
        clip = ts.comfy_clip_sd3(**kwargs)
        state = {**sw.kohya_sd3(model, seed=18), **sw.kohya_text_encoders(clip, seed=18, prefixes={"t5xxl": prefix})}
        compare((model, clip), tmp_path, caplog, state, with_clip=True)


def test_encoders_the_clip_lacks_are_reported_not_applied(medium, tmp_path, caplog):
    """A full kohya file (CLIP-L, CLIP-G, T5) on a CLIP without T5: the T5 part is listed as not applied with the
    reason, the rest equals core (which drops the T5 keys); no CLIP at all: every encoder 'no CLIP connected'."""
    model, full_clip = medium
    clip = ts.comfy_clip_sd3(t5=False)
    state = {**sw.kohya_sd3(model, seed=19), **sw.kohya_text_encoders(full_clip, seed=20)}
    t5_keys = [k for k in state if k.startswith("lora_te3_")]
    assert t5_keys and core_drops(model, clip, state)
    reports = compare((model, clip), tmp_path, caplog, state, with_clip=True,
                      core_state={k: v for k, v in state.items() if k not in t5_keys})
    assert "not applied: te3" in reports[0] and "the CLIP has no T5-XXL" in reports[0]
    lw.save_safetensors(state, tmp_path / "full.safetensors")
    with loras_folder(tmp_path):
        _, report = node_module("loader").LoRACoreLoaderModelOnly().load(model, "full.safetensors", 1.0)
    assert all(f"not applied: {c}" in report for c in ("te1", "te2", "te3")) and "no CLIP connected" in report
    assert "WARNING" not in report and "unmatched" not in report


# ------------------------------------------------------------------------------------- fit and mismatch

def _refused(model, name) -> str:
    with pytest.raises(LoraMatchError) as caught:
        node_module("loader").LoRACoreLoaderModelOnly().load(model, name, 1.0)
    return str(caught.value)


def test_loras_for_other_families_and_sizes_are_refused_naming_both(medium, twin35, tmp_path):
    model, _ = medium
    sd_model, flux_model = tm.comfy_sd15(), tm.comfy_flux()
    large = ts.comfy_sd3("3.5-large")
    files = {
        "sd15.safetensors": (lw.kohya_state_dict(lw.unet_targets(sd_model.model.diffusion_model), "lora_unet",
                                                 seed=1), None),
        "flux.safetensors": (dw.kohya_flux(flux_model, seed=2), None),
        "sd3.safetensors": (sw.kohya_sd3(model, seed=3), sw.KOHYA_METADATA["medium"]),
        "sd3_bare.safetensors": (sw.kohya_sd3(model, seed=3), None),
        "large.safetensors": (sw.kohya_sd3(large, seed=4), sw.KOHYA_METADATA["5-large"]),
        "sd35m_peft.safetensors": (sw.peft_sd3(twin35, seed=5)[0], None),
    }
    for name, (state, meta) in files.items():
        lw.save_safetensors(state, tmp_path / name, meta)
    with loras_folder(tmp_path):
        text = _refused(model, "sd15.safetensors")
        assert "Stable Diffusion 1.x" in text and "Stable Diffusion 3 Medium" in text
        text = _refused(sd_model, "sd3.safetensors")
        assert "made for Stable Diffusion 3 Medium" in text and "Stable Diffusion 1.x" in text
        text = _refused(sd_model, "sd3_bare.safetensors")   # no metadata: the key marks say SD3
        assert "made for Stable Diffusion 3 / 3.5" in text and "the model is Stable Diffusion 1.x" in text
        text = _refused(flux_model, "sd3.safetensors")
        assert "Stable Diffusion 3 Medium" in text and "Flux.1 [dev]" in text
        text = _refused(model, "flux.safetensors")
        assert "Flux.1" in text and "Stable Diffusion 3 Medium" in text
        # diffusers names: SD3 and Flux both have transformer_blocks.N.attn.to_q; the widths and SD3.5's attn2
        # and third block tell the file's model
        text = _refused(flux_model, "sd35m_peft.safetensors")
        assert "Stable Diffusion 3.5 Medium" in text and "Flux.1 [dev]" in text
        text = _refused(model, "large.safetensors")   # 3.5 Large on SD3 Medium: the widths differ
        assert "does not fit" in text and "Stable Diffusion 3.5 Large" in text and "Stable Diffusion 3 Medium" in text


def test_full_size_large_lora_on_a_medium_model_names_both(medium, tmp_path):
    """A 3.5 Large file with its real widths (2432) and no metadata: refused on a Medium model, naming 3.5 Large
    (its block 30 exists only in Large) and the model."""
    model, _ = medium
    lora = real_shape_lora(2432, blocks=(0, 30))
    lw.save_safetensors(lora.tensors, tmp_path / "large_full.safetensors")
    with loras_folder(tmp_path):
        text = _refused(model, "large_full.safetensors")
    assert "Stable Diffusion 3.5 Large" in text and "Stable Diffusion 3 Medium" in text and "2432" in text


def test_reasons_for_names_this_model_lacks(medium):
    model, _ = medium
    km = host(model).key_map
    cases = {
        "lora_unet_joint_blocks_5_x_block_attn_qkv": "has 2 joint blocks",
        "transformer.transformer_blocks.7.attn.to_q": "has 2 joint blocks",
        "lora_unet_joint_blocks_0_x_block_attn2_qkv": "SD3.5 Medium",
        "transformer.transformer_blocks.0.attn2.to_q": "SD3.5 Medium",
        "lora_unet_joint_blocks_1_context_block_mlp_fc1": "pre-only",
        "transformer.transformer_blocks.1.ff_context.net.0.proj": "pre-only",
        "diffusion_model.joint_blocks.0.x_block.attn.ln_q": "no q/k norms",
        "lora_unet_double_blocks_0_img_attn_qkv": "Flux.1",
        "lora_unet_input_blocks_1_1_proj_in": "SD UNet",
    }
    for name, words in cases.items():
        assert km.resolve(name) is None, name
        assert words in km.explain_unmatched(name), (name, km.explain_unmatched(name))
    # on a Flux model, SD3's own names are explained as SD3's; diffusers names Flux shares are not claimed
    flux_km = host(tm.comfy_flux()).key_map
    assert "SD3" in flux_km.explain_unmatched("lora_unet_joint_blocks_0_context_block_attn_qkv")
    assert "SD3.5 Medium" in flux_km.explain_unmatched("transformer.transformer_blocks.0.attn2.to_q")
    assert "SD3" not in flux_km.explain_unmatched("transformer.transformer_blocks.40.attn.to_q")
    sd_km = host(tm.comfy_sd15()).key_map   # an SD UNet's own diffusers attn2 names stay SD's
    assert "SD3" not in sd_km.explain_unmatched("unet.down_blocks.3.attentions.0.transformer_blocks.0.attn2.to_k")


# ------------------------------------------------------------------------------------- blocks

def test_block_layouts_as_data():
    assert SD3_MEDIUM.blocks == ("TE1", "TE2", "TE3", "IN") + tuple(f"JB{i:02d}" for i in range(24)) + ("OUT",)
    assert SD35_LARGE.blocks[-2:] == ("JB37", "OUT") and len(SD35_LARGE.blocks) == 43
    assert SD3_MEDIUM.block_groups["BASE"] == ("TE1", "TE2", "TE3")
    layout = SD35_MEDIUM.layout
    assert "attn2" in layout.descriptions["JB12"] and "attn2" not in layout.descriptions["JB13"]
    assert "pre-only" in layout.descriptions["JB23"]
    assert layout.element_groups["ctx"] == {"ctx_attn", "ctx_mlp", "ctx_mod"}
    assert not layout.a1111 and not layout.inspire_groups
    with pytest.raises(LoraValueError, match="no positional layout for sd3"):
        blocks.resolve_vector("sd3", "a1111", ",".join(["1"] * 17))


def test_named_syntax_with_elements_inside_fused_weights(medium, twin, tmp_path):
    """`JB00.ctx=0` zeroes block 0's text stream only, `JB01=0.5` halves block 1, `OUT=0`; on a diffusers file,
    `JB00.x_attn=0.25` scales the to_q/to_k/to_v rows it puts into the fused qkv (and to_out.0)."""
    model, clip = medium
    state = sw.kohya_sd3(model, seed=21)
    bw = node_module("block_weight").LoRACoreBlockWeight()

    def run(name, lora, vector):
        lw.save_safetensors(lora, tmp_path / name)
        with loras_folder(tmp_path):
            patched, _, table = bw.load(model, name, 1.0, 0.0, "named", "custom", vector, 0, 1.0, 1.0, False)
        return bake(patched), table

    base = model.model.state_dict()
    got, table = run("k.safetensors", state, "JB00.ctx=0, JB01=0.5, OUT=0")
    whole, _ = run("k.safetensors", state, "")
    d = {k: got[k] - base[k] for k in got}
    full = {k: whole[k] - base[k] for k in whole}
    p = "diffusion_model.joint_blocks."
    assert f"{p}0.context_block.attn.qkv.weight" not in d and f"{p}0.context_block.mlp.fc1.weight" not in d
    torch.testing.assert_close(d[f"{p}0.x_block.attn.qkv.weight"], full[f"{p}0.x_block.attn.qkv.weight"])
    torch.testing.assert_close(d[f"{p}1.x_block.mlp.fc2.weight"], 0.5 * full[f"{p}1.x_block.mlp.fc2.weight"],
                               rtol=1e-5, atol=1e-7)
    assert "diffusion_model.final_layer.linear.weight" not in d and "JB00" in table
    peft, _ = sw.peft_sd3(twin, seed=22)
    got, _ = run("p.safetensors", peft, "JB00.x_attn=0.25")
    whole, _ = run("p.safetensors", peft, "")
    for key in (f"{p}0.x_block.attn.qkv.weight", f"{p}0.x_block.attn.proj.weight"):
        torch.testing.assert_close(got[key] - base[key], 0.25 * (whole[key] - base[key]), rtol=1e-5, atol=1e-7)
    key = f"{p}0.context_block.attn.qkv.weight"
    torch.testing.assert_close(got[key], whole[key])


def test_inspire_mode_is_base_only_like_inspire(medium, tmp_path):
    """Inspire gives joint_blocks no slots: every key takes the first value (BASE), whatever the vector's length
    (Inspire needs at least 12 values and has no maximum). Reference: a re-statement of Inspire's load_lbw on
    core's own load_lora (tests/test_flux_blocks.py)."""
    model, clip = medium
    state = {**sw.kohya_sd3(model, seed=23), **sw.kohya_text_encoders(clip, seed=24)}
    lw.save_safetensors(state, tmp_path / "insp.safetensors")
    base = {k: v.clone() for k, v in model.model.state_dict().items()}
    base_clip = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    for vector in (",".join(["0.6"] + ["0"] * 11), ",".join(["-0.4"] + ["1"] * 40)):
        with loras_folder(tmp_path):
            ours, ours_clip, table = node_module("block_weight").LoRACoreBlockWeight().load(
                model, "insp.safetensors", 0.8, 0.7, "inspire", "custom", vector, 0, 1.0, 1.0, False, clip=clip)
        ref, ref_clip = inspire_reference(model, clip, state, 0.8, 0.7, vector)
        assert_same(bake(ours), bake(ref), base, f"inspire {vector[:12]}")
        assert_same(bake(ours_clip.patcher), bake(ref_clip.patcher), base_clip, "inspire CLIP")
        assert "no block layout" in table
    with pytest.raises(LoraValueError, match="at least 12"):
        blocks.resolve_vector("sd3", "inspire", "1,1,1")


def test_block_info_and_sweep(medium, tmp_path):
    model, _ = medium
    state = sw.kohya_sd3(model, seed=25)
    lw.save_safetensors(state, tmp_path / "info.safetensors", sw.KOHYA_METADATA["medium"])
    tools = node_module("block_tools")
    with loras_folder(tmp_path):
        info = tools.block_info("info.safetensors", "auto", model=model)
        assert list(info["blocks"]) == ["IN", "JB00", "JB01", "OUT"]
        assert all(entry["norm"] > 0 for entry in info["blocks"].values())
        text, chart = tools.LoRACoreBlockInfo().inspect("info.safetensors", "auto")   # layout from metadata
        assert "Stable Diffusion 3 Medium" in text and "layout only" in text and chart.ndim == 4
        models, labels = tools.LoRACoreBlockSweep().sweep(model, "info.safetensors", 1.0, "blocks", 1.0, 0.0,
                                                          "named", "", 0, 1.0, 1.0)
    assert [label.split()[0] for label in labels[1:]] == ["IN", "JB00", "JB01", "OUT"]
    knocked = set(models[2].patches)   # JB00 off
    assert knocked == {k for k in models[0].patches if ".joint_blocks.0." not in k}


# ------------------------------------------------------------------------------------- merge / export

def test_merged_block_weighted_stack_loads_to_the_stacks_weights(medium35, twin35, tmp_path):
    """kohya (with all three text encoders) and diffusers-named LoRAs, block-weighted, merged into one kohya file
    (exact): `lora_unet_<canonical _>`, `lora_te1_/lora_te2_/lora_te3_`, SD3.5 Medium's metadata; core and our
    loader give the stack's weights."""
    model, clip = medium35
    a = {**sw.kohya_sd3(model, seed=26), **sw.kohya_text_encoders(clip, seed=27)}
    b, _ = sw.peft_sd3(twin35, seed=28)
    lw.save_safetensors(a, tmp_path / "a.safetensors")
    lw.save_safetensors(b, tmp_path / "b.safetensors")
    bw, mix = node_module("block_weight"), node_module("mix")
    rows = block_stack_rows(enabled_1=True, lora_1="a.safetensors", strength_model_1=0.9, strength_clip_1=0.6,
                vector_1="JB00=0.5, JB02.ctx=0, TE2=0.3", enabled_2=True, lora_2="b.safetensors",
                strength_model_2=-0.7, vector_2="JB01.x_attn2=0.25, IN=0")
    with loras_folder(tmp_path):
        stack = bw.LoRACoreBlockStack().build(0, 1.0, 1.0, False, **rows)[0]
        stacked, stacked_clip, _ = bw.LoRACoreApplyBlockStack().apply(model, stack, clip=clip)
        path, _ = mix.LoRACoreMergeSave().merge("exact", 0, 0.0, "sd3_merge", False, "auto", "fp32",
                                                block_stack=stack, model=model, clip=clip)["result"]
        merged = comfy.utils.load_torch_file(path, safe_load=True)
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            meta = handle.metadata()
        assert meta["ss_base_model_version"] == "5-medium"
        assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
        assert meta["ss_network_module"] == "networks.lora_sd3"
        assert all(any(k.startswith(p) for k in merged) for p in ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_"))
        assert all(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoders.")) for k in merged)
        assert any(k.startswith("lora_unet_joint_blocks_1_x_block_attn2_qkv.") for k in merged)
        ours, ours_clip, _ = node_module("loader").LoRACoreLoader().load(model, "sd3_merge.safetensors", 1.0, 1.0,
                                                                         clip=clip)
    assert_merged_file_equals_stack(model, clip, merged, ours, ours_clip, stacked, stacked_clip)


# ------------------------------------------------------------------------------------- standalone (diffusers)

def diffusers_reference(path, transformer, scale):
    # no text-encoder part in these files
    return diffusers_fuse_reference(SD3LoraLoaderMixin, path, transformer, scale, text_encoder=None,
                                    text_encoder_2=None)


def core_reference(variant, path, scale):
    """(diffusers twin carrying the ComfyUI model's base weights, twin state after core's loader), through core's
    own MMDiT <-> diffusers map (comfy.utils.mmdit_to_diffusers: slices and swap_scale_shift)."""
    model = ts.comfy_sd3(variant)
    table = comfy.utils.mmdit_to_diffusers(model.model.model_config.unet_config, output_prefix="diffusion_model.")

    def to_diffusers(state):
        out = {}
        for dif, target in table.items():
            if isinstance(target, str):
                if target in state:
                    out[dif] = state[target]
            elif target[0] in state:
                weight = state[target[0]]
                out[dif] = weight.narrow(*target[1]) if target[1] is not None else target[2](weight)
        return out

    twin = ts.diffusers_sd3_twin(variant)
    twin.load_state_dict({**twin.state_dict(), **to_diffusers(model.model.state_dict())})
    patched, _ = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(path), scale, 0.0)
    mm.load_models_gpu([patched], force_full_load=True)
    after = {k: v.clone() for k, v in to_diffusers(patched.model.state_dict()).items()}
    mm.unload_all_models()
    return twin, {**twin.state_dict(), **after}


@pytest.mark.parametrize("variant", ["medium", "3.5-medium"])
@pytest.mark.parametrize("source", ["peft", "kohya"])
@pytest.mark.parametrize("scale", [1.0, -0.6])
def test_lora_patcher_on_sd3_transformer_equals_reference(tmp_path, variant, source, scale):
    twin = ts.diffusers_sd3_twin(variant)
    if source == "peft":
        state, _ = sw.peft_sd3(twin, seed=29)   # pos_embed.proj too: a conv LoRA
    else:
        state = sw.kohya_sd3(ts.comfy_sd3(variant), seed=30)
    path = str(lw.save_safetensors(state, tmp_path / f"{source}.safetensors"))
    if source == "peft":
        reference = diffusers_reference(path, twin, scale)
    else:
        twin, reference = core_reference(variant, path, scale)
    ours = copy.deepcopy(twin)
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    patcher = LoraPatcher(transformer=ours)
    plan = patcher.apply([LoraRequest(read_lora_file(path), scale, 0.0)])
    assert not plan.reports[0].unmatched and not plan.reports[0].unused_keys, plan.text()
    state_after = ours.state_dict()
    assert state_after.keys() == reference.keys()
    changed = 0
    for key in reference:
        delta = (reference[key] - base[key]).abs().max().item()
        error = (state_after[key] - reference[key]).abs().max().item()
        assert error <= 1e-5 * delta + 2 * EPS * reference[key].abs().max().item(), key
        changed += delta > 0
    assert changed > 20
    if source == "kohya":   # a fused kohya qkv lands on the three split diffusers weights
        assert any(".attn.add_k_proj." in k for k in plan.patches) and any(".norm_out.linear." in k
                                                                           for k in plan.patches)
    patcher.apply([LoraRequest(read_lora_file(path), 0.3, 0.0)])
    patcher.restore()
    assert all(torch.equal(v, base[k]) for k, v in ours.state_dict().items())
