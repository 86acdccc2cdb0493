"""HunyuanVideo (1.0 T2V, I2V, SkyReels I2V) end to end in the real host (ComfyUI 0.3.75 on CPU, tiny models built
with its own classes, tests/tiny_hunyuan_video.py):

* recognition of every variant that claims no other family's state dicts (Flux's above all: same block names), a
  key map that is a superset of core's (model and CLIP);
* every writer's file equal to core's loader where core reads it (1e-5 of the delta at 1.0 and -0.6, same patched
  keys, one patch per fused weight) and to core on the same tensors under names it reads where it cannot (asserted:
  core really drops them);
* CLIP-L and LLaVA-Llama-3-8B modules applied where the CLIP holds them, reported as not applied otherwise;
* Flux.1 LoRAs on HunyuanVideo and HunyuanVideo LoRAs on Flux.1 refused naming both (also when every module fits),
  other families and sizes too;
* block layout, named syntax inside fused weights and the token refiner, Inspire's double / single slots, A1111
  refused, Block Info / sweep; merged block-weighted stacks loading to the stack's weights with musubi's metadata;
* `LoraPatcher(transformer=...)` on diffusers' HunyuanVideoTransformer3DModel against diffusers' own
  `load_lora_weights` + `fuse_lora`.
"""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers.loaders import HunyuanVideoLoraLoaderMixin

from tests.comfy_host import import_comfy
from tests.pack import block_stack_rows, core_drops, diffusers_fuse_reference, host, loras_folder, node_module
from tests import dit_writers as dw
from tests import hunyuan_video_writers as hw
from tests import lora_writers as lw
from tests import tiny_hunyuan_video as th
from tests import tiny_models as tm
from tests.test_flux import EPS, assert_merged_file_equals_stack, assert_same, bake, compare
from tests.test_flux_blocks import inspire_reference

comfy = import_comfy()
import comfy.lora  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

from lora_core import blocks  # noqa: E402
from lora_core.api import LoraPatcher, LoraRequest  # noqa: E402
from lora_core.arch import bind_comfy_model, bind_diffusers, registry  # noqa: E402
from lora_core.arch.families import flux as flux_family, hunyuan_video as hv_family  # noqa: E402
from lora_core.arch.families.hunyuan_video import (HUNYUAN_VIDEO, HUNYUAN_VIDEO_15, HUNYUAN_VIDEO_I2V,  # noqa: E402
                                                   SKYREELS_I2V)
from lora_core.errors import LoraMatchError, LoraValueError  # noqa: E402
from lora_core.io import read_lora_file  # noqa: E402
from lora_core.types import LoraFile  # noqa: E402


@pytest.fixture(scope="module")
def hv():
    return th.comfy_hunyuan_video(), th.comfy_clip_hunyuan_video()


@pytest.fixture(scope="module")
def twin():
    return th.diffusers_hunyuan_video_twin()


@pytest.fixture(scope="module")
def flux():
    return tm.comfy_flux(), tm.comfy_clip_flux()


def shapes_of(model) -> dict:
    return {k[len("diffusion_model."):]: tuple(v.shape) for k, v in model.model.state_dict().items()
            if k.startswith("diffusion_model.")}


# ------------------------------------------------------------------------------------- recognition, key map

@pytest.mark.parametrize("variant,want", [("t2v", HUNYUAN_VIDEO), ("i2v", HUNYUAN_VIDEO_I2V),
                                          ("skyreels", SKYREELS_I2V)])
def test_variants_from_comfy_state_dicts(variant, want):
    model = th.comfy_hunyuan_video(variant)
    sd = model.model.state_dict()
    config = model.model.model_config.unet_config
    with_config = bind_comfy_model(sd, config, config_name=type(model.model.model_config).__name__)
    from_shapes = bind_comfy_model({k: tuple(v.shape) for k, v in sd.items()})
    assert with_config.arch is from_shapes.arch is want
    spec = with_config.config
    assert (spec.hidden, spec.depth, spec.depth_single, spec.mlp_hidden, spec.in_channels) == \
        (th.HIDDEN, th.DEPTH, th.DEPTH_SINGLE, 4 * th.HIDDEN, th.IN_CHANNELS[variant])
    assert with_config.unbound == [] and spec.refiner_blocks == 2
    # neither the Flux nor the SD family claims it; it claims no Flux (BFL names) model
    keys = shapes_of(model)
    assert flux_family.FAMILY.detect_host(list(keys), keys, None) is None
    flux_keys = shapes_of(tm.comfy_flux())
    assert hv_family.FAMILY.detect_host(list(flux_keys), flux_keys, None) is None
    assert registry.detect_host(list(flux_keys), flux_keys)[0] is flux_family.FAMILY


def test_diffusers_twin_and_hunyuan_image_are_told_apart(twin):
    dif = bind_diffusers(twin.state_dict())
    assert dif.arch is HUNYUAN_VIDEO and dif.unbound == []
    assert dif.config.hidden == th.HIDDEN and dif.config.depth_single == th.DEPTH_SINGLE
    assert bind_diffusers(dw.diffusers_flux_twin().state_dict()).family is flux_family.FAMILY
    # a 2-D patch embedder (HunyuanImage 2.1 on the same ComfyUI class) is not HunyuanVideo
    keys = shapes_of(th.comfy_hunyuan_video())
    keys["img_in.proj.weight"] = (64, 16, 2, 2)
    assert hv_family.FAMILY.detect_host(list(keys), keys, None) is None
    # HunyuanVideo 1.5 (vision_in, no single blocks) is its own variant
    keys15 = {k: v for k, v in shapes_of(th.comfy_hunyuan_video()).items() if not k.startswith("single_blocks.")}
    keys15["vision_in.proj.1.weight"] = (1152, 1152)
    assert registry.detect_host(list(keys15), keys15)[1] is HUNYUAN_VIDEO_15


