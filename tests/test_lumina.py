"""Z-Image and Lumina Image 2.0 end to end in the real host (ComfyUI 0.3.75 on CPU, tiny models built with its own
classes, tests/tiny_lumina.py):

* the key map is a superset of core's for both variants and their CLIPs, except where core is wrong: Lumina 2's
  `attention.to_k` / `to_v` (core's equal thirds; ours follow the GQA rows) - asserted row for row;
* every writer's file loads and equals core's loader where core reads it (1e-5 of the delta, at 1.0 and -0.6,
  same patched keys, one patch per fused weight); where core cannot read it (asserted: core drops it) or misreads
  it (asserted: core fails), it equals core on the same tensors under names core reads correctly;
* text-encoder modules apply where the CLIP holds that encoder, and are reported as not applied otherwise;
* LoRAs for another family or size are refused naming both (a Qwen-Image LoRA on Z-Image); block layout, named
  syntax with element kinds, Inspire (BASE only), A1111 refused, Block Info / sweep; merged block-weighted stacks
  load to the stack's weights with the family's metadata;
* `LoraPatcher(transformer=...)` on diffusers' ZImageTransformer2DModel / Lumina2Transformer2DModel equals
  diffusers' own `load_lora_weights` + `fuse_lora`.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch
from diffusers.loaders import Lumina2LoraLoaderMixin, ZImageLoraLoaderMixin

from tests.comfy_host import import_comfy
from tests.pack import block_stack_rows, diffusers_fuse_reference, host, loras_folder, node_module
from tests import dit_writers as dw
from tests import lora_writers as lw
from tests import lumina_writers as zw
from tests import qwen_image_writers as qw
from tests import tiny_lumina as tl
from tests import tiny_models as tm
from tests import tiny_qwen_image as tq
from tests.test_flux import EPS, assert_merged_file_equals_stack, assert_same, bake, compare
from tests.test_sd3 import check_superset, core_drops

comfy = import_comfy()
import comfy.lora  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

from lora_core import blocks  # noqa: E402
from lora_core.api import LoraPatcher, LoraRequest  # noqa: E402
from lora_core.arch import bind_comfy_model, bind_diffusers, registry  # noqa: E402
from lora_core.arch.families.lumina import LUMINA2, Z_IMAGE  # noqa: E402
from lora_core.errors import LoraMatchError, LoraValueError  # noqa: E402
from lora_core.io import read_lora_file  # noqa: E402
from lora_core.types import LoraFile  # noqa: E402


@pytest.fixture(scope="module")
def zimage():
    return tl.comfy_z_image(), tl.comfy_clip_z_image()


@pytest.fixture(scope="module")
def lumina():
    return tl.comfy_lumina2(), tl.comfy_clip_lumina2()


@pytest.fixture(scope="module")
def ztwin():
    return tl.diffusers_z_image_twin()


@pytest.fixture(scope="module")
def ltwin():
    return tl.diffusers_lumina2_twin()


# ------------------------------------------------------------------------------------- key map vs core

def test_z_image_key_map_is_a_superset_of_cores(zimage):
    model, _ = zimage
    km = host(model).key_map
    assert km.arch is Z_IMAGE and km.conflicts == []
    theirs = comfy.lora.model_lora_keys_unet(model.model, {})
    checked, missing = check_superset(km, theirs, model.model.state_dict())
    # the pad tokens (parameters of the model itself) too: a full diff reaches them (tests/test_param_diffs.py)
    assert missing == []
    assert checked > 150 and len(km) > checked
    assert km.resolve("diffusion_model.layers.1.attention.to_v").pieces[0].dst == 2 * 48


def test_lumina2_key_map_follows_the_gqa_rows_where_core_splits_thirds(lumina):
    """Core maps `attention.to_q/to_k/to_v` on Lumina 2 to equal thirds of `attention.qkv` (comfy/utils.py
    z_image_to_diffusers uses dim for every part): wrong for its GQA layout (q 64, k 32, v 32 rows here; 2304 / 768 /
    768 at full size). Every other alias of core's map lands where core puts it."""
    model, _ = lumina
    km = host(model).key_map
    assert km.arch is LUMINA2 and km.conflicts == [] and km.config.kv_rows == 32
    theirs = comfy.lora.model_lora_keys_unet(model.model, {})
    sd = model.model.state_dict()
    wrong = {a: t for a, t in theirs.items() if isinstance(t, tuple) and t[1] is not None and t[1][1] > 0}
    assert wrong and all(a.endswith(("to_k", "to_v")) for a in wrong)
    checked, missing = check_superset(km, {a: t for a, t in theirs.items() if a not in wrong}, sd)
    assert missing == [] and checked > 150
    for alias, (key, (_, start, length)) in wrong.items():
        ours = km.resolve(alias)
        assert [(p.host_key, p.length) for p in ours.pieces] == [(key, 32)], alias
        assert ours.pieces[0].dst == (64 if alias.endswith("to_k") else 96)
        assert (start, length) == ((64, 64) if alias.endswith("to_k") else (128, 64))   # core's thirds of 64


@pytest.mark.parametrize("which", ["z_image", "lumina2"])
def test_clip_key_map_is_a_superset_of_cores(zimage, lumina, which):
    model, clip = zimage if which == "z_image" else lumina
    km = host(model, clip).key_map
    assert km.conflicts == []
    theirs = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    checked, missing = check_superset(km, theirs, clip.cond_stage_model.state_dict())
    assert missing == [] and checked > 20
    if which == "lumina2":   # kohya's Gemma names and diffusers' text_encoder. names, which core lacks
        for name in ("lora_te_layers_0_self_attn_q_proj", "text_encoder.layers.1.mlp.down_proj"):
            target = km.resolve(name)
            assert target.component == "te1" and target.host_key.startswith("gemma2_2b.transformer.model.layers.")
            assert name not in theirs


