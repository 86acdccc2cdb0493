"""Wan 2.1 / 2.2 end to end in the real host (ComfyUI 0.3.75 on CPU, tiny models built with its own classes):

* recognition (T2V, 2.1 I2V, 2.2 I2V-A14B, TI2V-5B; diffusers' WanTransformer3DModel) that claims no other
  family's state dicts; the key map is a superset of core's (model and UMT5 CLIP);
* every writer's file equals core's loader where core reads it (1e-5 of the delta at 1.0 and -0.6, same patched
  keys) and core on the same tensors under names core reads where it cannot (asserted: core really drops them);
* the UMT5 text encoder applies where the CLIP holds it and is reported as not applied otherwise;
* LoRAs for other families and sizes are refused naming both; a Wan 2.1 I2V LoRA on a 2.2 I2V-A14B model applies
  everything but the image branch and says why;
* block layout, named syntax with element kinds, Inspire (BASE only), A1111 refused, Block Info / sweep; merged
  block-weighted stacks load to the stack's weights in core and ours, with musubi's metadata;
* `LoraPatcher(transformer=...)` on diffusers' WanTransformer3DModel equals diffusers' own
  `WanLoraLoaderMixin.load_lora_weights` + `fuse_lora`.
"""
from __future__ import annotations

import copy

import pytest
import torch

from tests.comfy_host import import_comfy
from tests.pack import block_stack_rows, core_drops, diffusers_fuse_reference, host, loras_folder, node_module
from tests import dit_writers as dw
from tests import lora_writers as lw
from tests import tiny_models as tm
from tests import tiny_wan as tw
from tests import wan_writers as ww
from tests.test_flux import EPS, assert_merged_file_equals_stack, assert_same, bake, compare

comfy = import_comfy()
import comfy.lora  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

from lora_core import blocks  # noqa: E402
from lora_core.api import LoraPatcher, LoraRequest  # noqa: E402
from lora_core.arch import bind_comfy_model, bind_diffusers, registry  # noqa: E402
from lora_core.arch.families import wan as wan_family  # noqa: E402
from lora_core.arch.families.wan import (WAN21_I2V_14B, WAN21_T2V_1_3B, WAN22_I2V_A14B, WAN22_TI2V_5B,  # noqa: E402
                                         WAN_T2V_14B)
from lora_core.errors import LoraMatchError, LoraValueError  # noqa: E402
from lora_core.io import read_lora_file  # noqa: E402
from lora_core.types import LoraFile  # noqa: E402

VARIANTS = {"t2v": WAN_T2V_14B, "i2v": WAN21_I2V_14B, "i2v-a14b": WAN22_I2V_A14B, "5b": WAN22_TI2V_5B}


@pytest.fixture(scope="module")
def clip():
    return tw.comfy_clip_wan()


@pytest.fixture(scope="module")
def t2v(clip):
    return tw.comfy_wan("t2v"), clip


@pytest.fixture(scope="module")
def i2v(clip):
    return tw.comfy_wan("i2v"), clip


@pytest.fixture(scope="module")
def twin():
    return tw.diffusers_wan_twin("t2v")


@pytest.fixture(scope="module")
def twin_i2v():
    return tw.diffusers_wan_twin("i2v")


# ------------------------------------------------------------------------------------- recognition, key map

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_from_comfy_state_dicts_and_diffusers_twins(variant):
    model = tw.comfy_wan(variant)
    sd = model.model.state_dict()
    config = model.model.model_config.unet_config
    with_config = bind_comfy_model(sd, config, config_name=type(model.model.model_config).__name__)
    from_shapes = bind_comfy_model({k: tuple(v.shape) for k, v in sd.items()})
    assert with_config.arch is from_shapes.arch is VARIANTS[variant]
    assert with_config.config == from_shapes.config and with_config.unbound == []
    spec = with_config.config
    assert (spec.dim, spec.depth, spec.ffn, spec.in_dim, spec.out_dim, spec.text_dim) == (
        config["dim"], config["num_layers"], config["ffn_dim"], config["in_dim"], config["out_dim"], tw.TEXT)
    assert spec.i2v == (variant == "i2v")
    if variant in ("t2v", "i2v"):
        dif = bind_diffusers(tw.diffusers_wan_twin(variant).state_dict())
        assert dif.arch is VARIANTS[variant] and dif.config == spec and dif.unbound == []
    # no other family claims it, and Wan claims no other family's state dicts
    keys = {k[len("diffusion_model."):]: tuple(v.shape) for k, v in sd.items() if k.startswith("diffusion_model.")}
    for family in registry.families():
        if family is not wan_family.FAMILY:
            assert family.detect_host(list(keys), keys, None) is None, family.name
    for other in (tm.comfy_flux(), tm.comfy_sd15()):
        okeys = {k[len("diffusion_model."):]: tuple(v.shape) for k, v in other.model.state_dict().items()
                 if k.startswith("diffusion_model.")}
        assert wan_family.FAMILY.detect_host(list(okeys), okeys, None) is None
    flux_dif = {k: tuple(v.shape) for k, v in dw.diffusers_flux_twin().state_dict().items()}
    assert wan_family.FAMILY.detect_diffusers(list(flux_dif), flux_dif) is None