def test_key_map_is_a_superset_of_cores(hv):
    """Every name core 0.3.75 maps on this model and CLIP (generic `diffusion_model.` / `lora_unet_`, its
    HunyuanVideo branch's Tencent names under `transformer.` / `diffusion_model.`, `lora_te1_` / `text_encoders.`)
    resolves in ours to the same host tensor; no alias is claimed twice."""
    model, clip = hv
    core = comfy.lora.model_lora_keys_unet(model.model, {})
    core = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, core)
    ours = host(model, clip).key_map
    assert ours.conflicts == [] and ours.arch is HUNYUAN_VIDEO
    for name, target in core.items():
        host_key = target if isinstance(target, str) else target[0]
        resolved = ours.resolve(name)
        assert resolved is not None, f"core maps {name!r} -> {host_key}; ours does not"
        assert host_key in resolved.host_keys, (name, host_key, resolved.host_keys)
    assert len(core) > 300 and len(ours) > 3 * len(core)
    # what core lacks: musubi's MLP / modulation names, Tencent's input names, diffusers' names, lycoris_
    cases = {"lora_unet_double_blocks_1_txt_mlp_fc2": ("double_blocks.1.txt_mlp.2", "DB01", "txt_mlp"),
             "lora_unet_single_blocks_2_modulation_linear": ("single_blocks.2.modulation.lin", "SB02", "mod"),
             "transformer.time_in.mlp.0": ("time_in.in_layer", "IN", "time_in"),
             "transformer.txt_in.c_embedder.linear_2": ("txt_in.c_embedder.out_layer", "IN", "txt_in"),
             "lycoris_txt_in_individual_token_refiner_blocks_1_self_attn_qkv":
                 ("txt_in.individual_token_refiner.blocks.1.self_attn.qkv", "IN", "refiner_attn"),
             "transformer.single_transformer_blocks.0.proj_mlp": ("single_blocks.0.linear1", "SB00", "linear1_mlp"),
             "transformer.norm_out.linear": ("final_layer.adaLN_modulation.1", "OUT", "final_mod"),
             "text_encoders.llama.transformer.model.layers.3.mlp.up_proj": ("model.layers.3.mlp.up_proj", "TE2",
                                                                            "te_mlp")}
    for name, (path, block, kind) in cases.items():
        target = ours.resolve(name)
        assert target is not None and (name not in core) == (not name.startswith("text_encoders.")), name
        assert (target.path, target.block) == (path, block) and kind in target.kinds, (name, target)
    mlp = ours.resolve("transformer.single_transformer_blocks.0.proj_mlp").pieces
    assert [(p.dst, p.length) for p in mlp] == [(3 * th.HIDDEN, 4 * th.HIDDEN)]   # linear1's MLP rows


# ------------------------------------------------------------------------------------- writers core reads

WRITERS_CORE_READS = {
    "comfy-native": lambda m: hw.comfy_native(m, seed=1),
    "comfy-native-lora_A/B": lambda m: hw.comfy_native(m, seed=2, peft_suffixes=True),
    "diffusion-pipe": lambda m: hw.diffusion_pipe(m, seed=3),
    "diffusion-pipe-old / musubi --target other": lambda m: hw.diffusion_pipe(m, seed=4, prefix="diffusion_model."),
    "full-diffs": lambda m: hw.full_diffs(m, seed=5),
}


@pytest.mark.parametrize("writer", list(WRITERS_CORE_READS))
def test_writer_equals_core(hv, tmp_path, caplog, writer):
    model, _ = hv
    state = WRITERS_CORE_READS[writer](model)
    if writer.startswith("diffusion-pipe"):
        assert any(".img_attn_qkv.lora_A." in k for k in state) and any(".img_mlp.fc1." in k for k in state)
        assert any(".modulation.linear." in k for k in state)
    reports = compare(hv, tmp_path, caplog, state)
    assert "HunyuanVideo" in reports[0]


def test_musubi_attention_and_single_blocks_equal_core_and_mlp_where_core_drops_it(hv, tmp_path, caplog):
    """musubi-tuner's own names: core reads the attention and linear1 / linear2 (`lora_unet_` of names both share)
    but drops the MLP (`img_mlp_fc1`) and, with modulation trained, `img_mod_linear` / `modulation_linear`. The
    truth: core on the same tensors under ComfyUI's names."""
    model, _ = hv
    for exclude_mod, seed in ((True, 6), (False, 7)):
        state = hw.musubi(model, seed=seed, exclude_mod=exclude_mod)
        assert any("_img_mlp_fc1." in k for k in state) and (not any("_mod_" in k for k in state)) == exclude_mod
        dropped = core_drops(model, None, state)
        assert dropped and all("mlp_fc" in d or "mod" in d for d in dropped)
        compare(hv, tmp_path, caplog, state, core_state=hw.to_comfy_names(state))