# ------------------------------------------------------------------------------------- detection

@pytest.mark.parametrize("which", ["z_image", "lumina2"])
def test_variants_from_state_dicts_configs_and_diffusers_twins(zimage, lumina, ztwin, ltwin, which):
    model = (zimage if which == "z_image" else lumina)[0]
    want = Z_IMAGE if which == "z_image" else LUMINA2
    sd = model.model.state_dict()
    with_config = bind_comfy_model(sd, model.model.model_config.unet_config,
                                   config_name=type(model.model.model_config).__name__)
    from_shapes = bind_comfy_model({k: tuple(v.shape) for k, v in sd.items()})
    assert with_config.arch is from_shapes.arch is bind_comfy_model(list(sd)).arch is want
    assert with_config.config == from_shapes.config
    assert with_config.unbound == []
    twin = ztwin if which == "z_image" else ltwin
    dif = bind_diffusers(twin.state_dict())
    assert dif.arch is want and dif.unbound == []
    assert dif.config.kv_rows == with_config.config.kv_rows and dif.config.dim == with_config.config.dim
    # neither is another family's, and no other family's state dict is taken for this one
    for other in (tm.comfy_flux(), tq.comfy_qwen_image()):
        assert bind_comfy_model(other.model.state_dict()).family is not Z_IMAGE.family


def test_clip_objects_and_metadata_name_the_variant():
    assert registry.arch_of_clip({"qwen3_4b"}) is Z_IMAGE and registry.arch_of_clip({"gemma2_2b"}) is LUMINA2
    for meta, want in ((zw.KOHYA_METADATA["z_image"], Z_IMAGE), (zw.KOHYA_METADATA["lumina2"], LUMINA2),
                       ({"ss_base_model_version": "zimage"}, Z_IMAGE), ({"ss_base_model_version": "lumina2"}, LUMINA2)):
        assert registry.arch_of_metadata(meta) is want, meta
        assert registry.arch_of_metadata({"modelspec.architecture": meta.get("modelspec.architecture",
                                                                            "")}) in (want, None)


def real_shape_lora(dim: int, kv: int, cap: int, naming: str = "native", blocks=(0,), meta=None) -> LoraFile:
    """A rank-1 file with the full-size shapes of a variant (no model needed)."""
    gen = torch.Generator().manual_seed(5)
    tensors = {}

    def pair(name, rows, cols):
        tensors[f"{name}.lora_down.weight"] = 0.01 * torch.randn(1, cols, generator=gen)
        tensors[f"{name}.lora_up.weight"] = 0.01 * torch.randn(rows, 1, generator=gen)

    for i in blocks:
        if naming == "native":
            pair(f"lora_unet_layers_{i}_attention_qkv", dim + 2 * kv, dim)
            pair(f"lora_unet_layers_{i}_attention_out", dim, dim)
        else:
            for x, rows in (("q", dim), ("k", kv), ("v", kv)):
                pair(f"lora_unet_layers_{i}_attention_to_{x}", rows, dim)
    pair("lora_unet_cap_embedder_1", dim, cap)
    return LoraFile(None, tensors, dict(meta or {}))


def test_variant_of_a_file_from_its_shapes():
    """No metadata: the widths tell Z-Image (3840, caption 2560, qkv 11520) from Lumina 2 (2304, caption 2304, qkv
    3840); a file with layers 26+ is Z-Image's alone."""
    assert registry.detect_lora(real_shape_lora(3840, 3840, 2560)) is Z_IMAGE
    assert registry.detect_lora(real_shape_lora(2304, 768, 2304)) is LUMINA2
    assert registry.detect_lora(real_shape_lora(3840, 3840, 2560, naming="musubi")) is Z_IMAGE
    assert registry.detect_lora(real_shape_lora(2304, 768, 2304, naming="musubi")) is LUMINA2
    assert registry.detect_lora(real_shape_lora(3840, 3840, 2560, blocks=(0, 28))) is Z_IMAGE
    assert registry.base_model_name(real_shape_lora(2304, 768, 2304, meta=zw.KOHYA_METADATA["lumina2"])) == \
        ("Lumina 2", "metadata")


# ------------------------------------------------------------------------------------- writers core reads

def test_comfy_native_and_kohya_names(zimage, lumina, tmp_path, caplog):
    for pair in (zimage, lumina):
        model, _ = pair
        compare(pair, tmp_path, caplog, zw.comfy_native(model, seed=1))
        compare(pair, tmp_path, caplog, zw.comfy_native(model, seed=2, peft_suffixes=True))
        compare(pair, tmp_path, caplog, zw.diffusion_pipe(model, seed=3))
    reports = compare(lumina, tmp_path, caplog, zw.kohya_lumina(lumina[0], seed=4))
    assert "Lumina Image 2.0" in reports[0]


def test_full_diffs_with_bias_and_norms(zimage, lumina, tmp_path, caplog):
    for pair in (zimage, lumina):
        state = zw.full_diffs(pair[0], seed=5)
        assert "diffusion_model.layers.0.attention.q_norm.diff" in state and any(".diff_b" in k for k in state)
        compare(pair, tmp_path, caplog, state)


