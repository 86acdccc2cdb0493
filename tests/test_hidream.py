"""HiDream-I1 end to end in the real host (ComfyUI 0.3.75 on CPU, tiny models built with its own classes):
recognition (ComfyUI and diffusers; its four-encoder CLIP is not taken for SD3's), a key map that is a superset of
core's for the model and the CLIP, every writer equal to core where core reads it (1e-5 of the delta at 1.0 and
-0.6, same patched keys) and to core on the same tensors under names it reads where it cannot, the four text
encoders (CLIP-L, CLIP-G, T5, Llama) where the CLIP holds them, fit and mismatch errors, blocks (named syntax with
the MoE element kinds, Inspire BASE-only, A1111 refused), merges, and `LoraPatcher` on diffusers'
`HiDreamImageTransformer2DModel` against diffusers' own `load_lora_weights` + `fuse_lora`.
"""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers.loaders import HiDreamImageLoraLoaderMixin

from tests.comfy_host import import_comfy
from tests.pack import block_stack_rows, core_drops, diffusers_fuse_reference, host, loras_folder, node_module
from tests import dit_writers as dw
from tests import flux2_writers as f2
from tests import hidream_writers as hw
from tests import lora_writers as lw
from tests import tiny_flux2 as tf
from tests import tiny_hidream as th
from tests import tiny_models as tm
from tests import tiny_sd3 as ts
from tests.test_flux import EPS, assert_same, bake, compare
from tests.test_flux_blocks import inspire_reference

comfy = import_comfy()
import comfy.lora  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

from lora_core import blocks  # noqa: E402
from lora_core.api import LoraPatcher, LoraRequest  # noqa: E402
from lora_core.arch import bind_diffusers, registry  # noqa: E402
from lora_core.arch.families.hidream import FAMILY, HIDREAM_I1  # noqa: E402
from lora_core.errors import LoraMatchError, LoraValueError  # noqa: E402
from lora_core.io import read_lora_file  # noqa: E402


@pytest.fixture(scope="module")
def hidream():
    return th.comfy_hidream(), th.comfy_clip_hidream()


@pytest.fixture(scope="module")
def twin():
    return th.diffusers_hidream_twin()


# ------------------------------------------------------------------------------------- recognition, key map

def test_recognition_clip_and_metadata(hidream, twin):
    model, _ = hidream
    keys = {k[len("diffusion_model."):]: tuple(v.shape) for k, v in model.model.state_dict().items()
            if k.startswith("diffusion_model.")}
    found = registry.detect_host(list(keys), keys, model.model.model_config.unet_config, "HiDream")
    assert found is not None and found[0] is FAMILY and found[1] is HIDREAM_I1
    spec = found[2]
    assert (spec.hidden, spec.depth, spec.depth_single, spec.experts, spec.captions) == (64, 2, 2, 4, 5)
    dif = bind_diffusers(twin.state_dict())
    assert dif.arch is HIDREAM_I1 and dif.config == spec and dif.unbound == []
    for other in (tm.comfy_flux(), tf.comfy_flux2(), ts.comfy_sd3()):
        other_keys = [k[len("diffusion_model."):] for k in other.model.state_dict() if k.startswith("diffusion_model.")]
        assert FAMILY.detect_host(other_keys, None, None) is None
    assert registry.arch_of_clip({"clip_l", "clip_g", "t5xxl", "llama"}) is HIDREAM_I1   # not SD3's
    assert registry.arch_of_clip({"clip_l", "clip_g", "t5xxl"}).family.name == "sd3"
    assert registry.arch_of_metadata(hw.AI_TOOLKIT_METADATA) is HIDREAM_I1


def test_key_map_is_a_superset_of_cores(hidream):
    """Every name core maps (generic, `lora_unet_`, its HiDream branch's `transformer.` / `lycoris_`, CLIP
    `lora_te1_/2_/3_`, `text_encoders.llama...`) resolves in ours to the same tensor."""
    model, clip = hidream
    core = comfy.lora.model_lora_keys_unet(model.model, {})
    core = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, core)
    km = host(model, clip).key_map
    assert km.arch is HIDREAM_I1 and km.conflicts == []
    present = set(model.model.state_dict()) | set(clip.cond_stage_model.state_dict())
    checked = 0
    for name, target in core.items():
        key = target if isinstance(target, str) else target[0]
        if key not in present:
            continue
        ours = km.resolve(name)
        assert ours is not None and key in ours.host_keys, (name, key, ours)
        checked += 1
    assert checked > 500
    assert km.resolve("transformer.double_stream_blocks.1.block.ff_i.experts.3.w2").block == "DS01"
    assert km.resolve("lora_unet_single_stream_blocks_0_block_ff_i_gate").kind == "router"
    assert km.resolve("diffusion_model.caption_projection.4.linear").block == "IN"
    assert km.resolve("text_encoders.llama.transformer.model.layers.1.mlp.up_proj").component == "te4"
    assert km.resolve("lora_te3_encoder_block_0_layer_0_SelfAttention_q").component == "te3"