def test_tencent_input_names_where_core_drops_some(hv, tmp_path, caplog):
    """Tencent's embedder names (`time_in.mlp.0`, `txt_in.t_embedder.mlp.0`, `txt_in.c_embedder.linear_1`) that
    core's rename does not reach, next to the refiner / final layer names it does."""
    model, _ = hv
    state = hw.tencent_inputs(model, seed=8)
    assert any("c_embedder.linear_1" in k for k in state) and core_drops(model, None, state)
    compare(hv, tmp_path, caplog, state, core_state=hw.to_comfy_names(state))


def test_musubi_split_qkv_names_where_core_drops_them(hv, tmp_path, caplog):
    """musubi's HunyuanVideo 1.5 network names q, k and v apart (`..._img_attn_q`): each lands on its rows of the
    fused qkv, one patch per weight; the truth is core on the same change as one fused LoRA (musubi's converter)."""
    model, _ = hv
    split, fused = hw.musubi_split_qkv(model, seed=14)
    assert len(core_drops(model, None, split)) == len(split)
    compare(hv, tmp_path, caplog, split, core_state=fused)


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr", "full"])
def test_lycoris_names_where_core_drops_them(hv, tmp_path, caplog, algo):
    """LyCORIS's own wrapper (`lycoris_` + ComfyUI's path): core's HunyuanVideo branch has no such alias; the truth
    is core on the same tensors under `lora_unet_`."""
    model, _ = hv
    state = hw.lycoris(model, algo, seed=9)
    assert core_drops(model, None, state)
    compare(hv, tmp_path, caplog, state, core_state={"lora_unet_" + k[len("lycoris_"):]: v for k, v in state.items()})


def test_diffusers_peft_names_where_core_drops_them(hv, twin, tmp_path, caplog):
    """PEFT on diffusers' HunyuanVideoTransformer3DModel: core maps none of it. Ours puts to_q / to_k / to_v (and
    proj_mlp) on the rows of the fused weights, the refiner's attention on its qkv, norm_out.linear's halves
    swapped; the truth is core on the same tensors under ComfyUI's names, the parts of a fused weight as one
    block-diagonal LoRA."""
    model, _ = hv
    state = hw.peft_state(twin, seed=10)
    assert len(core_drops(model, None, state)) == len(state)
    compare(hv, tmp_path, caplog, state, core_state=hw.diffusers_to_comfy(state))
    with loras_folder(tmp_path):
        ours, _ = node_module("loader").LoRACoreLoaderModelOnly().load(model, "lora.safetensors", 1.0)
    assert len(ours.patches) < len([k for k in state if "lora_A" in k]), "parts of a fused weight are one patch"


def test_bare_names_where_core_drops_them(hv, tmp_path, caplog):
    """Bare ComfyUI / Tencent names (no prefix): core maps none; truth under `diffusion_model.`."""
    model, _ = hv
    state = hw.comfy_native(model, seed=11, prefix="")
    assert core_drops(model, None, state)
    compare(hv, tmp_path, caplog, state, core_state={"diffusion_model." + k: v for k, v in state.items()})


def test_hunyuan_video_15_on_comfys_class(hv, tmp_path, caplog):
    """HunyuanVideo 1.5 (`supported_models.HunyuanVideo15`: double blocks only, `byt5_in`, `vision_in`,
    `cond_type_embedding`): recognised as its variant from the config and from shapes, a key map that is a superset
    of core's with nothing unbound, ComfyUI-native files (its new input modules included), full diffs and musubi's
    1.5 split q / k / v equal to core."""
    _, clip = hv
    model = th.comfy_hunyuan_video_15()
    sd = model.model.state_dict()
    with_config = bind_comfy_model(sd, model.model.model_config.unet_config, config_name="HunyuanVideo15")
    from_shapes = bind_comfy_model({k: tuple(v.shape) for k, v in sd.items()})
    assert with_config.arch is from_shapes.arch is HUNYUAN_VIDEO_15 and with_config.unbound == []
    spec = with_config.config
    assert (spec.depth, spec.depth_single, spec.byt5, spec.vision_in, spec.cond_type) == (th.DEPTH, 0, True, 48, True)
    core = comfy.lora.model_lora_keys_unet(model.model, {})
    km = host(model).key_map
    assert km.conflicts == [] and km.resolve("lora_unet_byt5_in_fc2").block == "IN"
    for name, target in core.items():
        key = target if isinstance(target, str) else target[0]
        assert km.resolve(name) is not None and key in km.resolve(name).host_keys, name
    native = hw.comfy_native(model, seed=15)
    assert any(".byt5_in.fc1." in k for k in native) and any(".vision_in.proj.3." in k for k in native)
    pair = (model, clip)
    reports = compare(pair, tmp_path, caplog, native)
    assert "HunyuanVideo 1.5" in reports[0]
    compare(pair, tmp_path, caplog, hw.full_diffs(model, seed=16))
    split, fused = hw.musubi_split_qkv(model, seed=17)
    compare(pair, tmp_path, caplog, split, core_state=fused)


# ------------------------------------------------------------------------------------- text encoders