def test_z_image_diffusers_names_under_diffusion_model(zimage, ztwin, tmp_path, caplog):
    """ai-toolkit (and musubi's converted files): diffusers' Z-Image names with `diffusion_model.`; core slices
    to_q / to_k / to_v into the fused qkv (its Lumina2 branch); ours combines them into one patch per qkv."""
    state = zw.ai_toolkit_z_image(ztwin, seed=6)
    assert "diffusion_model.layers.0.attention.to_k.lora_A.weight" in state
    compare(zimage, tmp_path, caplog, state)
    state = zw.musubi_z_image(ztwin, seed=7, comfy_names=True)
    compare(zimage, tmp_path, caplog, state)


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_lycoris_on_z_image(zimage, ztwin, tmp_path, caplog, algo):
    """LyCORIS' own wrapper on the diffusers Z-Image blocks (`lycoris_layers_0_attention_to_q`, core maps these)."""
    blocks_ = torch.nn.ModuleDict({"layers": ztwin.layers})
    state = lw.lycoris_state_dict(blocks_, algo, prefix="lycoris", rank=4, alpha=2.0, seed=8, target_module=("Linear",))
    assert any(k.startswith("lycoris_layers_0_attention_to_q.") for k in state)
    compare(zimage, tmp_path, caplog, state)


def test_text_encoders_under_comfys_names(zimage, lumina, tmp_path, caplog):
    for pair, attribute in ((zimage, "qwen3_4b"), (lumina, "gemma2_2b")):
        model, clip = pair
        state = {**zw.comfy_native(model, seed=9), **zw.comfy_text_encoder(clip, attribute, seed=10)}
        reports = compare(pair, tmp_path, caplog, state, with_clip=True)
        assert "te1" in reports[0]


# ------------------------------------------------------------------------------------- writers core misreads

def test_z_image_names_core_0375_drops(zimage, ztwin, tmp_path, caplog):
    """diffusers/PEFT `transformer.` (core: from #11135), DiffSynth's bare `.default.` names (#11805) and musubi's
    `lora_unet_layers_0_attention_to_q` (ComfyUI issue #11487): core drops them. Truth: core on the same tensors
    under `diffusion_model.<diffusers name>` (which it slices right for Z-Image)."""
    model, _ = zimage
    peft = zw.peft_z_image(ztwin, seed=11)
    assert core_drops(model, None, peft)
    compare(zimage, tmp_path, caplog, peft, core_state=zw.rename(peft, "transformer.", "diffusion_model."))
    diffsynth = zw.diffsynth_z_image(ztwin, seed=12)
    assert core_drops(model, None, diffsynth)
    truth = {"diffusion_model." + k.replace(".default.", "."): v for k, v in diffsynth.items()}
    compare(zimage, tmp_path, caplog, diffsynth, core_state=truth)
    musubi = zw.musubi_z_image(ztwin, seed=13)
    assert any(k.startswith("lora_unet_layers_0_attention_to_out_0.") for k in musubi)
    assert not any("refiner" in k or "modulation" in k for k in musubi)
    assert core_drops(model, None, musubi)
    compare(zimage, tmp_path, caplog, musubi, core_state=zw.musubi_z_image(ztwin, seed=13, comfy_names=True))


def test_lumina2_diffusers_names_core_cannot_read(lumina, ltwin, tmp_path, caplog):
    """Lumina 2 in diffusers' naming (`transformer.layers.N.attn.to_k`, `feed_forward.linear_1`, `norm1.linear`;
    ComfyUI issue #7502): core drops every key. Truth: core on the same tensors under ComfyUI's names with q / k / v
    fused into one exact `attention.qkv` LoRA in the GQA row order."""
    model, _ = lumina
    state = zw.peft_lumina2(ltwin, seed=14)
    assert any(".attn.to_k." in k for k in state) and any(".norm1.linear." in k for k in state)
    assert core_drops(model, None, state)
    truth = zw.fuse_qkv(zw.to_comfy_lumina2(state))
    assert "diffusion_model.layers.0.attention.qkv.lora_up.weight" in truth
    compare(lumina, tmp_path, caplog, state, core_state=truth)
    bare = zw.rename(state, "transformer.", "")   # the same names without prefix (DiffSynth style)
    compare(lumina, tmp_path, caplog, bare, core_state=truth)


def test_lumina2_split_qkv_under_z_image_names_where_core_is_wrong(lumina, ltwin, tmp_path, caplog):
    """`diffusion_model.layers.N.attention.to_q/k/v` on Lumina 2: core maps them to equal thirds of the 128 GQA rows
    (q 64 | k 32 | v 32): to_k's 32 rows do not fit its 64-row slice (logged `ERROR lora`, skipped) and to_v's slice
    runs past the weight (RuntimeError). Ours puts each on its own rows; the truth is core on the fused qkv."""
    model, _ = lumina
    state = zw.to_comfy_lumina2(zw.peft_lumina2(ltwin, seed=15))
    assert "diffusion_model.layers.0.attention.to_v.lora_B.weight" in state
    with pytest.raises(RuntimeError, match="exceeds dimension size"):
        patched, _ = comfy.sd.load_lora_for_models(model, None, state, 1.0, 1.0)
        bake(patched)
    compare(lumina, tmp_path, caplog, state, core_state=zw.fuse_qkv(state))


def test_lycoris_and_bare_native_names_on_lumina2(lumina, tmp_path, caplog):
    """LyCORIS' own wrapper on ComfyUI's NextDiT (`lycoris_layers_0_attention_qkv`) and bare native names: core's
    Lumina2 branch maps `lycoris_` only for diffusers names, its generic map no bare names. Truth: core on
    `lora_unet_` / `diffusion_model.`."""
    model, _ = lumina
    blocks_ = torch.nn.ModuleDict({"layers": tl_layers(model)})
    state = lw.lycoris_state_dict(blocks_, "lora", prefix="lycoris", rank=4, alpha=2.0, seed=16,
                                  target_module=("Linear",))
    assert core_drops(model, None, state)
    compare(lumina, tmp_path, caplog, state, core_state=zw.rename(state, "lycoris_", "lora_unet_"))
    native = zw.comfy_native(model, seed=17, prefix="")
    assert core_drops(model, None, native)
    compare(lumina, tmp_path, caplog, native, core_state={"diffusion_model." + k: v for k, v in native.items()})