# ------------------------------------------------------------------------------------- writers

WRITERS_CORE_READS = {
    "comfy-native": lambda m, t: hw.comfy_native(m, seed=1),
    "comfy-native-lora_A/B": lambda m, t: hw.comfy_native(m, seed=2, peft_suffixes=True),
    "kohya-generic": lambda m, t: hw.kohya_generic(m, seed=3),
    "ai-toolkit": lambda m, t: hw.ai_toolkit(m, seed=4),
    "diffusers-peft": lambda m, t: hw.diffusers_peft(t, seed=5),
    "onetrainer": lambda m, t: hw.onetrainer(m, seed=6),
    "full-diffs": lambda m, t: dw.full_diffs(m, seed=7),
}


@pytest.mark.parametrize("writer", list(WRITERS_CORE_READS))
def test_writer_equals_core(hidream, twin, tmp_path, caplog, writer):
    model, _ = hidream
    reports = compare(hidream, tmp_path, caplog, WRITERS_CORE_READS[writer](model, twin))
    assert "HiDream-I1" in reports[0]


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_lycoris_names_equal_core(hidream, tmp_path, caplog, algo):
    model, _ = hidream
    parts = f2.lycoris_targets(model, ("double_stream_blocks", "single_stream_blocks"))
    state = lw.lycoris_state_dict(parts, algo, prefix="lycoris", rank=4, alpha=2.0, seed=8, target_module=("Linear",))
    assert any(k.startswith("lycoris_double_stream_blocks_0_block_ff_i_experts_0_w1.") for k in state)
    compare(hidream, tmp_path, caplog, state)


@pytest.mark.parametrize("prefix", ["", "base_model.model.", "lora_transformer_"])
def test_names_core_does_not_map(hidream, twin, tmp_path, caplog, prefix):
    """Bare names, raw PEFT `base_model.model.` and `lora_transformer_` (kohya-style `_`): core maps none on
    HiDream; the truth is core on the same tensors under `transformer.` / `lora_unet_`."""
    model, _ = hidream
    peft = hw.diffusers_peft(twin, seed=9)
    if prefix == "lora_transformer_":
        core_state = hw.kohya_generic(model, seed=10)
        state = {k.replace("lora_unet_", "lora_transformer_", 1): v for k, v in core_state.items()}
    else:
        state, core_state = f2.renamed(peft, "transformer.", prefix), peft
    assert core_drops(model, None, state)
    compare(hidream, tmp_path, caplog, state, core_state=core_state)


def test_four_text_encoders(hidream, tmp_path, caplog):
    """CLIP-L, CLIP-G, T5 (kohya-style `lora_te1_/2_/3_`) and Llama (generic names) equal core with the full
    HiDream CLIP; on a CLIP without Llama the Llama part is not applied, with the reason."""
    model, clip = hidream
    te = hw.text_encoders(clip, seed=11)
    state = {**hw.kohya_generic(model, seed=12), **te}
    reports = compare(hidream, tmp_path, caplog, state, with_clip=True)
    applied = next(line for line in reports[0].splitlines() if "applied modules:" in line)
    assert all(f"{c} " in applied for c in ("te1", "te2", "te3", "te4", "transformer")), applied
    llama = len({k.rsplit(".", 2)[0] for k in te if k.startswith("text_encoders.llama.") and k.endswith(".weight")})
    no_llama = th.comfy_clip_hidream(llama=False)
    lw.save_safetensors(state, tmp_path / "te.safetensors")
    with loras_folder(tmp_path):
        _, _, report = node_module("loader").LoRACoreLoader().load(model, "te.safetensors", 1.0, 1.0, clip=no_llama)
    assert f"not applied: te4 {llama} (the CLIP has no Llama-3.1-8B)" in report and "unmatched" not in report, report


# ------------------------------------------------------------------------------------- fit and mismatch