def test_full_size_variants_from_their_real_shapes():
    """ComfyUI's detector reads dim from head.modulation, out_dim from head.head rows / 4, in_dim from the patch
    embedding: the real sizes of each release (meta-free: shapes only)."""
    def shapes(dim, depth, ffn, in_dim, out_dim, i2v=False):
        s = {"head.modulation": (1, 2, dim), "head.head.weight": (4 * out_dim, dim),
             "patch_embedding.weight": (dim, in_dim, 1, 2, 2), "text_embedding.0.weight": (dim, 4096)}
        for i in range(depth):
            s[f"blocks.{i}.self_attn.q.weight"] = (dim, dim)
            s[f"blocks.{i}.ffn.0.weight"] = (ffn, dim)
            if i2v:
                s[f"blocks.{i}.cross_attn.k_img.weight"] = (dim, dim)
        return s

    cases = ((shapes(5120, 40, 13824, 16, 16), WAN_T2V_14B), (shapes(5120, 40, 13824, 36, 16, True), WAN21_I2V_14B),
             (shapes(5120, 40, 13824, 36, 16), WAN22_I2V_A14B), (shapes(1536, 30, 8960, 16, 16), WAN21_T2V_1_3B),
             (shapes(3072, 30, 14336, 48, 48), WAN22_TI2V_5B))
    for s, variant in cases:
        found = registry.detect_host(list(s), s)
        assert found[0] is wan_family.FAMILY and found[1] is variant, variant
        assert found[2] == variant.config or variant is WAN21_I2V_14B and found[2].i2v


def check_superset(km, theirs: dict, sd: dict) -> int:
    checked = 0
    for alias, target in theirs.items():
        key = target if isinstance(target, str) else target[0]
        if key not in sd:
            continue
        ours = km.resolve(alias)
        assert ours is not None, f"core maps {alias!r} -> {key}; ours does not"
        assert key in ours.host_keys and ours.pieces is None, (alias, key, ours)
        checked += 1
    return checked


@pytest.mark.parametrize("variant", ["t2v", "i2v"])
def test_key_map_is_a_superset_of_cores(clip, variant):
    """Every name core 0.3.75 maps (generic `diffusion_model.<key>`, `lora_unet_`, every non-weight tensor by its
    full key - biases, norms, the modulation parameters - and `text_encoders.umt5xxl.transformer.`) resolves in ours
    to the same tensor; plus the names core lacks."""
    model = tw.comfy_wan(variant)
    km = host(model, clip).key_map
    assert km.conflicts == [] and km.arch is VARIANTS[variant]
    sd = {**model.model.state_dict(), **clip.cond_stage_model.state_dict()}
    theirs = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, comfy.lora.model_lora_keys_unet(model.model, {}))
    assert check_superset(km, theirs, sd) > 100
    assert km.resolve("diffusion_model.blocks.1.modulation").kind == "mod"
    assert km.resolve("transformer.blocks.1.scale_shift_table").host_key == "diffusion_model.blocks.1.modulation"
    assert km.resolve("transformer.scale_shift_table").host_key == "diffusion_model.head.modulation"
    assert km.resolve("transformer.blocks.0.attn2.to_out.0").host_key == "diffusion_model.blocks.0.cross_attn.o.weight"
    assert km.resolve("blocks.0.norm2").host_key == "diffusion_model.blocks.0.norm3.weight"   # diffusers' norm2
    assert km.resolve("lycoris_blocks_1_ffn_net_0_proj").block == "B01"
    assert km.resolve("lora_te_encoder_block_1_layer_1_DenseReluDense_wo").component == "te1"
    if variant == "i2v":
        assert km.resolve("transformer.blocks.0.attn2.add_k_proj").kind == "img_attn"
        assert km.resolve("transformer.condition_embedder.image_embedder.ff.net.0.proj").block == "IN"


def test_clip_and_metadata_name_the_family():
    assert registry.arch_of_clip({"umt5xxl"}).family is wan_family.FAMILY
    assert registry.arch_of_metadata(ww.MUSUBI_METADATA) is None
    assert registry.family_of_metadata(ww.MUSUBI_METADATA) is wan_family.FAMILY
    assert registry.family_of_metadata({"ss_base_model_version": "wan_2.2_14b"}) is wan_family.FAMILY
    assert registry.arch_of_metadata({"ss_base_model_version": "wan_2.2_5b"}) is WAN22_TI2V_5B