def tl_layers(model):
    return model.model.diffusion_model.layers


def test_kohya_gemma_text_encoder(lumina, tmp_path, caplog):
    """kohya Lumina's Gemma-2 LoRA (`lora_te_layers_0_self_attn_q_proj`): core has no `lora_te_` name for Gemma and
    drops it. Truth: core on `text_encoders.gemma2_2b.transformer.model.<path>`."""
    model, clip = lumina
    unet = zw.kohya_lumina(model, seed=18)
    te = zw.kohya_gemma(clip, seed=19)
    assert "lora_te_layers_0_self_attn_q_proj.lora_down.weight" in te
    assert core_drops(model, clip, te)
    truth = {"text_encoders.gemma2_2b.transformer.model." + k[len("lora_te_"):].split(".")[0].replace("_", ".")
             .replace("self.attn", "self_attn").replace("q.proj", "q_proj").replace("k.proj", "k_proj")
             .replace("v.proj", "v_proj").replace("o.proj", "o_proj").replace("gate.proj", "gate_proj")
             .replace("up.proj", "up_proj").replace("down.proj", "down_proj") + "." + k.split(".", 1)[1]: v
             for k, v in te.items()}
    reports = compare(lumina, tmp_path, caplog, {**unet, **te}, core_state={**unet, **truth}, with_clip=True)
    assert "te1" in reports[0]


# ------------------------------------------------------------------------------------- text encoders not applied

def test_encoders_the_clip_lacks_are_reported_not_applied(zimage, lumina, tmp_path, caplog):
    """A Z-Image file with Qwen3-4B modules on Lumina 2's CLIP (Gemma): the Qwen3 part is named as not applicable;
    with no CLIP, 'no CLIP connected'."""
    model, clip = zimage
    state = {**zw.comfy_native(model, seed=20), **zw.comfy_text_encoder(clip, "qwen3_4b", seed=21)}
    lw.save_safetensors(state, tmp_path / "z.safetensors")
    loader = node_module("loader")
    with loras_folder(tmp_path):
        _, report = loader.LoRACoreLoaderModelOnly().load(model, "z.safetensors", 1.0)
        assert "not applied: te1" in report and "no CLIP connected" in report and "unmatched" not in report
        patched, clip_out, report = loader.LoRACoreLoader().load(model, "z.safetensors", 1.0, 1.0, clip=lumina[1])
    assert "no Qwen3-4B encoder is connected" in report and "applied modules: transformer" in report
    assert patched.patches and not clip_out.patcher.patches


# ------------------------------------------------------------------------------------- fit and mismatch

def _refused(model, name) -> str:
    with pytest.raises(LoraMatchError) as caught:
        node_module("loader").LoRACoreLoaderModelOnly().load(model, name, 1.0)
    text = str(caught.value)
    assert name in text
    return text


def test_loras_for_other_families_and_sizes_are_refused_naming_both(zimage, lumina, tmp_path):
    z_model, l_model = zimage[0], lumina[0]
    qwen = tq.comfy_qwen_image()
    flux = tm.comfy_flux()
    files = {
        "qwen.safetensors": (qw.musubi(qwen, seed=22), {"ss_base_model_version": "qwen_image"}),
        "qwen_bare.safetensors": (qw.comfy_native(qwen, seed=23), None),
        "z.safetensors": (zw.comfy_native(z_model, seed=24), zw.KOHYA_METADATA["z_image"]),
        "z_bare.safetensors": (zw.comfy_native(z_model, seed=24), None),
        "l.safetensors": (zw.kohya_lumina(l_model, seed=25), zw.KOHYA_METADATA["lumina2"]),
        "flux.safetensors": (dw.kohya_flux(flux, seed=26), None),
        "z_wide.safetensors": (zw.comfy_native(tl.comfy_z_image(dim=96, heads=4, kv_heads=4), seed=27), None),
        "z_deep.safetensors": (zw.comfy_native(tl.comfy_z_image(layers=3), seed=28), None),
    }
    for name, (state, meta) in files.items():
        lw.save_safetensors(state, tmp_path / name, meta)
    with loras_folder(tmp_path):
        for name in ("qwen.safetensors", "qwen_bare.safetensors"):   # the example
            text = _refused(z_model, name)
            assert "Qwen-Image" in text and "Z-Image" in text, text
        text = _refused(qwen, "z_bare.safetensors")
        assert "made for Z-Image" in text and "Qwen-Image" in text
        text = _refused(flux, "z.safetensors")
        assert "Z-Image" in text and "Flux.1" in text
        text = _refused(z_model, "flux.safetensors")
        assert "Flux.1" in text and "Z-Image" in text
        # one class, two variants: Z-Image on Lumina 2 and back (widths 48 vs 64; adaLN_modulation.0 vs .1)
        text = _refused(l_model, "z.safetensors")
        assert "Z-Image" in text and "Lumina Image 2.0" in text
        text = _refused(z_model, "l.safetensors")
        assert "Lumina Image 2.0" in text and "Z-Image" in text
        text = _refused(z_model, "z_wide.safetensors")
        assert "does not fit" in text
        _, report = node_module("loader").LoRACoreLoaderModelOnly().load(z_model, "z_deep.safetensors", 1.0)
    assert "WARNING" in report and "key for layers block 2, but this Z-Image (Turbo) model has 2" in report


