"""The Wan 2.2 pair loader (`LoRACoreWanPairLoader`, nodes/wan.py; decisions in lora_core.pairs) in the real host:
two tiny ComfyUI Wan experts (same structure, different weights, as Wan 2.2 A14B's high- and low-noise models);
its outputs equal applying each file with our loader to the right expert, whichever way the pair is told apart
(musubi's `modelspec.timestep_range`, ai-toolkit's `_high_noise` / `_low_noise` names, `HIGH` / `LOW`, the
partner found by name, the assign override, one file on both), and it refuses with both names when nothing tells.
"""
from __future__ import annotations

import pytest

from tests.comfy_host import import_comfy
from tests.pack import loras_folder, node_module
from tests import lora_writers as lw
from tests import tiny_wan as tw
from tests import wan_writers as ww
from tests.test_flux import assert_same, bake

import_comfy()

from lora_core import pairs  # noqa: E402
from lora_core.errors import LoraValueError  # noqa: E402


@pytest.fixture(scope="module")
def experts():
    clip = tw.comfy_clip_wan()
    return tw.comfy_wan("t2v", seed=1), tw.comfy_wan("t2v", seed=2), clip


def _files(tmp_path, model, named: dict) -> dict:
    """name -> (state, metadata) saved in tmp_path; each state a distinct musubi file (different seeds)."""
    out = {}
    for i, (name, meta) in enumerate(named.items()):
        state = ww.musubi(model, seed=100 + i)
        lw.save_safetensors(state, tmp_path / name, {**ww.MUSUBI_METADATA, **(meta or {})})
        out[name] = state
    return out


def _reference(model, name, strength, tmp_path):
    with loras_folder(tmp_path):
        patched, _ = node_module("loader").LoRACoreLoaderModelOnly().load(model, name, strength)
    return patched


def _run(experts, tmp_path, lora_1, lora_2="None", assign=pairs.ASSIGN_AUTO, vector="", clip=None,
         strengths=(0.8, -0.6, 1.0), vector_low=""):
    high_model, low_model, _ = experts
    with loras_folder(tmp_path):
        return node_module("wan").LoRACoreWanPairLoader().load(high_model, low_model, lora_1, lora_2, *strengths,
                                                               assign, clip=clip, block_vector=vector,
                                                               block_vector_low=vector_low)


def _check(experts, tmp_path, out, high_name, low_name, strengths=(0.8, -0.6)):
    high_model, low_model, _ = experts
    high, low, _, report = out
    base_high = {k: v.clone() for k, v in high_model.model.state_dict().items()}
    base_low = {k: v.clone() for k, v in low_model.model.state_dict().items()}
    assert_same(bake(high), bake(_reference(high_model, high_name, strengths[0], tmp_path)), base_high, "high")
    assert_same(bake(low), bake(_reference(low_model, low_name, strengths[1], tmp_path)), base_low, "low")
    assert f"high noise <- {high_name}, low noise <- {low_name}" in report
    return report


def test_musubi_timestep_ranges_decide(experts, tmp_path):
    """musubi's ranges ("875,1000" high, "0,875" low; docs/wan.md) decide, whatever the names or the order."""
    model = experts[0]
    _files(tmp_path, model, {"style_a.safetensors": {"modelspec.timestep_range": "0,875"},
                             "style_b.safetensors": {"modelspec.timestep_range": "875,1000"}})
    report = _check(experts, tmp_path, _run(experts, tmp_path, "style_a.safetensors", "style_b.safetensors"),
                    "style_b.safetensors", "style_a.safetensors")
    assert "modelspec.timestep_range 875,1000" in report
    # metadata wins over a misleading name
    _files(tmp_path, model, {"x_high_noise.safetensors": {"modelspec.timestep_range": "0,900"},
                             "x_low_noise.safetensors": {"modelspec.timestep_range": "900,1000"}})
    _check(experts, tmp_path, _run(experts, tmp_path, "x_high_noise.safetensors", "x_low_noise.safetensors"),
           "x_low_noise.safetensors", "x_high_noise.safetensors")