def real_shape_lora(dim: int, ffn: int, blocks=(0,), k_img: bool = False, meta=None) -> LoraFile:
    """A rank-1 musubi file with the full-size shapes of a Wan variant (no model needed)."""
    gen = torch.Generator().manual_seed(5)
    tensors = {}

    def pair(name, rows, cols):
        tensors[f"{name}.lora_down.weight"] = 0.01 * torch.randn(1, cols, generator=gen)
        tensors[f"{name}.lora_up.weight"] = 0.01 * torch.randn(rows, 1, generator=gen)

    for i in blocks:
        pair(f"lora_unet_blocks_{i}_self_attn_q", dim, dim)
        pair(f"lora_unet_blocks_{i}_ffn_0", ffn, dim)
        pair(f"lora_unet_blocks_{i}_ffn_2", dim, ffn)
        if k_img:
            pair(f"lora_unet_blocks_{i}_cross_attn_k_img", dim, dim)
    return LoraFile(None, tensors, dict(meta or {}))


def test_variant_of_a_file_from_its_shapes_when_metadata_names_only_the_family():
    """musubi writes `wan` / `wan2.1` for every Wan: the size comes from the shapes (d 5120 / 1536 / 3072), the I2V
    branch from k_img; blocks 30-39 exist only in the 14B."""
    meta = ww.MUSUBI_METADATA
    assert registry.detect_lora(real_shape_lora(5120, 13824, meta=meta)) is WAN_T2V_14B
    assert registry.detect_lora(real_shape_lora(1536, 8960, meta=meta)) is WAN21_T2V_1_3B
    assert registry.detect_lora(real_shape_lora(3072, 14336, meta=meta)) is WAN22_TI2V_5B
    assert registry.detect_lora(real_shape_lora(5120, 13824, k_img=True)) is WAN21_I2V_14B
    assert registry.detect_lora(real_shape_lora(5120, 13824, blocks=(0, 35))) is WAN_T2V_14B
    assert registry.base_model_name(real_shape_lora(1536, 8960, meta=meta)) == ("Wan 2.1 1.3B", "metadata")


# ------------------------------------------------------------------------------------- writers core reads

WRITERS_CORE_READS = {
    "comfy-native": lambda m, t: ww.comfy_native(m, seed=1),
    "comfy-native-lora_A/B": lambda m, t: ww.comfy_native(m, seed=2, peft_suffixes=True),
    "musubi": lambda m, t: ww.musubi(m, seed=3),
    "wan-fun": lambda m, t: ww.wan_fun(m, seed=4),
    "diffusion-pipe": lambda m, t: ww.diffusion_pipe(m, seed=5),
    "ai-toolkit": lambda m, t: ww.ai_toolkit(t, seed=6),
    "full-diffs": lambda m, t: ww.full_diffs(m, seed=7),
}


@pytest.mark.parametrize("writer", list(WRITERS_CORE_READS))
@pytest.mark.parametrize("variant", ["t2v", "i2v"])
def test_writer_equals_core(t2v, i2v, twin, twin_i2v, tmp_path, caplog, writer, variant):
    pair, transformer = (t2v, twin) if variant == "t2v" else (i2v, twin_i2v)
    state = WRITERS_CORE_READS[writer](pair[0], transformer)
    if writer == "musubi":
        assert not any(w in k for k in state for w in ("norm", "head", "embedding"))
        assert any("_cross_attn_k_img." in k for k in state) == (variant == "i2v")
    if writer == "full-diffs":
        assert "diffusion_model.blocks.0.modulation.diff" in state and "diffusion_model.head.modulation.diff" in state
    reports = compare(pair, tmp_path, caplog, state)
    assert "Wan" in reports[0]


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr", "full"])
def test_lycoris_inside_kohya_on_the_comfy_model(t2v, tmp_path, caplog, algo):
    model, _ = t2v
    state = lw.lycoris_state_dict(ww.original_blocks(model), algo, prefix="lora_unet", rank=4, alpha=2.0, seed=11,
                                  target_module=("Linear",))
    compare(t2v, tmp_path, caplog, state)


def test_text_encoder_generic_names(t2v, tmp_path, caplog):
    model, clip = t2v
    state = {**ww.musubi(model, seed=12), **ww.text_encoder(clip, seed=13)}
    reports = compare(t2v, tmp_path, caplog, state, with_clip=True)
    applied = next(line for line in reports[0].splitlines() if "applied modules:" in line)
    assert "te1 " in applied and "transformer" in applied


# ------------------------------------------------------------------------------------- writers core misreads