def test_reasons_for_names_this_model_lacks(zimage, lumina):
    z_km, l_km = host(zimage[0]).key_map, host(lumina[0]).key_map
    cases = {
        (z_km, "lora_unet_layers_7_attention_qkv"): "has 2 (0-1)",
        (z_km, "diffusion_model.noise_refiner.4.feed_forward.w1"): "noise_refiner block 4",
        (z_km, "diffusion_model.layers.0.adaLN_modulation.1"): "made for Lumina Image 2.0",
        (l_km, "lora_unet_layers_0_adaLN_modulation_0"): "made for Z-Image",
        (l_km, "diffusion_model.context_refiner.0.adaLN_modulation.1"): "no modulation",
        (l_km, "diffusion_model.x_pad_token"): "Z-Image's pad tokens",
        (z_km, "transformer.layers.0.attn.to_k"): "made for Lumina Image 2.0",
        (z_km, "transformer.norm_out.linear_1"): "made for Lumina Image 2.0",
        (z_km, "lora_unet_double_blocks_0_img_attn_qkv"): "Flux.1",
        (z_km, "transformer.transformer_blocks.0.img_mlp.net.0.proj"): "Qwen-Image",
    }
    for (km, name), words in cases.items():
        assert km.resolve(name) is None, name
        assert words in km.explain_unmatched(name), (name, km.explain_unmatched(name))
    flux_km = host(tm.comfy_flux()).key_map   # this family's own marks, on another family's model
    assert "Z-Image / Lumina Image 2.0" in flux_km.explain_unmatched("lora_unet_layers_0_attention_to_q")
    assert "Z-Image / Lumina Image 2.0" in flux_km.explain_unmatched("transformer.noise_refiner.0.attn.to_k")


# ------------------------------------------------------------------------------------- blocks

def test_block_layouts_as_data():
    assert Z_IMAGE.blocks == ("TE1", "IN", "NR0", "NR1", "CR0", "CR1") + tuple(f"L{i:02d}" for i in range(30)) + \
        ("OUT",)
    assert LUMINA2.blocks[-2:] == ("L25", "OUT") and len(LUMINA2.blocks) == 33
    layout = Z_IMAGE.layout
    assert layout.groups["REF"] == ("NR0", "NR1", "CR0", "CR1") and layout.groups["BASE"] == ("TE1",)
    assert "no modulation" in layout.descriptions["CR0"] and "Qwen3-4B" in layout.descriptions["TE1"]
    assert "Gemma-2-2B" in LUMINA2.layout.descriptions["TE1"]
    assert layout.element_groups["modulation"] == {"mod", "final_mod"}
    assert not layout.a1111 and not layout.inspire_groups
    for key in ("z_image", "lumina2"):
        with pytest.raises(LoraValueError, match=f"no positional layout for {key}: use named syntax"):
            blocks.resolve_vector(key, "a1111", ",".join(["1"] * 17))


def _block_weight(model, clip, tmp_path, state, vector, mode="named", strengths=(1.0, 0.0), name="lbw"):
    lw.save_safetensors(state, tmp_path / f"{name}.safetensors")
    with loras_folder(tmp_path):
        return node_module("block_weight").LoRACoreBlockWeight().load(
            model, f"{name}.safetensors", strengths[0], strengths[1], mode, "custom", vector, 0, 1.0, 1.0, False,
            clip=clip)


def _expected_factor(key: str) -> float:
    """The factor of NAMED for a host key, by hand from the module names: IN = x/t/cap embedders, NR* / CR* = the
    refiners, L00 / L01 = layers.0 / 1, mod = adaLN_modulation, OUT = final_layer."""
    rest = key[len("diffusion_model."):]
    if rest.startswith(("x_embedder.", "t_embedder.", "cap_embedder.")):
        return 0.0
    if rest.startswith("final_layer."):
        return 0.25 if ".adaLN_modulation." in rest else 1.0
    if rest.startswith("context_refiner."):
        return 0.0
    if rest.startswith("noise_refiner."):
        return 2.0
    block = int(rest.split(".")[1])
    if ".adaLN_modulation." in rest:
        return 0.0 if block == 1 else 0.5
    return 0.5 if block == 0 else 1.0


NAMED = "IN=0, NR*=2, CR*=0, L00=0.5, L01.mod=0, OUT.final_mod=0.25"


@pytest.mark.parametrize("which", ["z_image", "lumina2"])
def test_named_syntax_blocks_and_element_kinds(zimage, lumina, ltwin, tmp_path, which):
    model = (zimage if which == "z_image" else lumina)[0]
    state = zw.comfy_native(model, seed=29)
    got, _, table = _block_weight(model, None, tmp_path, state, NAMED)
    whole, _, _ = _block_weight(model, None, tmp_path, state, "")
    base = model.model.state_dict()
    got, whole = bake(got), bake(whole)
    checked = set()
    for key, value in whole.items():
        factor = _expected_factor(key)
        if factor == 0:
            assert key not in got, f"{key} should be off"
            continue
        torch.testing.assert_close(got[key] - base[key], factor * (value - base[key]), rtol=1e-5, atol=1e-7)
        checked.add(factor)
    assert checked == {0.25, 0.5, 1.0, 2.0} and "L01" in table
    if which == "lumina2":   # a diffusers file: L00's to_q / to_k / to_v rows of the fused qkv take L00's factor
        peft = zw.peft_lumina2(ltwin, seed=30)
        got, _, _ = _block_weight(model, None, tmp_path, peft, "L00=0.25, L01.attn=0", name="p")
        whole, _, _ = _block_weight(model, None, tmp_path, peft, "", name="p")
        got, whole = bake(got), bake(whole)
        key = "diffusion_model.layers.0.attention.qkv.weight"
        torch.testing.assert_close(got[key] - base[key], 0.25 * (whole[key] - base[key]), rtol=1e-5, atol=1e-7)
        assert "diffusion_model.layers.1.attention.qkv.weight" not in got
        assert "diffusion_model.layers.1.feed_forward.w1.weight" in got