def test_text_encoders_apply_where_the_clip_holds_them(hv, flux, tmp_path, caplog):
    """CLIP-L (`lora_te1_`) and LLaVA-Llama-3-8B (`text_encoders.llama.`) next to a musubi transformer part: equal
    to core with the HunyuanVideo CLIP; not applied (no CLIP connected) on a model-only load; on a CLIP without the
    Llama (Flux's) the Llama part is reported as not applied with the reason while CLIP-L and the transformer
    apply."""
    model, clip = hv
    te = hw.text_encoders(clip, seed=12)
    llama = len({k.rsplit(".", 2)[0] for k in te if k.startswith("text_encoders.llama.") and "lora_up" in k})
    clip_l = len({k.rsplit(".", 2)[0] for k in te if k.startswith("lora_te1_") and "lora_up" in k})
    state = {**hw.diffusion_pipe(model, seed=13), **te}
    reports = compare(hv, tmp_path, caplog, state, with_clip=True)
    assert f"te1 {clip_l}" in reports[0] and f"te2 {llama}" in reports[0]
    loader = node_module("loader")
    with loras_folder(tmp_path):
        _, report = loader.LoRACoreLoaderModelOnly().load(model, "lora.safetensors", 1.0)
        assert f"not applied: te1 {clip_l}" in report and f"not applied: te2 {llama}" in report
        assert "no CLIP connected" in report and "unmatched" not in report
        patched, clip_out, report = loader.LoRACoreLoader().load(model, "lora.safetensors", 1.0, 1.0, clip=flux[1])
    assert f"not applied: te2 {llama} (the CLIP has no LLaVA-Llama-3-8B)" in report and "unmatched" not in report
    assert f"te1 {clip_l}" in report and patched.patches and clip_out.patcher.patches


# ------------------------------------------------------------------------------------- fit and mismatch

def _refused(model, name) -> str:
    with pytest.raises(LoraMatchError) as caught:
        node_module("loader").LoRACoreLoaderModelOnly().load(model, name, 1.0)
    text = str(caught.value)
    assert name in text
    return text


def test_flux_and_hunyuan_video_loras_are_refused_on_each_other(hv, flux, twin, tmp_path):
    """The tiny Flux has this model's widths and block counts: Flux LoRAs fit every HunyuanVideo block by name and
    shape. A file decisively Flux's (kohya's metadata; Flux's `img_in` / `txt_in` names) is still refused here, and
    HunyuanVideo files (musubi / diffusion-pipe names, metadata, token refiner) on Flux; each error names both."""
    model, _ = hv
    flux_model, _ = flux
    files = {
        "flux_kohya": (dw.kohya_flux(flux_model, seed=20), hw.KOHYA_FLUX_METADATA),
        "flux_native": (dw.comfy_native(flux_model, seed=21), None),
        "flux_peft": (dw.peft_flux(dw.diffusers_flux_twin(), seed=22)[0], None),
        "hv_musubi": (hw.musubi(model, seed=23), hw.MUSUBI_METADATA),
        "hv_musubi_bare": (hw.musubi(model, seed=23), None),
        "hv_pipe": (hw.diffusion_pipe(model, seed=24), None),
        "hv_native": (hw.comfy_native(model, seed=25), None),
        "hv_blocks_meta": (dw.kohya_flux(model, seed=26), hw.MUSUBI_METADATA),   # BFL names, HunyuanVideo metadata
    }
    for name, (state, meta) in files.items():
        lw.save_safetensors(state, tmp_path / f"{name}.safetensors", meta)
    with loras_folder(tmp_path):
        for name in ("flux_kohya", "flux_native", "flux_peft"):
            text = _refused(model, f"{name}.safetensors")
            assert "made for Flux.1 [dev]" in text and "the model is HunyuanVideo" in text, text
        assert "its metadata names it" in _refused(model, "flux_kohya.safetensors")
        for name in ("hv_musubi", "hv_musubi_bare", "hv_pipe", "hv_native", "hv_blocks_meta"):
            text = _refused(flux_model, f"{name}.safetensors")
            assert "made for HunyuanVideo" in text and "Flux.1 [dev]" in text, text
        # the same BFL-named block file without metadata reads alike for both: it loads on both
        lw.save_safetensors(dw.kohya_flux(model, seed=26), tmp_path / "blocks.safetensors")
        for host_model in (model, flux_model):
            _, report = node_module("loader").LoRACoreLoaderModelOnly().load(host_model, "blocks.safetensors", 1.0)
            assert "WARNING" not in report


def real_shape_lora(doubles, singles, meta=None, hidden: int = 3072) -> LoraFile:
    """A rank-1 file with the full-size block shapes Flux.1 and HunyuanVideo 1.0 share (no model needed)."""
    gen = torch.Generator().manual_seed(5)
    tensors = {}
    for name, rows in [(f"lora_unet_double_blocks_{i}_img_attn_qkv", 3 * hidden) for i in doubles] + \
            [(f"lora_unet_single_blocks_{i}_linear1", 7 * hidden) for i in singles]:
        tensors[f"{name}.lora_down.weight"] = 0.01 * torch.randn(1, hidden, generator=gen)
        tensors[f"{name}.lora_up.weight"] = 0.01 * torch.randn(rows, 1, generator=gen)
    return LoraFile(None, tensors, dict(meta or {}))