def test_lightx2v_modulation_diff_that_core_drops(t2v, tmp_path, caplog):
    """lightx2v's `blocks.N.diff_m` is the block's modulation diff; core 0.3.75 maps only
    `...modulation.diff` and drops it. Truth: core on the same tensors under that name."""
    model, clip = t2v
    state, truth = ww.lightx2v(model, seed=14)
    dropped = core_drops(model, None, state)
    assert dropped and all("diff_m" in line for line in dropped)
    compare(t2v, tmp_path, caplog, state, core_state=truth)   # same patched keys: the modulations included


MISREAD = {
    # (writer, what core reads instead)
    "diffusers-peft": lambda m, t: (ww.diffusers_peft(t, seed=15), None),
    "diffusers-base_model": lambda m, t: (dw.rename_prefix(ww.diffusers_peft(t, seed=16), "transformer.",
                                                           "base_model.model."), None),
    "bare-native": lambda m, t: (ww.comfy_native(m, seed=17, prefix=""), "diffusion_model."),
    "diffsynth": lambda m, t: (ww.diffsynth(m, seed=18), "diffsynth"),
    "lycoris-native": lambda m, t: (lw.lycoris_state_dict(ww.original_blocks(m), "lokr", prefix="lycoris", rank=4,
                                                          alpha=2.0, seed=19, target_module=("Linear",)),
                                    "lycoris"),
}


@pytest.mark.parametrize("writer", list(MISREAD))
def test_writers_core_cannot_read_equal_core_on_renamed_tensors(t2v, twin, tmp_path, caplog, writer):
    model, _ = t2v
    state, how = MISREAD[writer](model, twin)
    assert core_drops(model, None, state), "core reads this file: nothing to prove"
    if how is None:   # diffusers names: the original ones as ai-toolkit's convert_to_original writes them
        prefix = "transformer." if writer == "diffusers-peft" else "base_model.model."
        truth = ww.to_original(state, prefix)
    elif how == "diffsynth":   # strip PEFT's adapter name, add diffusion_model. (nv-tlabs/ChronoEdit#22)
        truth = {"diffusion_model." + k.replace(".default.", "."): v for k, v in state.items()}
    elif how == "lycoris":
        truth = dw.rename_prefix(state, "lycoris_", "lora_unet_")
    else:
        truth = {how + k: v for k, v in state.items()}
    compare(t2v, tmp_path, caplog, state, core_state=truth)


def test_simpletuner_lycoris_on_the_diffusers_transformer(t2v, twin, tmp_path, caplog):
    model, _ = t2v
    state = lw.lycoris_state_dict(twin, "lora", prefix="lycoris", rank=4, alpha=2.0, seed=20,
                                  target_module=("Linear",))
    state = {k: v for k, v in state.items() if "image_embedder" not in k}
    assert any(k.startswith("lycoris_blocks_0_attn1_to_q.") for k in state)
    assert core_drops(model, None, state)
    compare(t2v, tmp_path, caplog, state, core_state=ww.to_original(state, "lycoris_", underscored=True))


def test_kohya_style_text_encoder_names_core_drops(t2v, tmp_path, caplog):
    """`lora_te_` / `lora_te1_` UMT5 names (no trainer in the sources writes them, but core would drop them):
    read; the truth is core's generic `text_encoders.umt5xxl.transformer.` names."""
    model, clip = t2v
    unet = ww.musubi(model, seed=21)
    for prefix in ("lora_te_", "lora_te1_"):
        te = ww.text_encoder(clip, seed=22, prefix=prefix, underscored=True)
        assert core_drops(model, clip, te)
        truth = ww.text_encoder(clip, seed=22)
        compare(t2v, tmp_path, caplog, {**unet, **te}, core_state={**unet, **truth}, with_clip=True)


def test_text_encoder_without_clip_is_reported_not_applied(t2v, tmp_path):
    model, clip = t2v
    state = {**ww.musubi(model, seed=23), **ww.text_encoder(clip, seed=24)}
    lw.save_safetensors(state, tmp_path / "te.safetensors")
    with loras_folder(tmp_path):
        _, report = node_module("loader").LoRACoreLoaderModelOnly().load(model, "te.safetensors", 1.0)
    assert "not applied: te1" in report and "no CLIP connected" in report
    assert "WARNING" not in report and "unmatched" not in report


# ------------------------------------------------------------------------------------- fit and mismatch