def test_inspire_mode_is_base_only_like_inspire(zimage, tmp_path):
    """Inspire Pack gives none of NextDiT's blocks a slot: every key takes the first value (BASE), whatever the
    vector's length. Reference: a re-statement of Inspire's load_lbw on core's own load_lora
    (tests/test_flux_blocks.py)."""
    from tests.test_flux_blocks import inspire_reference

    model, clip = zimage
    state = {**zw.comfy_native(model, seed=31), **zw.comfy_text_encoder(clip, "qwen3_4b", seed=32)}
    base = {k: v.clone() for k, v in model.model.state_dict().items()}
    base_clip = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    for vector in (",".join(["0.6"] + ["0"] * 11), ",".join(["-0.4"] + ["1"] * 40)):
        ours, ours_clip, table = _block_weight(model, clip, tmp_path, state, vector, mode="inspire",
                                               strengths=(0.8, 0.7))
        ref, ref_clip = inspire_reference(model, clip, state, 0.8, 0.7, vector)
        assert_same(bake(ours), bake(ref), base, f"inspire {vector[:12]}")
        assert_same(bake(ours_clip.patcher), bake(ref_clip.patcher), base_clip, "inspire CLIP")
        assert "no block layout for z_image" in table
    with pytest.raises(LoraValueError, match="at least 12"):
        blocks.resolve_vector("z_image", "inspire", "1,1,1")


def test_block_info_and_sweep(lumina, tmp_path):
    model, _ = lumina
    state = zw.kohya_lumina(model, seed=33)
    lw.save_safetensors(state, tmp_path / "info.safetensors", zw.KOHYA_METADATA["lumina2"])
    tools = node_module("block_tools")
    with loras_folder(tmp_path):
        info = tools.block_info("info.safetensors", "auto", model=model)
        assert list(info["blocks"]) == ["NR0", "NR1", "CR0", "CR1", "L00", "L01", "OUT"]
        assert all(entry["norm"] > 0 for entry in info["blocks"].values())
        text, chart = tools.LoRACoreBlockInfo().inspect("info.safetensors", "auto")   # layout from metadata
        assert "Lumina Image 2.0" in text and "layout only" in text and "L25" not in text and chart.ndim == 4
        models, labels = tools.LoRACoreBlockSweep().sweep(model, "info.safetensors", 1.0, "blocks", 1.0, 0.0,
                                                          "named", "", 0, 1.0, 1.0)
    assert [label.split()[0] for label in labels[1:]] == ["NR0", "NR1", "CR0", "CR1", "L00", "L01", "OUT"]
    knocked = set(models[5].patches)   # L00 off
    assert knocked == {k for k in models[0].patches if ".layers.0." not in k} != set(models[0].patches)


def test_sweep_sampled_and_laid_out_as_a_grid(lumina, tmp_path):
    """A block sweep of a kohya Lumina 2 file sampled with ComfyUI's own KSampler on the tiny model (the sweep's
    MODEL list, as ComfyUI's list mapping feeds it) and assembled by the grid node: the baseline tile differs from
    none of itself, knocking a block out changes the image."""
    import nodes as comfy_nodes   # ComfyUI's nodes.py

    model, _ = lumina
    state = {k: 4 * v if not k.endswith(".alpha") else v for k, v in zw.kohya_lumina(model, seed=39).items()}
    lw.save_safetensors(state, tmp_path / "grid.safetensors")
    tools = node_module("block_tools")
    with loras_folder(tmp_path):
        models, labels = tools.LoRACoreBlockSweep().sweep(model, "grid.safetensors", 1.0, "blocks", 1.0, 0.0,
                                                          "named", "", 0, 1.0, 1.0)

    def cond(seed):
        return [[torch.randn(1, 6, tl.CONTEXT, generator=torch.Generator().manual_seed(seed)), {}]]

    images = []
    for variant in models[:4]:   # baseline, NR0, NR1, CR0 off
        (out,) = comfy_nodes.common_ksampler(variant, 7, 2, 1.0, "euler", "normal", cond(1), cond(2),
                                             {"samples": torch.zeros(1, 16, 8, 8)})
        images.append(torch.sigmoid(out["samples"][:, :3]).permute(0, 2, 3, 1).contiguous())
    grid, summary = tools.LoRACoreSweepGrid().assemble(images, columns=[2], heatmap=[True], threshold=[0.001],
                                                       labels=labels[:4])
    assert grid.ndim == 4 and grid.shape[0] == 1 and grid.shape[3] == 3
    lines = summary.splitlines()
    assert len(lines) == 4 and lines[0].startswith(labels[0]) and lines[1].startswith("NR0")
    means = [float(re.search(r"mean \|diff\| ([\d.]+)%", line).group(1)) for line in lines]
    assert means[0] == 0.0 and min(means[1:]) > 0.0


# ------------------------------------------------------------------------------------- merge / export