def test_full_size_files_are_told_apart_by_depth_and_metadata():
    flux_depth = real_shape_lora(range(19), range(38))
    hv_depth = real_shape_lora(range(20), range(40))
    partial = real_shape_lora(range(4), range(4))
    assert registry.detect_lora(hv_depth) is HUNYUAN_VIDEO
    assert registry.detect_lora(flux_depth).family is flux_family.FAMILY
    assert registry.confusable_family(flux_depth, HUNYUAN_VIDEO).family is flux_family.FAMILY
    assert registry.confusable_family(hv_depth, flux_family.FLUX_DEV) is HUNYUAN_VIDEO
    assert registry.confusable_family(partial, HUNYUAN_VIDEO) is None
    assert registry.confusable_family(partial, flux_family.FLUX_DEV) is None
    assert registry.confusable_family(real_shape_lora(range(4), (), hw.MUSUBI_METADATA),
                                      flux_family.FLUX_DEV) is HUNYUAN_VIDEO
    for meta, want in (({"ss_base_model_version": "hunyuan_video"}, HUNYUAN_VIDEO),
                       ({"modelspec.architecture": "hunyuan-video/lora"}, HUNYUAN_VIDEO),
                       ({"ss_base_model_version": "hunyuan_video_1_5"}, HUNYUAN_VIDEO_15),
                       ({"modelspec.architecture": "hunyuan-video-1.5/lora"}, HUNYUAN_VIDEO_15)):
        assert registry.arch_of_metadata(meta) is want, meta
    assert registry.base_model_name(real_shape_lora((0,), (), hw.MUSUBI_METADATA)) == ("HunyuanVideo", "metadata")


def test_other_families_and_sizes_are_refused(hv, tmp_path):
    from tests import tiny_qwen_image as tq
    from tests import qwen_image_writers as qw

    model, _ = hv
    sd15 = tm.comfy_sd15()
    files = {
        "sd15": lw.kohya_state_dict(lw.unet_targets(sd15.model.diffusion_model), "lora_unet", seed=30),
        "qwen": qw.musubi(tq.comfy_qwen_image(), seed=31),
        "hv": hw.musubi(model, seed=32),
        "hv_wide": hw.comfy_native(th.comfy_hunyuan_video(hidden=96, heads=3), seed=33),
        "hv_deep": hw.musubi(th.comfy_hunyuan_video(depth=3, depth_single=4), seed=34),
    }
    for name, state in files.items():
        lw.save_safetensors(state, tmp_path / f"{name}.safetensors")
    loader = node_module("loader").LoRACoreLoaderModelOnly()
    with loras_folder(tmp_path):
        text = _refused(model, "sd15.safetensors")
        assert "Stable Diffusion 1.x" in text and "HunyuanVideo" in text
        text = _refused(sd15, "hv.safetensors")
        assert "made for HunyuanVideo" in text and "Stable Diffusion 1.x" in text
        text = _refused(model, "qwen.safetensors")
        assert "Qwen-Image" in text and "HunyuanVideo" in text
        assert "does not fit" in _refused(model, "hv_wide.safetensors")
        _, report = loader.load(model, "hv_deep.safetensors", 1.0)   # a deeper HunyuanVideo: the rest applies
    assert "WARNING" in report and "key for double block 2, but this HunyuanVideo model has 2 double blocks" in report
    assert "key for single block 3, but this HunyuanVideo model has 3 single blocks" in report
    assert "Flux" not in report   # Flux's BFL names are this family's too: never 'made for Flux' here


# ------------------------------------------------------------------------------------- blocks

def test_block_layout_as_data():
    assert HUNYUAN_VIDEO.blocks == ("TE1", "TE2", "IN") + tuple(f"DB{i:02d}" for i in range(20)) + \
        tuple(f"SB{i:02d}" for i in range(40)) + ("OUT",)
    assert HUNYUAN_VIDEO.block_groups["BASE"] == ("TE1", "TE2")
    layout = HUNYUAN_VIDEO.layout
    assert "token refiner" in layout.descriptions["IN"] and "LLaVA-Llama-3-8B" in layout.descriptions["TE2"]
    assert layout.element_groups["refiner"] == {"refiner_attn", "refiner_mlp", "refiner_mod"}
    assert not layout.a1111 and list(layout.inspire_layouts) == [61]
    assert HUNYUAN_VIDEO_15.blocks[-2:] == ("DB53", "OUT") and not any(b.startswith("SB") for b in HUNYUAN_VIDEO_15.blocks)
    with pytest.raises(LoraValueError, match="no positional layout for hunyuan_video"):
        blocks.resolve_vector("hunyuan_video", "a1111", ",".join(["1"] * 61))


def _block_weight(model, clip, tmp_path, state, vector, mode="named", strengths=(1.0, 0.0)):
    lw.save_safetensors(state, tmp_path / "hv_lbw.safetensors")
    with loras_folder(tmp_path):
        return node_module("block_weight").LoRACoreBlockWeight().load(
            model, "hv_lbw.safetensors", strengths[0], strengths[1], mode, "custom", vector, 0, 1.0, 1.0, False,
            clip=clip)


NAMED = "IN=0.5, IN.refiner=0, DB00.txt=0, DB01=2, SB01.linear1_mlp=0.25, SB02=0, OUT.final_mod=0"