@pytest.mark.parametrize("high,low", [("mylora_high_noise.safetensors", "mylora_low_noise.safetensors"),
                                      ("Wan22_HIGH_v1.safetensors", "Wan22_LOW_v1.safetensors")])
def test_names_decide_and_the_partner_is_found(experts, tmp_path, high, low):
    """ai-toolkit's `_high_noise` / `_low_noise` (split_multistage_loras) and HIGH / LOW names; with lora_2 None the
    partner is the name with high / low swapped; given from either side."""
    model = experts[0]
    _files(tmp_path, model, {high: None, low: None})
    _check(experts, tmp_path, _run(experts, tmp_path, low), high, low)
    _check(experts, tmp_path, _run(experts, tmp_path, high, low), high, low)
    _check(experts, tmp_path, _run(experts, tmp_path, low, high), high, low)


def test_undecidable_pair_names_both_files_and_assign_overrides(experts, tmp_path):
    model = experts[0]
    _files(tmp_path, model, {"one.safetensors": None, "two.safetensors": None})
    with pytest.raises(LoraValueError) as caught:
        _run(experts, tmp_path, "one.safetensors", "two.safetensors")
    text = str(caught.value)
    assert "'one.safetensors'" in text and "'two.safetensors'" in text and pairs.ASSIGN_FIRST_HIGH in text
    _check(experts, tmp_path, _run(experts, tmp_path, "one.safetensors", "two.safetensors",
                                   assign=pairs.ASSIGN_FIRST_HIGH), "one.safetensors", "two.safetensors")
    _check(experts, tmp_path, _run(experts, tmp_path, "one.safetensors", "two.safetensors",
                                   assign=pairs.ASSIGN_FIRST_LOW), "two.safetensors", "one.safetensors")
    with pytest.raises(LoraValueError, match="no partner file"):   # one file, no partner, no range
        _run(experts, tmp_path, "one.safetensors")
    _files(tmp_path, model, {"same_high.safetensors": None, "other_high.safetensors": None})
    with pytest.raises(LoraValueError, match="'same_high.safetensors'.*'other_high.safetensors'"):
        _run(experts, tmp_path, "same_high.safetensors", "other_high.safetensors")


def test_one_lora_on_both_experts(experts, tmp_path):
    """musubi trains one LoRA on both experts at once (--dit + --dit_high_noise): a range covering both ("0,1000")
    applies it to both; so does the assign choice for any file."""
    model = experts[0]
    _files(tmp_path, model, {"both.safetensors": {"modelspec.timestep_range": "0,1000"}, "plain.safetensors": None})
    report = _check(experts, tmp_path, _run(experts, tmp_path, "both.safetensors"), "both.safetensors",
                    "both.safetensors")
    assert "both experts" in report
    _check(experts, tmp_path, _run(experts, tmp_path, "plain.safetensors", assign=pairs.ASSIGN_SAME),
           "plain.safetensors", "plain.safetensors")