@pytest.mark.parametrize("which", ["z_image", "lumina2"])
def test_merged_block_weighted_stack_loads_to_the_stacks_weights(zimage, lumina, ztwin, ltwin, tmp_path, which):
    """A block-weighted stack of a native file (with text-encoder modules) and a diffusers PEFT file merged into one
    file (exact): `lora_unet_<ComfyUI path _>` (kohya's and core's names; fused qkv), ComfyUI's generic names for
    the LLM encoder, the variant's metadata (musubi's Z-Image strings, kohya's Lumina 2 strings); loaded in core and
    in our loader it gives the stack's weights."""
    model, clip = zimage if which == "z_image" else lumina
    attribute = "qwen3_4b" if which == "z_image" else "gemma2_2b"
    a = {**zw.comfy_native(model, seed=34), **zw.comfy_text_encoder(clip, attribute, seed=35)}
    b = zw.peft_z_image(ztwin, seed=36) if which == "z_image" else zw.peft_lumina2(ltwin, seed=36)
    lw.save_safetensors(a, tmp_path / "a.safetensors")
    lw.save_safetensors(b, tmp_path / "b.safetensors")
    bw, mix = node_module("block_weight"), node_module("mix")
    rows = block_stack_rows(enabled_1=True, lora_1="a.safetensors", strength_model_1=0.9, strength_clip_1=0.6,
                       vector_1="L00=0.5, CR*=0, TE1=0.3", enabled_2=True, lora_2="b.safetensors",
                       strength_model_2=-0.7, vector_2="L01.attn=0.25, IN=0")
    with loras_folder(tmp_path):
        stack = bw.LoRACoreBlockStack().build(0, 1.0, 1.0, False, **rows)[0]
        stacked, stacked_clip, _ = bw.LoRACoreApplyBlockStack().apply(model, stack, clip=clip)
        path, _ = mix.LoRACoreMergeSave().merge("exact", 0, 0.0, f"{which}_merge", False, "auto", "fp32",
                                                block_stack=stack, model=model, clip=clip)["result"]
        merged = comfy.utils.load_torch_file(path, safe_load=True)
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            meta = handle.metadata()
        ours, ours_clip, _ = node_module("loader").LoRACoreLoader().load(model, f"{which}_merge.safetensors", 1.0,
                                                                         1.0, clip=clip)
    want_meta = {"z_image": ("z_image", "Z-Image/lora", "networks.lora_zimage"),
                 "lumina2": ("lumina2", "lumina-2/lora", "networks.lora_lumina")}[which]
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"], meta["ss_network_module"]) == want_meta
    assert all(k.startswith(("lora_unet_", f"text_encoders.{attribute}.transformer.")) for k in merged)
    assert any(k.startswith("lora_unet_layers_1_attention_qkv.") for k in merged)
    assert not any("_to_q" in k or "_attn_" in k for k in merged)
    assert_merged_file_equals_stack(model, clip, merged, ours, ours_clip, stacked, stacked_clip)


def test_merge_and_resize_keep_the_variant(lumina, ltwin, tmp_path):
    """No model connected: the variant comes from the file (kohya's Lumina 2 metadata), its full-size layout is
    used, and the merged file carries the variant's strings. A tiny diffusers-named file cannot be fused into the
    full-size qkv rows (refused, asking for the model); with the model, a resize to a rank its fused qkv holds exactly
    is the same LoRA in core's names: core on it equals our loader on the original (the q / k / v parts written as
    one `attention.qkv` module in GQA row order)."""
    from safetensors import safe_open

    model, _ = lumina
    kohya = zw.kohya_lumina(model, seed=37)
    lw.save_safetensors(kohya, tmp_path / "k.safetensors", zw.KOHYA_METADATA["lumina2"])
    peft = zw.peft_lumina2(ltwin, seed=38)
    lw.save_safetensors(peft, tmp_path / "p.safetensors")
    mix = node_module("mix")
    with loras_folder(tmp_path):
        merged_path, _ = mix.LoRACoreMergeSave().merge("exact", 0, 0.0, "k_merge", False, "auto", "fp32",
                                                       lora_stack=[("k.safetensors", 0.5, 0.0)])["result"]
        with pytest.raises(LoraMatchError, match="768: the file is for a model of another size. Connect the base"):
            mix.LoRACoreResize().resize("p.safetensors", 12, 0.0, "p_resized", False, "auto", "fp32")
        resized_path, report = mix.LoRACoreResize().resize("p.safetensors", 12, 0.0, "p_resized", False, "auto",
                                                           "fp32", model=model)["result"]
        ours, _ = node_module("loader").LoRACoreLoaderModelOnly().load(model, "p.safetensors", 1.0)
    for path in (merged_path, resized_path):
        with safe_open(path, framework="pt") as handle:
            meta, keys = handle.metadata(), set(handle.keys())
        assert meta["ss_base_model_version"] == "lumina2" and meta["modelspec.architecture"] == "lumina-2/lora"
        assert all(k.startswith("lora_unet_") for k in keys), sorted(keys)[:4]
    with safe_open(merged_path, framework="pt") as handle:
        assert {k.rsplit(".", 2)[0] for k in handle.keys() if k.endswith(".lora_down.weight")} == \
            {k.rsplit(".", 2)[0] for k in kohya if k.endswith(".lora_down.weight")}
    resized = comfy.utils.load_torch_file(resized_path, safe_load=True)
    assert resized["lora_unet_layers_0_attention_qkv.lora_up.weight"].shape[0] == 128
    assert not any("_to_q" in k or "_attn_" in k for k in resized)
    core_model, _ = comfy.sd.load_lora_for_models(model, None, resized, 1.0, 0.0)
    base = {k: v.clone() for k, v in model.model.state_dict().items()}
    assert_same(bake(core_model), bake(ours), base, "resized file in core vs the original in ours")


# ------------------------------------------------------------------------------------- standalone (diffusers)