def test_named_syntax_blocks_element_kinds_and_fused_rows(hv, twin, tmp_path):
    """Named syntax on a ComfyUI-native file (every Linear): blocks, the refiner inside IN, a stream of a double
    block, the MLP rows of a single block's fused linear1, the final modulation; on a diffusers file the same
    element kinds land on the rows its parts put into the fused weights."""
    model, _ = hv
    h = th.HIDDEN
    base = model.model.state_dict()
    for state in (hw.comfy_native(model, seed=40), hw.peft_state(twin, seed=41)):
        got, _, table = _block_weight(model, None, tmp_path, state, NAMED)
        whole, _, _ = _block_weight(model, None, tmp_path, state, "")
        got, whole = bake(got), bake(whole)
        d = {k: got[k] - base[k] for k in got}
        full = {k: whole[k] - base[k] for k in whole}
        p = "diffusion_model."
        for key in full:
            rest = key[len(p):]
            if ".individual_token_refiner." in rest or rest.startswith(("double_blocks.0.txt_", "single_blocks.2.",
                                                                        "final_layer.adaLN")):
                assert key not in d, key
            elif rest.startswith(("img_in.", "time_in.", "vector_in.", "guidance_in.", "txt_in.")):
                torch.testing.assert_close(d[key], 0.5 * full[key], rtol=1e-5, atol=1e-7)
            elif rest.startswith("double_blocks.1."):
                torch.testing.assert_close(d[key], 2 * full[key], rtol=1e-5, atol=1e-7)
            elif rest == "single_blocks.1.linear1.weight":
                torch.testing.assert_close(d[key][:3 * h], full[key][:3 * h])
                torch.testing.assert_close(d[key][3 * h:], 0.25 * full[key][3 * h:], rtol=1e-5, atol=1e-7)
            else:
                torch.testing.assert_close(d[key], full[key])
        assert "DB01" in table and "SB02" in table


def test_inspire_and_a1111_modes(hv, tmp_path):
    """Inspire Pack gives double_blocks and single_blocks ordinal slots (BASE, then the blocks the file has, in
    order): equal to Inspire's rule re-stated on core's loader (tests/test_flux_blocks.py); A1111 is refused
    pointing to named syntax."""
    model, clip = hv
    state = {**hw.comfy_native(model, seed=42), **hw.text_encoders(clip, seed=43)}
    base = {k: v.clone() for k, v in model.model.state_dict().items()}
    base_clip = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    vector = "0.3,1,0,2,0.5,0,1,1,1,1,1,1"
    ours, ours_clip, table = _block_weight(model, clip, tmp_path, state, vector, mode="inspire", strengths=(0.8, 0.6))
    ref, ref_clip = inspire_reference(model, clip, state, 0.8, 0.6, vector)
    assert_same(bake(ours), bake(ref), base, "inspire/MODEL")
    assert_same(bake(ours_clip.patcher), bake(ref_clip.patcher), base_clip, "inspire/CLIP")
    with pytest.raises(LoraValueError, match="no positional layout for hunyuan_video: use named syntax"):
        _block_weight(model, clip, tmp_path, state, ",".join(["1"] * 61), mode="a1111", strengths=(0.8, 0.6))


def test_block_info_and_sweep(hv, tmp_path):
    model, _ = hv
    state = hw.musubi(model, seed=44)
    lw.save_safetensors(state, tmp_path / "hv_tool.safetensors", hw.MUSUBI_METADATA)
    tools = node_module("block_tools")
    with loras_folder(tmp_path):
        info = tools.block_info("hv_tool.safetensors", "auto", model=model)
        text, chart = tools.LoRACoreBlockInfo().inspect("hv_tool.safetensors", "auto")   # layout from metadata
        models, labels = tools.LoRACoreBlockSweep().sweep(model, "hv_tool.safetensors", 1.0, "blocks", 1.0, 0.0,
                                                          "named", "", 0, 1.0, 1.0)
    assert list(info["blocks"]) == ["DB00", "DB01", "SB00", "SB01", "SB02"]
    for block, entry in info["blocks"].items():   # the norms are the file's own deltas (alpha 2 / rank 4), by block
        index = int(block[2:])
        word = f"_double_blocks_{index}_" if block.startswith("DB") else f"_single_blocks_{index}_"
        keys = [k for k in state if k.endswith(".lora_up.weight") and word in k]
        expected = sum(float((0.5 * state[k] @ state[k.replace("lora_up", "lora_down")]).square().sum())
                       for k in keys) ** 0.5
        assert abs(entry["norm"] - expected) <= 1e-3 * expected and entry["modules"] == len(keys), block
    assert "HunyuanVideo" in text and "layout only" in text and "SB02" in text and chart.ndim == 4
    assert [label.split()[0] for label in labels[1:]] == ["DB00", "DB01", "SB00", "SB01", "SB02"]
    assert set(models[2].patches) == {k for k in models[0].patches if ".double_blocks.1." not in k}


# ------------------------------------------------------------------------------------- merge / export