def test_loras_for_other_families_and_sizes_are_refused_naming_both(hidream, tmp_path):
    model, _ = hidream
    flux1, flux2, sd3 = tm.comfy_flux(), tf.comfy_flux2(), ts.comfy_sd3()
    files = {
        "hidream": hw.kohya_generic(model, seed=20),
        "flux1": dw.kohya_flux(flux1, seed=21),
        "flux2": f2.musubi(flux2, seed=22),
        "hidream_deep": hw.kohya_generic(th.comfy_hidream(depth=3, depth_single=2), seed=23),
        "hidream_experts": hw.kohya_generic(th.comfy_hidream(experts=6), seed=24),
    }
    for name, state in files.items():
        lw.save_safetensors(state, tmp_path / f"{name}.safetensors")
    loader = node_module("loader").LoRACoreLoaderModelOnly()

    def refused(on, name, *words):
        with pytest.raises(LoraMatchError) as caught:
            loader.load(on, f"{name}.safetensors", 1.0)
        text = str(caught.value)
        assert all(w in text for w in words), text

    with loras_folder(tmp_path):
        refused(model, "flux1", "Flux.1", "HiDream-I1")
        refused(model, "flux2", "Flux", "HiDream-I1")
        for other, title in ((flux1, "Flux.1 [dev]"), (flux2, "Flux.2 [dev]"), (sd3, "Stable Diffusion 3 Medium")):
            refused(other, "hidream", "made for HiDream-I1", title)
        _, deep = loader.load(model, "hidream_deep.safetensors", 1.0)
        _, experts = loader.load(model, "hidream_experts.safetensors", 1.0)
    assert "key for double stream block 2, but this HiDream-I1 model has 2 double stream blocks" in deep
    assert "key for routed expert 5, but this HiDream-I1 model has 4 experts" in experts


# ------------------------------------------------------------------------------------- blocks

def test_blocks_named_syntax_with_moe_kinds(hidream, tmp_path):
    """Layout as data; `DS00.expert=0` zeroes block 0's routed experts only (shared expert, router, attention
    kept), `SS*.router=0` every single block's gate, `TE*` and A1111 refused with the pointer."""
    assert HIDREAM_I1.blocks == (("TE1", "TE2", "TE3", "TE4", "IN") + tuple(f"DS{i:02d}" for i in range(16))
                                 + tuple(f"SS{i:02d}" for i in range(32)) + ("OUT",))
    assert HIDREAM_I1.layout.element_groups["moe"] == {"shared_expert", "expert", "router"}
    with pytest.raises(LoraValueError, match="no positional layout for hidream: use named syntax"):
        blocks.resolve_vector("hidream", "a1111", ",".join(["1"] * 17))
    model, _ = hidream
    state = hw.kohya_generic(model, seed=30)
    gen = torch.Generator().manual_seed(30)   # the routers are bare weights: full diffs on them
    state.update({k[:-len(".weight")] + ".diff": 0.01 * torch.randn(v.shape, generator=gen)
                  for k, v in model.model.state_dict().items() if k.endswith("ff_i.gate.weight")})
    base = model.model.state_dict()
    bw = node_module("block_weight").LoRACoreBlockWeight()
    lw.save_safetensors(state, tmp_path / "b.safetensors")
    with loras_folder(tmp_path):
        got = bake(bw.load(model, "b.safetensors", 1.0, 0.0, "named", "custom", "DS00.expert=0, SS*.router=0", 0,
                           1.0, 1.0, False)[0])
        whole = bake(bw.load(model, "b.safetensors", 1.0, 0.0, "named", "custom", "", 0, 1.0, 1.0, False)[0])
    p = "diffusion_model."
    assert not any(k.startswith(p + "double_stream_blocks.0.block.ff_i.experts.") for k in got)
    assert any(k.startswith(p + "double_stream_blocks.1.block.ff_i.experts.") for k in got)
    assert not any(k.endswith("ff_i.gate.weight") and "single_stream" in k for k in got)
    assert any(k.endswith("ff_i.gate.weight") and "single_stream" in k for k in whole)
    for key in (p + "double_stream_blocks.0.block.ff_i.shared_experts.w1.weight",
                p + "double_stream_blocks.0.block.ff_i.gate.weight", p + "double_stream_blocks.0.block.attn1.to_q.weight"):
        torch.testing.assert_close(got[key] - base[key], whole[key] - base[key])