def test_loras_for_other_families_and_sizes_are_refused_naming_both(t2v, twin, tmp_path):
    model, _ = t2v
    flux, sd15 = tm.comfy_flux(), tm.comfy_sd15()
    files = {
        "wan_musubi": (ww.musubi(model, seed=30), ww.MUSUBI_METADATA),
        "wan_bare": (ww.musubi(model, seed=30), None),
        "wan_peft": (ww.diffusers_peft(twin, seed=31), None),
        "flux": (dw.kohya_flux(flux, seed=32), None),
        "sd15": (lw.kohya_state_dict(lw.unet_targets(sd15.model.diffusion_model), "lora_unet", seed=33), None),
        "wan_wide": (ww.musubi(tw.comfy_wan("t2v", dim=96, heads=3), seed=34), None),
        "wan_deep": (ww.musubi(tw.comfy_wan("t2v", depth=3), seed=35), None),
        "wan_14b_full": (real_shape_lora(5120, 13824).tensors, ww.MUSUBI_METADATA),
    }
    for name, (state, meta) in files.items():
        lw.save_safetensors(state, tmp_path / f"{name}.safetensors", meta)
    loader = node_module("loader").LoRACoreLoaderModelOnly()

    def refused(target, name, *words):
        with pytest.raises(LoraMatchError) as caught:
            loader.load(target, f"{name}.safetensors", 1.0)
        text = str(caught.value)
        assert f"{name}.safetensors" in text and all(w in text for w in words), text
        return text

    with loras_folder(tmp_path):
        for name in ("wan_musubi", "wan_bare", "wan_peft"):
            refused(flux, name, "made for Wan", "Flux.1 [dev]")
            refused(sd15, name, "made for Wan", "Stable Diffusion 1.x")
        refused(model, "flux", "made for Flux.1", "Wan 2.1 T2V 14B")
        refused(model, "sd15", "made for Stable Diffusion 1.x", "Wan 2.1 T2V 14B")
        refused(model, "wan_wide", "does not fit")
        refused(model, "wan_14b_full", "does not fit", "5120")
        _, report = loader.load(model, "wan_deep.safetensors", 1.0)   # the blocks this model has apply
    assert "WARNING" in report and "key for block 2, but this Wan 2.1 T2V 14B / Wan 2.2 T2V-A14B model has 2 " \
                                   "blocks" in report


def test_wan21_i2v_lora_on_a_wan22_i2v_expert_applies_all_but_the_image_branch(i2v, tmp_path, caplog):
    """A Wan 2.1 I2V LoRA (k_img / v_img) on a Wan 2.2 I2V-A14B expert (no CLIP-image branch): the rest applies and
    equals core (which logs the image keys as not loaded, kijai/ComfyUI-WanVideoWrapper#940); each image-branch
    module is listed with the reason."""
    model21, _ = i2v
    model22 = tw.comfy_wan("i2v-a14b")
    state = ww.musubi(model21, seed=36)
    image = [k for k in state if "_img." in k]
    assert image and core_drops(model22, None, state)
    reports = compare((model22, i2v[1]), tmp_path, caplog, state, expect_unmatched=True,
                      core_state={k: v for k, v in state.items() if k not in image})
    assert "Wan 2.1 I2V's CLIP-image branch" in reports[0] and "Wan 2.2 I2V-A14B" in reports[0]


def test_reasons_for_names_this_model_lacks(t2v):
    model, _ = t2v
    km = host(model).key_map
    cases = {
        "lora_unet_blocks_7_self_attn_q": "has 2 blocks",
        "transformer.blocks.7.attn1.to_q": "has 2 blocks",
        "lora_unet_blocks_0_cross_attn_k_img": "CLIP-image branch",
        "transformer.blocks.0.attn2.add_k_proj": "CLIP-image branch",
        "diffusion_model.img_emb.proj.1": "CLIP-image branch",
        "lora_unet_double_blocks_0_img_attn_qkv": "Flux.1",
        "lora_unet_joint_blocks_0_x_block_attn_qkv": "SD3",
    }
    for name, words in cases.items():
        assert km.resolve(name) is None, name
        assert words in km.explain_unmatched(name), (name, km.explain_unmatched(name))
    flux_km = host(tm.comfy_flux()).key_map
    assert "Wan" in flux_km.explain_unmatched("lora_unet_blocks_0_cross_attn_k")
    assert "Wan" in flux_km.explain_unmatched("transformer.blocks.0.attn2.to_k")
    sd_km = host(tm.comfy_sd15()).key_map   # an SD UNet's own diffusers attn1 names stay SD's
    assert "Wan" not in sd_km.explain_unmatched("unet.down_blocks.3.attentions.0.transformer_blocks.0.attn1.to_q")


# ------------------------------------------------------------------------------------- blocks