def test_block_vector_and_clip(experts, tmp_path):
    """The named block vector applies to both experts as the block-weight loader applies it; the CLIP gets each
    file's UMT5 part (as two chained loaders give it)."""
    high_model, low_model, clip = experts
    names = {"v_high_noise.safetensors": ww.text_encoder(clip, seed=7),
             "v_low_noise.safetensors": ww.text_encoder(clip, seed=8)}
    for i, (name, te) in enumerate(names.items()):
        lw.save_safetensors({**ww.musubi(high_model, seed=10 + i), **te}, tmp_path / name, ww.MUSUBI_METADATA)
    vector = "B00=0.5, B01.cross_attn=0"
    high, low, clip_out, _ = _run(experts, tmp_path, "v_high_noise.safetensors", vector=vector, clip=clip,
                                  strengths=(1.0, 0.7, 0.9))
    bw = node_module("block_weight").LoRACoreBlockWeight()
    with loras_folder(tmp_path):
        ref_high, ref_clip, _ = bw.load(high_model, "v_high_noise.safetensors", 1.0, 0.9, "named", "custom", vector,
                                        0, 1.0, 1.0, False, clip=clip)
        ref_low, ref_clip, _ = bw.load(low_model, "v_low_noise.safetensors", 0.7, 0.9, "named", "custom", vector,
                                       0, 1.0, 1.0, False, clip=ref_clip)
    base = lambda m: {k: v.clone() for k, v in m.state_dict().items()}  # noqa: E731
    assert_same(bake(high), bake(ref_high), base(high_model.model), "high")
    assert_same(bake(low), bake(ref_low), base(low_model.model), "low")
    assert_same(bake(clip_out.patcher), bake(ref_clip.patcher), base(clip.cond_stage_model), "clip")
    assert not any(".blocks.1.cross_attn." in k for k in high.patches)


def test_separate_block_vector_for_the_low_noise_expert(experts, tmp_path):
    """block_vector_low scales the low-noise expert on its own (block_vector then holds for the high-noise one
    only), each equal to the block-weight loader with that expert's vector."""
    high_model, low_model, _ = experts
    for i, name in enumerate(("s_high_noise.safetensors", "s_low_noise.safetensors")):
        lw.save_safetensors(ww.musubi(high_model, seed=20 + i), tmp_path / name, ww.MUSUBI_METADATA)
    vector, vector_low = "B00=0, B01=0.5", "B01.self_attn=0, B00=0.25"
    high, low, _, _ = _run(experts, tmp_path, "s_high_noise.safetensors", vector=vector, vector_low=vector_low,
                           strengths=(1.0, 0.7, 1.0))
    block = node_module("block_weight").LoRACoreBlockWeight()
    with loras_folder(tmp_path):
        ref_high, _, _ = block.load(high_model, "s_high_noise.safetensors", 1.0, 0.0, "named", "custom", vector,
                                    0, 1.0, 1.0, False)
        ref_low, _, _ = block.load(low_model, "s_low_noise.safetensors", 0.7, 0.0, "named", "custom", vector_low,
                                   0, 1.0, 1.0, False)
    base = lambda m: {k: v.clone() for k, v in m.state_dict().items()}  # noqa: E731
    assert_same(bake(high), bake(ref_high), base(high_model.model), "high")
    assert_same(bake(low), bake(ref_low), base(low_model.model), "low")
    assert not any(".blocks.0." in k for k in high.patches)          # B00=0 on the high expert only
    assert any(".blocks.0." in k for k in low.patches)
    assert not any(".blocks.1.self_attn." in k for k in low.patches)  # and B01.self_attn=0 on the low one only
    assert any(".blocks.1.self_attn." in k for k in high.patches)


def test_decisions_as_data():
    assert pairs.expert_of_metadata({"modelspec.timestep_range": "900,1000"}) == pairs.HIGH
    assert pairs.expert_of_metadata({"modelspec.timestep_range": "0.0,0.875"}) == pairs.LOW
    assert pairs.expert_of_metadata({"modelspec.timestep_range": "0,1000"}) == pairs.BOTH
    assert pairs.expert_of_metadata({}) is None
    assert pairs.expert_of_name("HighNoise-v2.safetensors") == pairs.HIGH
    assert pairs.expert_of_name("highlight.safetensors") is None
    assert pairs.expert_of_name("high_to_low.safetensors") is None
    assert pairs.partner_name("sub/x_High_noise.safetensors", ["sub/x_Low_noise.safetensors"]) == \
        "sub/x_Low_noise.safetensors"
    assert pairs.partner_name("x.safetensors", ["x_low.safetensors"]) is None