def test_merged_block_weighted_stack_loads_to_the_stacks_weights(hv, twin, tmp_path):
    """A block-weighted stack of a musubi file with text-encoder modules and a diffusers PEFT file, merged exact:
    ComfyUI-native `lora_unet_` names (which core reads; musubi's own MLP names it does not), `lora_te1_` and
    `text_encoders.llama.` for the encoders, musubi's metadata; core and our loader give the stack's weights."""
    model, clip = hv
    a = {**hw.musubi(model, seed=45, exclude_mod=False), **hw.text_encoders(clip, seed=46)}
    b = hw.peft_state(twin, seed=47)
    lw.save_safetensors(a, tmp_path / "a.safetensors", hw.MUSUBI_METADATA)
    lw.save_safetensors(b, tmp_path / "b.safetensors")
    bw, mix = node_module("block_weight"), node_module("mix")
    rows = block_stack_rows(enabled_1=True, lora_1="a.safetensors", strength_model_1=0.9, strength_clip_1=0.7,
                vector_1="DB00=0.5, SB01.linear1_mlp=0, TE2=0.3", enabled_2=True, lora_2="b.safetensors",
                strength_model_2=-0.7, vector_2="IN.refiner=0.25, OUT=0, DB01.img=2")
    with loras_folder(tmp_path):
        stack = bw.LoRACoreBlockStack().build(0, 1.0, 1.0, False, **rows)[0]
        stacked, stacked_clip, _ = bw.LoRACoreApplyBlockStack().apply(model, stack, clip=clip)
        path, _ = mix.LoRACoreMergeSave().merge("exact", 0, 0.0, "hv_merge", False, "auto", "fp32",
                                                block_stack=stack, model=model, clip=clip)["result"]
        merged = comfy.utils.load_torch_file(path, safe_load=True)
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            meta = handle.metadata()
        ours, ours_clip, _ = node_module("loader").LoRACoreLoader().load(model, "hv_merge.safetensors", 1.0, 1.0,
                                                                         clip=clip)
    assert meta["ss_base_model_version"] == "hunyuan_video" and meta["modelspec.architecture"] == "hunyuan-video/lora"
    assert meta["ss_network_module"] == "networks.lora"
    modules = {k.rsplit(".", 2)[0] if ".lora_" in k else k.rsplit(".", 1)[0] for k in merged}
    assert all(m.startswith(("lora_unet_", "lora_te1_", "text_encoders.llama.transformer.")) for m in modules)
    assert "lora_unet_double_blocks_0_img_mlp_0" in modules and "lora_unet_single_blocks_0_linear1" in modules
    assert any(m.startswith("lora_unet_txt_in_individual_token_refiner_blocks_") for m in modules)
    assert_merged_file_equals_stack(model, clip, merged, ours, ours_clip, stacked, stacked_clip)


# ------------------------------------------------------------------------------------- standalone (diffusers)

def _diffusers_reference(path, transformer, scale):
    return diffusers_fuse_reference(HunyuanVideoLoraLoaderMixin, path, transformer, scale)


def _double_and_linear2(model) -> dict:
    """diffusion-pipe's targets without the single blocks' linear1: diffusers' converter splits linear1 at a fixed
    3072 rows (`remap_single_transformer_blocks_`, hidden_size = 3072), which only a full-size model has."""
    return {p: m for p, m in hw.block_linears(model).items() if not p.endswith(".linear1")}


def _fused_native(twin, seed, kohya=False):
    """(a ComfyUI-named file with fused qkv / linear1 LoRAs, the PEFT file diffusers reads with the same change):
    tests.hunyuan_video_writers.diffusers_to_comfy of a PEFT file, optionally under kohya's `lora_unet_` names."""
    peft = hw.peft_state(twin, seed=seed)
    native = hw.diffusers_to_comfy(peft)
    if kohya:
        native = {"lora_unet_" + k[len("diffusion_model."):].rsplit(".lora_", 1)[0].replace(".", "_") + ".lora_" +
                  k.rsplit(".lora_", 1)[1]: v for k, v in native.items()}
    return native, peft


STANDALONE_WRITERS = {   # (file, the file diffusers reads for the reference; None: the same)
    "diffusers-peft": lambda m, t: (hw.peft_state(t, seed=50), None),
    "diffusion-pipe": lambda m, t: (hw.diffusion_pipe(m, seed=51, layers=_double_and_linear2(m)), None),
    "diffusion-pipe-old": lambda m, t: (hw.diffusion_pipe(m, seed=52, prefix="diffusion_model.",
                                                          layers=_double_and_linear2(m)), None),
    "comfy-native-fused": lambda m, t: _fused_native(t, 53),
    "kohya-fused": lambda m, t: _fused_native(t, 54, kohya=True),
}


@pytest.mark.parametrize("writer", list(STANDALONE_WRITERS))
def test_lora_patcher_on_diffusers_equals_diffusers_fuse_lora(hv, twin, tmp_path, writer):
    """`LoraPatcher(transformer=...)` on diffusers' HunyuanVideoTransformer3DModel equals
    `HunyuanVideoLoraLoaderMixin.load_lora_weights` + `fuse_lora` (which converts Tencent's names itself) at 1.0 and
    -0.6; restore() is exact. ComfyUI / kohya files with fused qkv / linear1 (which diffusers cannot read at this
    size) land on the split to_q / to_k / to_v / proj_mlp weights: the reference is diffusers on the PEFT file
    holding the same change."""
    model, _ = hv
    state, reference_state = STANDALONE_WRITERS[writer](model, twin)
    path = lw.save_safetensors(state, tmp_path / f"{writer}.safetensors")
    reference_path = path if reference_state is None else \
        lw.save_safetensors(reference_state, tmp_path / f"{writer}_reference.safetensors")
    ours = copy.deepcopy(twin)
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    patcher = LoraPatcher(transformer=ours)
    assert patcher.key_map.arch is HUNYUAN_VIDEO
    for scale in (1.0, -0.6):
        reference = _diffusers_reference(reference_path, twin, scale)
        plan = patcher.apply([LoraRequest(read_lora_file(path), scale, 0.0)])
        assert not plan.reports[0].unmatched and not plan.reports[0].unused_keys, plan.text()
        state = ours.state_dict()
        assert state.keys() == reference.keys()
        changed = 0
        for key in reference:
            delta = (reference[key] - base[key]).abs().max().item()
            error = (state[key] - reference[key]).abs().max().item()
            assert error <= 1e-5 * delta + 2 * EPS * reference[key].abs().max().item(), (key, error, delta)
            changed += delta > 0
        assert changed >= 20 and changed == len(plan.patches)
    patcher.restore()
    assert all(torch.equal(v, base[k]) for k, v in ours.state_dict().items())