def test_block_layouts_as_data():
    assert WAN_T2V_14B.blocks == ("TE1", "IN") + tuple(f"B{i:02d}" for i in range(40)) + ("OUT",)
    assert WAN21_T2V_1_3B.blocks[-2:] == ("B29", "OUT") and WAN22_TI2V_5B.blocks == WAN21_T2V_1_3B.blocks
    assert WAN_T2V_14B.block_groups["BASE"] == ("TE1",) and len(WAN_T2V_14B.block_groups["B"]) == 40
    layout = WAN21_I2V_14B.layout
    assert layout.element_groups["attn"] >= {"self_attn", "cross_attn", "img_attn"}
    assert layout.element_groups["modulation"] == {"mod", "time_proj", "head_mod"}
    assert not layout.a1111 and not layout.inspire_groups
    with pytest.raises(LoraValueError, match="no positional layout for wan_40: use named syntax"):
        blocks.resolve_vector("Wan-T2V-14B", "a1111", ",".join(["1"] * 17))


def _block_weight(model, clip, tmp_path, state, vector, mode="named", strengths=(1.0, 0.0)):
    lw.save_safetensors(state, tmp_path / "wan_lbw.safetensors")
    with loras_folder(tmp_path):
        return node_module("block_weight").LoRACoreBlockWeight().load(
            model, "wan_lbw.safetensors", strengths[0], strengths[1], mode, "custom", vector, 0, 1.0, 1.0, False,
            clip=clip)


def _expected_factor(key: str) -> float:
    """The factor NAMED gives a host key, by hand from the module names: IN = the embeddings and
    time_projection, B00 / B01 = blocks.0 / 1, OUT = head; `mod` = blocks.N.modulation, `cross_attn` = cross_attn.*."""
    rest = key[len("diffusion_model."):]
    if rest.startswith(("patch_embedding", "text_embedding", "time_embedding", "time_projection")):
        return 0.0
    if rest == "head.modulation":
        return 0.25
    if rest.startswith("head."):
        return 1.0
    block = int(rest.split(".")[1])
    if block == 0:
        return 2.0 if rest.endswith(".modulation") else 0.5
    return 0.0 if ".cross_attn." in rest and ".norm_" not in rest else 1.0   # q/k norms are kind `norm`


NAMED = "IN=0, B00=0.5, B00.mod=2, B01.cross_attn=0, OUT.head_mod=0.25"


def test_named_syntax_blocks_and_element_kinds(t2v, tmp_path):
    """Linears and parameters alike (full diffs on every tensor, the modulations included)."""
    model, _ = t2v
    state = ww.full_diffs(model, seed=37)
    state = {k: v for k, v in state.items() if not k.endswith(".diff_b")}
    weighted, _, table = _block_weight(model, None, tmp_path, state, NAMED)
    plain, _, _ = _block_weight(model, None, tmp_path, state, "")
    base = model.model.state_dict()
    got, whole = bake(weighted), bake(plain)
    assert "diffusion_model.blocks.1.modulation" in whole and "diffusion_model.head.modulation" in whole
    checked = set()
    for key, value in whole.items():
        factor = _expected_factor(key)
        if factor == 0:
            assert key not in got, f"{key} should be off"
            continue
        torch.testing.assert_close(got[key] - base[key], factor * (value - base[key]), rtol=1e-5, atol=1e-7)
        checked.add(factor)
    assert checked == {0.25, 0.5, 1.0, 2.0}
    assert "B01" in table and "OUT" in table


def test_a1111_refused_and_inspire_base_only(t2v, tmp_path):
    """hako-mikan's A1111 extension has no Wan layout (refused, pointing to named syntax); Inspire Pack gives
    `blocks.` no slots, so every module takes its BASE value (the first), text encoder included: equal to Inspire's
    rule run on core's loader (tests.test_flux_blocks.inspire_reference, which sends keys to where they live;
    Inspire itself sends `text_embedding` keys to the CLIP by the substring 'text' and loses them)."""
    from tests.test_flux_blocks import inspire_reference

    model, clip = t2v
    state = {**ww.comfy_native(model, seed=38), **ww.text_encoder(clip, seed=39)}
    with pytest.raises(LoraValueError, match="no positional layout for wan_40: use named syntax"):
        _block_weight(model, clip, tmp_path, state, ",".join(["1"] * 61), mode="a1111", strengths=(0.8, 0.6))
    vector = "0.3," + ",".join(["0", "2"] * 6)
    ours, ours_clip, table = _block_weight(model, clip, tmp_path, state, vector, mode="inspire", strengths=(0.8, 0.6))
    ref, ref_clip = inspire_reference(model, clip, state, 0.8, 0.6, vector)
    base = {k: v.clone() for k, v in model.model.state_dict().items()}
    base_clip = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    assert_same(bake(ours), bake(ref), base, "inspire/MODEL")
    assert_same(bake(ours_clip.patcher), bake(ref_clip.patcher), base_clip, "inspire/CLIP")
    assert "no block layout for wan_40" in table