def _diffusers_reference(mixin, path, transformer, scale):
    return diffusers_fuse_reference(mixin, path, transformer, scale)


STANDALONE_WRITERS = {   # what diffusers reads: PEFT files; for Z-Image also its converter's non-diffusers forms
    "z_image-peft": lambda zt, lt: zw.peft_z_image(zt, seed=40),
    "z_image-ai-toolkit": lambda zt, lt: zw.ai_toolkit_z_image(zt, seed=41),
    "z_image-musubi-converted": lambda zt, lt: zw.musubi_z_image(zt, seed=42, comfy_names=True),
    "z_image-diffsynth": lambda zt, lt: zw.diffsynth_z_image(zt, seed=43),
    "lumina2-peft": lambda zt, lt: zw.peft_lumina2(lt, seed=44),
    # musubi's own `lora_unet_layers_0_attention_to_q.lora_down.weight`: diffusers 0.36's converter splits the base
    # name and the tensor suffix at the last dot only (`to.k.lora.down`) and raises; the reference is diffusers on the
    # same tensors as musubi's convert_lora.py --target other writes them (`diffusion_model.<diffusers path>`)
    "z_image-musubi": lambda zt, lt: (zw.musubi_z_image(zt, seed=42), zw.musubi_z_image(zt, seed=42, comfy_names=True)),
}


@pytest.mark.parametrize("writer", list(STANDALONE_WRITERS))
def test_lora_patcher_on_diffusers_equals_diffusers_fuse_lora(ztwin, ltwin, tmp_path, writer):
    """`LoraPatcher(transformer=...)` on diffusers' ZImageTransformer2DModel / Lumina2Transformer2DModel equals
    `ZImageLoraLoaderMixin` / `Lumina2LoraLoaderMixin.load_lora_weights` + `fuse_lora` at 1.0 and -0.6;
    re-applying and `restore()` stay exact. (diffusers' Lumina 2 converter of ComfyUI-named files hard-codes the
    full-size split [2304, 768, 768], so at tiny size only its own PEFT names are compared.)"""
    z = writer.startswith("z_image")
    twin, mixin = (ztwin, ZImageLoraLoaderMixin) if z else (ltwin, Lumina2LoraLoaderMixin)
    written = STANDALONE_WRITERS[writer](ztwin, ltwin)
    state, truth = written if isinstance(written, tuple) else (written, written)
    path = lw.save_safetensors(state, tmp_path / f"{writer}.safetensors")
    truth_path = lw.save_safetensors(truth, tmp_path / f"{writer}_truth.safetensors")
    if state is not truth:
        with pytest.raises(ValueError, match="should be empty"):
            _diffusers_reference(mixin, path, twin, 1.0)
    ours = copy.deepcopy(twin)
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    patcher = LoraPatcher(transformer=ours)
    assert patcher.key_map.arch is (Z_IMAGE if z else LUMINA2)
    for scale in (1.0, -0.6):
        reference = _diffusers_reference(mixin, truth_path, twin, scale)
        plan = patcher.apply([LoraRequest(read_lora_file(path), scale, 0.0)])
        report = plan.reports[0]
        assert not report.unmatched and not report.unused_keys, plan.text()
        state_after = ours.state_dict()
        assert state_after.keys() == reference.keys()
        changed = 0
        for key in reference:
            delta = (reference[key] - base[key]).abs().max().item()
            error = (state_after[key] - reference[key]).abs().max().item()
            assert error <= 1e-5 * delta + 2 * EPS * reference[key].abs().max().item(), (key, error, delta)
            changed += delta > 0
        assert changed >= 10 and changed == len(plan.patches)
    patcher.restore()
    assert all(torch.equal(v, base[k]) for k, v in ours.state_dict().items())


def test_lora_patcher_puts_a_fused_comfy_qkv_on_diffusers_split_gqa_weights(lumina, ltwin, tmp_path):
    """A kohya Lumina file (fused `attention.qkv`) on diffusers' Lumina2Transformer2DModel: rows [q | k | v] land on
    to_q (64 rows), to_k (32), to_v (32). Reference: core's loader on the ComfyUI model, its qkv split by the GQA
    rows (diffusers single_file_utils.py convert_lumina2_to_diffusers' rule)."""
    model, _ = lumina
    layers = {p: m for p, m in dw.linear_layers(model.model.diffusion_model).items()
              if p.startswith("layers.") and p.endswith("attention.qkv")}
    state = dw.lora_pairs(layers, lambda p: "lora_unet_" + p.replace(".", "_"), 4, 2.0, 45)
    path = lw.save_safetensors(state, tmp_path / "qkv.safetensors")
    patched, _ = comfy.sd.load_lora_for_models(model, None, state, 1.0, 0.0)
    after, before = bake(patched), model.model.state_dict()
    ours = copy.deepcopy(ltwin)
    with torch.no_grad():   # the twin carries the ComfyUI model's qkv rows, split
        for i in range(2):
            q, k, v = before[f"diffusion_model.layers.{i}.attention.qkv.weight"].split([64, 32, 32])
            for name, rows in (("to_q", q), ("to_k", k), ("to_v", v)):
                getattr(ours.layers[i].attn, name).weight.copy_(rows)
    LoraPatcher(transformer=ours).apply([LoraRequest(read_lora_file(path), 1.0, 0.0)])
    for i in range(2):
        want = after[f"diffusion_model.layers.{i}.attention.qkv.weight"].split([64, 32, 32])
        for name, rows in zip(("to_q", "to_k", "to_v"), want):
            got = getattr(ours.layers[i].attn, name).weight
            torch.testing.assert_close(got, rows, rtol=1e-5, atol=1e-6)