def test_inspire_mode_is_base_only_like_inspire(hidream, tmp_path):
    model, clip = hidream
    state = {**hw.comfy_native(model, seed=31), **hw.text_encoders(clip, seed=32)}
    lw.save_safetensors(state, tmp_path / "insp.safetensors")
    base = {k: v.clone() for k, v in model.model.state_dict().items()}
    base_clip = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    vector = ",".join(["0.6"] + ["0"] * 11)
    with loras_folder(tmp_path):
        ours, ours_clip, table = node_module("block_weight").LoRACoreBlockWeight().load(
            model, "insp.safetensors", 0.8, 0.7, "inspire", "custom", vector, 0, 1.0, 1.0, False, clip=clip)
    ref, ref_clip = inspire_reference(model, clip, state, 0.8, 0.7, vector)
    assert_same(bake(ours), bake(ref), base, "inspire")
    assert_same(bake(ours_clip.patcher), bake(ref_clip.patcher), base_clip, "inspire CLIP")
    assert "no block layout" in table


# ------------------------------------------------------------------------------------- merge, standalone

def test_merged_block_weighted_lora_loads_to_its_weights(hidream, tmp_path):
    model, clip = hidream
    a = {**hw.kohya_generic(model, seed=33), **hw.text_encoders(clip, seed=34)}
    lw.save_safetensors(a, tmp_path / "a.safetensors")
    bw, mix = node_module("block_weight"), node_module("mix")
    rows = block_stack_rows(enabled_1=True, lora_1="a.safetensors", strength_model_1=0.9, strength_clip_1=0.6,
                vector_1="DS00=0.5, SS01.expert=0, TE4=0.3")
    with loras_folder(tmp_path):
        stack = bw.LoRACoreBlockStack().build(0, 1.0, 1.0, False, **rows)[0]
        stacked, stacked_clip, _ = bw.LoRACoreApplyBlockStack().apply(model, stack, clip=clip)
        path, _ = mix.LoRACoreMergeSave().merge("exact", 0, 0.0, "hidream_merge", False, "auto", "fp32",
                                                block_stack=stack, model=model, clip=clip)["result"]
        merged = comfy.utils.load_torch_file(path, safe_load=True)
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            meta = handle.metadata()
    assert meta["ss_base_model_version"] == "hidream_i1" and meta["modelspec.architecture"] == "hidream-i1/lora"
    assert any(k.startswith("text_encoders.llama.") for k in merged) and any(k.startswith("lora_te3_") for k in merged)
    core_model, core_clip = comfy.sd.load_lora_for_models(model, clip, merged, 1.0, 1.0)
    base = {k: v.clone() for k, v in model.model.state_dict().items()}
    base_clip = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    assert_same(bake(core_model), bake(stacked), base, "merged file in core's loader")
    assert_same(bake(core_clip.patcher), bake(stacked_clip.patcher), base_clip, "merged CLIP in core's loader")


@pytest.mark.parametrize("scale", [1.0, -0.6])
def test_lora_patcher_on_hidream_transformer_equals_diffusers(twin, tmp_path, scale):
    state = hw.diffusers_peft(twin, seed=40)
    path = str(lw.save_safetensors(state, tmp_path / "peft.safetensors"))
    reference = diffusers_fuse_reference(HiDreamImageLoraLoaderMixin, path, twin, scale)
    ours = copy.deepcopy(twin)
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    patcher = LoraPatcher(transformer=ours)
    plan = patcher.apply([LoraRequest(read_lora_file(path), scale, 0.0)])
    assert not plan.reports[0].unmatched and not plan.reports[0].unused_keys, plan.text()
    after = ours.state_dict()
    changed = 0
    for key in reference:
        delta = (reference[key] - base[key]).abs().max().item()
        error = (after[key] - reference[key]).abs().max().item()
        assert error <= 1e-5 * delta + 2 * EPS * reference[key].abs().max().item(), key
        changed += delta > 0
    assert changed == len([k for k in state if k.endswith("lora_A.weight")])
    patcher.restore()
    assert all(torch.equal(v, base[k]) for k, v in ours.state_dict().items())


def test_training_takes_the_familys_spec(hidream):
    """HiDream trains (tests/test_train_hidream.py): the train node takes the family's TrainSpec, its default the
    stream blocks' attention and MoE feed-forward."""
    arch, spec = node_module("train").model_train_spec(hidream[0])
    assert arch.name == "HiDream-I1" and spec.target_sets["attn+ff+proj"] == ("attn", "mlp")
    assert spec.kind_of("expert") == spec.kind_of("shared_expert") == "mlp" and spec.kind_of("router") is None