def test_block_info_and_sweep(t2v, tmp_path):
    model, _ = t2v
    state = ww.comfy_native(model, seed=40)
    lw.save_safetensors(state, tmp_path / "wan_tool.safetensors", ww.MUSUBI_METADATA)
    tools = node_module("block_tools")
    with loras_folder(tmp_path):
        text, chart = tools.LoRACoreBlockInfo().inspect("wan_tool.safetensors", "auto", model=model)
        info = tools.block_info("wan_tool.safetensors", "auto", model=model)
        models, labels = tools.LoRACoreBlockSweep().sweep(model, "wan_tool.safetensors", 1.0, "blocks", 1.0, 0.0,
                                                          "named", "", 0, 1.0, 1.0)
        vector_models, vector_labels = tools.LoRACoreBlockSweep().sweep(
            model, "wan_tool.safetensors", 1.0, "vectors", 1.0, 0.0, "named", "B*=0\nB*.cross_attn=0", 0, 1.0, 1.0)
    assert "Wan" in text and chart.ndim == 4
    assert list(info["blocks"]) == ["IN", "B00", "B01", "OUT"] and all(e["norm"] > 0 for e in info["blocks"].values())
    assert [label.split()[0] for label in labels[1:]] == ["IN", "B00", "B01", "OUT"]
    full = set(models[0].patches)
    assert set(models[3].patches) == {k for k in full if ".blocks.1." not in k} != full
    assert vector_labels[1:] == ["B*=0", "B*.cross_attn=0"]
    assert not any(".blocks." in k for k in vector_models[1].patches)
    assert any(".self_attn.q." in k for k in vector_models[2].patches)
    assert not any(".cross_attn." in k for k in vector_models[2].patches)


# ------------------------------------------------------------------------------------- merge / export

def test_merged_block_weighted_stack_loads_to_the_stacks_weights(t2v, twin, tmp_path):
    """musubi (with UMT5 modules), diffusers PEFT and lightx2v (diff_b, norm diffs, diff_m) files, block-weighted,
    merged into one file (exact): musubi's `lora_unet_` names, the modulation diffs under ComfyUI's full key, UMT5
    under ComfyUI's generic names, musubi's metadata; core and our loader give the stack's weights."""
    model, clip = t2v
    a = {**ww.musubi(model, seed=41), **ww.text_encoder(clip, seed=42)}
    b = ww.diffusers_peft(twin, seed=43)
    c, _ = ww.lightx2v(model, seed=44)
    for name, state in (("a", a), ("b", b), ("c", c)):
        lw.save_safetensors(state, tmp_path / f"{name}.safetensors")
    bw, mix = node_module("block_weight"), node_module("mix")
    rows = block_stack_rows(enabled_1=True, lora_1="a.safetensors", strength_model_1=0.9, strength_clip_1=0.7,
                       vector_1="B00=0.5, B01.cross_attn=0", enabled_2=True, lora_2="b.safetensors",
                       strength_model_2=-0.7, vector_2="B*.ffn=0.25, OUT=0, IN=2", enabled_3=True,
                       lora_3="c.safetensors", strength_model_3=0.6, vector_3="B01.mod=0.5")
    with loras_folder(tmp_path):
        stack = bw.LoRACoreBlockStack().build(0, 1.0, 1.0, False, **rows)[0]
        stacked, stacked_clip, _ = bw.LoRACoreApplyBlockStack().apply(model, stack, clip=clip)
        path, _ = mix.LoRACoreMergeSave().merge("exact", 0, 0.0, "wan_merge", False, "auto", "fp32",
                                                block_stack=stack, model=model, clip=clip)["result"]
        merged = comfy.utils.load_torch_file(path, safe_load=True)
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            meta = handle.metadata()
        ours, ours_clip, _ = node_module("loader").LoRACoreLoader().load(model, "wan_merge.safetensors", 1.0, 1.0,
                                                                         clip=clip)
    assert meta["ss_base_model_version"] == "wan" and meta["modelspec.architecture"] == "wan2.1/lora"
    assert meta["ss_network_module"] == "networks.lora_wan"
    assert "diffusion_model.blocks.1.modulation.diff" in merged
    assert all(k.startswith(("lora_unet_", "text_encoders.umt5xxl.transformer.", "diffusion_model.blocks."))
               for k in merged)
    assert_merged_file_equals_stack(model, clip, merged, ours, ours_clip, stacked, stacked_clip)


# ------------------------------------------------------------------------------------- standalone (diffusers)

def _diffusers_reference(path, transformer, scale):
    from diffusers.loaders import WanLoraLoaderMixin

    return diffusers_fuse_reference(WanLoraLoaderMixin, path, transformer, scale)