def test_lora_patcher_on_diffusers_hunyuan_video_15(tmp_path):
    """diffusers' HunyuanVideo15Transformer3DModel (its 1.5 input modules: `context_embedder_2` = byt5_in,
    `image_embedder` = vision_in, `time_embed`, `cond_type_embed`): bound with nothing left over, and a PEFT file
    equals diffusers' own PEFT injection + fuse_lora (diffusers 0.36 has no 1.5 LoRA mixin; the HunyuanVideo one
    loads into any transformer attribute) at 1.0 and -0.6."""
    twin = th.diffusers_hunyuan_video_15_twin()
    binding = bind_diffusers(twin.state_dict())
    assert binding.arch is HUNYUAN_VIDEO_15 and binding.unbound == []
    state = hw.peft_state(twin, seed=60, targets=hw.PEFT_TARGETS + ("linear_3",))
    assert any(".context_embedder_2.linear_3." in k for k in state) and any(".image_embedder." in k for k in state)
    path = lw.save_safetensors(state, tmp_path / "hv15.safetensors")
    ours = copy.deepcopy(twin)
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    patcher = LoraPatcher(transformer=ours)
    for scale in (1.0, -0.6):
        reference = _diffusers_reference(path, twin, scale)
        plan = patcher.apply([LoraRequest(read_lora_file(path), scale, 0.0)])
        assert not plan.reports[0].unmatched and not plan.reports[0].unused_keys, plan.text()
        after = ours.state_dict()
        changed = 0
        for key in reference:
            delta = (reference[key] - base[key]).abs().max().item()
            assert (after[key] - reference[key]).abs().max().item() <= 1e-5 * delta + \
                2 * EPS * reference[key].abs().max().item(), key
            changed += delta > 0
        assert changed >= 20 and changed == len(plan.patches)
    patcher.restore()
    assert all(torch.equal(v, base[k]) for k, v in ours.state_dict().items())


def test_resize_of_a_diffusers_file(hv, twin, tmp_path):
    """Resize (SVD) of a PEFT file: the q / k / v parts (rank 4 each) joined into one change of ComfyUI's fused qkv
    (rank 12; linear1 with proj_mlp 16); at rank 16 nothing is lost, so the resized file in core equals the original
    in ours; at rank 2 it
    is smaller and still loads in core. The output carries musubi's HunyuanVideo strings. Without the model the
    tiny file is refused (its parts do not fit the full-size fused rows) with the fix: connect the MODEL."""
    from safetensors import safe_open

    model, _ = hv
    state = hw.peft_state(twin, seed=61, targets=("to_q", "to_k", "to_v", "proj_mlp", "to_out.0"))
    lw.save_safetensors(state, tmp_path / "peft.safetensors")
    mix = node_module("mix").LoRACoreResize()
    with loras_folder(tmp_path):
        with pytest.raises(LoraMatchError, match="Connect the base MODEL"):
            mix.resize("peft.safetensors", 12, 1.0, "hv_no_model", False, "auto", "fp32")
        full, _ = mix.resize("peft.safetensors", 16, 1.0, "hv_resized", False, "auto", "fp32", model=model)["result"]
        small, _ = mix.resize("peft.safetensors", 2, 1.0, "hv_small", False, "auto", "fp32", model=model)["result"]
        ours, _ = node_module("loader").LoRACoreLoaderModelOnly().load(model, "peft.safetensors", 0.8)
    with safe_open(full, framework="pt") as handle:
        meta = handle.metadata()
        keys = set(handle.keys())
    assert meta["ss_base_model_version"] == "hunyuan_video" and meta["modelspec.architecture"] == "hunyuan-video/lora"
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in keys
    resized = comfy.utils.load_torch_file(full, safe_load=True)
    assert resized["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 12   # q, k, v: 3 x 4
    assert resized["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape[0] == 16      # and proj_mlp
    core_model, _ = comfy.sd.load_lora_for_models(model, None, resized, 0.8, 0.0)
    base = {k: v.clone() for k, v in model.model.state_dict().items()}
    assert_same(bake(core_model), bake(ours), base, "resized rank 16 in core vs the PEFT file in ours")
    tiny = comfy.utils.load_torch_file(small, safe_load=True)
    assert max(v.shape[0] for k, v in tiny.items() if k.endswith("lora_down.weight")) == 2
    assert not core_drops(model, None, tiny)