STANDALONE_WRITERS = {
    "diffusers-peft": lambda m, t: ww.diffusers_peft(t, seed=50),
    "musubi": lambda m, t: ww.musubi(m, seed=51),
    "ai-toolkit": lambda m, t: ww.ai_toolkit(t, seed=52),
    "diffusion-pipe": lambda m, t: ww.diffusion_pipe(m, seed=53),
    "lightx2v": lambda m, t: ww.lightx2v(m, seed=54, norms=False, modulation=False)[0],
}


@pytest.mark.parametrize("writer", list(STANDALONE_WRITERS))
@pytest.mark.parametrize("variant", ["t2v", "i2v"])
def test_lora_patcher_on_wan_transformer_equals_diffusers_fuse_lora(t2v, i2v, twin, twin_i2v, tmp_path, writer,
                                                                     variant):
    """`LoraPatcher(transformer=...)` on diffusers' WanTransformer3DModel equals `WanLoraLoaderMixin.
    load_lora_weights` + `fuse_lora` (which converts `diffusion_model.` and musubi's `lora_unet_` names and alpha
    itself, diff_b as lora_B.bias) at 1.0 and -0.6; `restore()` is exact. (diffusers drops norm and modulation
    diffs: `_convert_non_diffusers_wan_lora_to_diffusers`, so the lightx2v file here has none.)"""
    model, transformer = (t2v[0], twin) if variant == "t2v" else (i2v[0], twin_i2v)
    path = lw.save_safetensors(STANDALONE_WRITERS[writer](model, transformer), tmp_path / f"{writer}.safetensors")
    ours = copy.deepcopy(transformer)
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    patcher = LoraPatcher(transformer=ours)
    assert patcher.key_map.arch is VARIANTS[variant]
    for scale in (1.0, -0.6):
        reference = _diffusers_reference(path, transformer, scale)
        plan = patcher.apply([LoraRequest(read_lora_file(path), scale, 0.0)])
        report = plan.reports[0]
        assert not report.unmatched and not report.unused_keys, plan.text()
        state = ours.state_dict()
        assert state.keys() == reference.keys()
        changed = 0
        for key in reference:
            delta = (reference[key] - base[key]).abs().max().item()
            error = (state[key] - reference[key]).abs().max().item()
            assert error <= 1e-5 * delta + 2 * EPS * reference[key].abs().max().item(), (key, error, delta)
            changed += delta > 0
        assert changed >= 10 and changed == len(plan.patches)
    patcher.restore()
    assert all(torch.equal(v, base[k]) for k, v in ours.state_dict().items())


def test_merge_without_a_model_keeps_the_conv3d_lora_and_the_family_strings(t2v, tmp_path):
    """A musubi file (musubi's `wan` metadata) plus a conv LoRA on the Conv3d patch embedding (down (r, in, 1, 2, 2),
    up (out, r, 1, 1, 1)), merged with no model: the full-size layout the shapes choose among Wan's variants, the 5-D
    factors kept, musubi's strings; the merged file at 1.0 equals the source at 0.5 in core and ours."""
    model, _ = t2v
    gen = torch.Generator().manual_seed(60)
    state = ww.musubi(model, seed=61)
    state["lora_unet_patch_embedding.lora_down.weight"] = 0.1 * torch.randn(4, 16, 1, 2, 2, generator=gen)
    state["lora_unet_patch_embedding.lora_up.weight"] = 0.1 * torch.randn(64, 4, 1, 1, 1, generator=gen)
    state["lora_unet_patch_embedding.alpha"] = torch.tensor(2.0)
    lw.save_safetensors(state, tmp_path / "m.safetensors", ww.MUSUBI_METADATA)
    from safetensors import safe_open

    loader = node_module("loader").LoRACoreLoaderModelOnly()
    with loras_folder(tmp_path):
        path, text = node_module("mix").LoRACoreMergeSave().merge("exact", 0, 0.0, "out", False, "auto", "fp32",
                                                                  lora_stack=[("m.safetensors", 0.5, 0.0)])["result"]
        source, _ = loader.load(model, "m.safetensors", 0.5)
        ours, _ = loader.load(model, "out.safetensors", 1.0)
    with safe_open(path, framework="pt") as handle:
        meta = handle.metadata()
        assert handle.get_tensor("lora_unet_patch_embedding.lora_down.weight").shape == (4, 16, 1, 2, 2)
    assert meta["ss_base_model_version"] == "wan" and meta["modelspec.architecture"] == "wan2.1/lora"
    assert "Wan-T2V-14B" in text
    core, _ = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(path), 1.0, 0.0)
    base = {k: v.clone() for k, v in model.model.state_dict().items()}
    want = bake(source)
    assert "diffusion_model.patch_embedding.weight" in want
    assert_same(bake(ours), want, base, "merged file in our loader")
    assert_same(bake(core), want, base, "merged file in core's loader")
