"""lora_core.blocks: A1111 / Inspire / named vectors, presets, diffusers dicts, user presets, errors.

Expected values come from the reference note (docs of the A1111 extension and Inspire Pack, read from their
sources) and from small independent re-implementations written here, never from the code under test.
"""
import json
import os
import random

import numpy as np
import pytest

from lora_core import blocks
from lora_core.arch import SD1, SDXL, unet_modules
from lora_core.errors import LoraValueError

SD26 = ["BASE", "IN00", "IN01", "IN02", "IN03", "IN04", "IN05", "IN06", "IN07", "IN08", "IN09", "IN10", "IN11",
        "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10",
        "OUT11"]
SD17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07",
        "OUT08", "OUT09", "OUT10", "OUT11"]
XL20 = ["BASE", "IN00", "IN01", "IN02", "IN03", "IN04", "IN05", "IN06", "IN07", "IN08", "M00", "OUT00", "OUT01",
        "OUT02", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08"]
XL12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"]

# A LoRA (attention only) and a LoCon (every block but conv_in) as lists of LDM module paths, from the arch layer.
SD_MODULES = unet_modules(SD1.unet)
XL_MODULES = unet_modules(SDXL.unet)
ATTN_KINDS = ("attn1", "attn2", "ff", "proj")


def paths(modules, locon):
    return [m for m in modules if (m.kind in ATTN_KINDS) or (locon and m.block not in ("OTHER", "IN00"))]


def targets(modules):
    return [(m.block, m.ldm) for m in modules]


# ------------------------------------------------------------------------------------------- layouts

def test_layouts_match_the_extension_lists():
    assert blocks.A1111_LAYOUTS["sd1"] == {26: SD26, 17: SD17}
    assert blocks.A1111_LAYOUTS["sd2"] == {26: SD26, 17: SD17}
    assert blocks.A1111_LAYOUTS["sdxl"] == {20: XL20, 12: XL12}
    assert blocks.BLOCK_IDS["sd1"] == ["TE1"] + SD26[1:] + ["OTHER"]
    assert blocks.BLOCK_IDS["sdxl"] == ["TE1", "TE2"] + XL20[1:] + ["OTHER"]
    # Inspire's standard positions: 17/12 equal A1111's; 27/21 drop IN00 and split the middle block in 3.
    assert blocks.INSPIRE_LAYOUTS["sd1"][17] == SD17
    assert blocks.INSPIRE_LAYOUTS["sdxl"][12] == XL12
    assert blocks.INSPIRE_LAYOUTS["sd1"][27] == (["BASE"] + SD26[2:13] + ["M00.0", "M00.1", "M00.2"] + SD26[14:])
    assert blocks.INSPIRE_LAYOUTS["sdxl"][21] == (["BASE"] + XL20[2:10] + ["M00.0", "M00.1", "M00.2"] + XL20[11:])
    assert len(blocks.INSPIRE_LAYOUTS["sd1"][27]) == 27 and len(blocks.INSPIRE_LAYOUTS["sdxl"][21]) == 21


def test_arch_accepts_aliases_and_archspec():
    assert blocks.resolve_vector("SD15", "a1111", "ALL").arch == "sd1"
    assert blocks.resolve_vector(SDXL, "named", "*=1").arch == "sdxl"
    assert blocks.resolve_vector("pony", "named", "*=1").arch == "sdxl"


# --------------------------------------------------------------------------------------------- presets

A1111_PRESETS = {  # the extension's DEF_WEIGHT_PRESET (reference note §3.1)
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0", "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0", "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0", "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0", "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1", "ALL0.5": ",".join(["0.5"] * 17),
}


def test_a1111_presets_verbatim():
    assert blocks.list_presets("a1111", "sd1") == A1111_PRESETS
    # hako-mikan's one Flux preset (61 values: CLIP, T5, IN, D00-D18, S00-S37, OUT) is listed for Flux only
    assert blocks.list_presets("a1111", "flux") == {"FLUXALL": ",".join(["1"] * 61)}
    assert blocks.list_presets("a1111") == {**A1111_PRESETS, "FLUXALL": ",".join(["1"] * 61)}
    assert blocks.list_presets("a1111", "sdxl") == {}  # all are 17-value SD vectors
    assert blocks.list_element_presets() == {"ATTNDEEPON": "IN05-OUT05:attn:1", "ATTNDEEPOFF": "IN05-OUT05:attn:0",
                                             "PROJDEEPOFF": "IN05-OUT05:proj:0", "XYZ": "::1"}


@pytest.mark.parametrize("name,on", [("INS", {"IN01", "IN02", "IN04"}), ("IND", {"IN05", "IN07", "IN08"}),
                                     ("MIDD", {"IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06"}),
                                     ("OUTS", {"OUT07", "OUT08", "OUT09", "OUT10", "OUT11"})])
def test_a1111_presets_decode_to_blocks(name, on):
    w = blocks.resolve_vector("sd1", "a1111", name)
    unet_on = {b for b, f in w.factors.items() if f == 1 and b not in ("TE1", "OTHER")}
    assert unet_on == on and w.factors["TE1"] == 1


def test_inspire_presets_verbatim_and_listed_per_arch():
    sd, xl = blocks.list_presets("inspire", "sd1"), blocks.list_presets("inspire", "sdxl")
    assert sd["SD-ROUT"] == "1,1,1,1,1,1,1,1,R,R,R,R,R,R,R,R,R"
    assert sd["SD-LyC-MIDALL"] == ",".join(["1"] + ["0"] * 11 + ["1"] * 3 + ["0"] * 12)
    assert sd["SD-KEEPBG"] == "1,1,1,1,1,1,0.2,1,0.2,0,0,0.8,1,1,1,0,0"   # from the custom example file
    assert xl["SDXL-OUTALL"] == "1,0,0,0,0,0,1,1,1,1,1,1"
    assert all(n.startswith("SD-") for n in sd) and all(n.startswith("SDXL-") for n in xl)
    assert not any(n.startswith("@") for n in blocks.list_presets("inspire"))
    flux = blocks.list_presets("inspire", "flux")
    assert flux and all(n.startswith("FLUX-") for n in flux) and flux["FLUX-ALL"] == ",".join(["1"] * 58)
    assert not any(n.startswith("FLUX") for n in {**sd, **xl})
    # the data file is Inspire's, untouched: it keeps its Flux presets and @ XY specs
    text = (blocks.PRESET_DIR / "inspire_lbw-preset.txt").read_text()
    assert "FLUX-ALL:" + ",".join(["1"] * 58) in text and "@SD-FULL-TEST:17" in text


def test_every_preset_resolves():
    count = 0
    for mode in ("a1111", "inspire"):
        for arch in blocks.ARCH_NAMES:
            layouts = blocks.INSPIRE_LAYOUTS[arch]   # none for a family Inspire has no layout for (Qwen-Image)
            full = layouts[max(layouts)][1:] if layouts else []
            for name, vector in blocks.list_presets(mode, arch).items():
                w = blocks.resolve_vector(arch, mode, name, present_blocks=full, seed=3, A=2, B=0.5)
                assert set(w.factors) == set(blocks.BLOCK_IDS[arch])
                first = vector.split(",")[0]
                assert w.factors["TE1"] == (2.0 if first == "A" else float(first))
                count += 1
    assert count > 60


# ----------------------------------------------------------------------------------------------- A1111

def test_a1111_17_zeroes_locon_only_blocks_but_26_does_not():
    w17 = blocks.resolve_vector("sd1", "a1111", "ALL")
    w26 = blocks.resolve_vector("sd1", "a1111", ",".join(["1"] * 26))
    conv_only = {"IN00", "IN03", "IN06", "IN09", "IN10", "IN11", "OUT00", "OUT01", "OUT02"}
    for block in blocks.BLOCK_IDS["sd1"]:
        assert w26.factor(block) == 1
        assert w17.factor(block) == (0 if block in conv_only else 1)
    assert w17.factor("OTHER") == 1  # time_embed/out: A1111 never touches them
    assert "get 0" in w17.table()


def test_a1111_positions_by_id_and_base_is_text_encoders_only():
    values = [f"{i / 100:g}" for i in range(26)]
    w = blocks.resolve_vector("sd2", "a1111", ",".join(values))
    for i, block in enumerate(SD26[1:], 1):
        assert w.factor(block) == pytest.approx(i / 100)
    assert w.factor("TE1") == 0 and w.factor("OTHER") == 1
    xl = blocks.resolve_vector("sdxl", "a1111", ",".join(str(i) for i in range(12)))
    for i, block in enumerate(XL12):
        for target in (("TE1", "TE2") if block == "BASE" else (block,)):
            assert xl.factor(target) == i
    assert xl.factor("IN00") == 0 and xl.factor("OUT06") == 0 and xl.factor("OTHER") == 1


def test_a1111_letters_seeded_like_random_module():
    vector = "1,R,U,X,X+0.5,X-1,R,U,1,1,1,1,1,1,1,1,R"
    w = blocks.resolve_vector("sd1", "a1111", vector, seed=99, A=0.25)
    rng = random.Random(99)  # independent: the extension draws round(random(),3) / round(uniform(-.5,1.5),3)
    expected = {"IN01": round(rng.random(), 3), "IN02": round(rng.uniform(-0.5, 1.5), 3), "IN04": 0.25,
                "IN05": 0.75, "IN07": -0.75, "IN08": round(rng.random(), 3), "M00": round(rng.uniform(-0.5, 1.5), 3)}
    expected["OUT11"] = round(rng.random(), 3)
    for block, value in expected.items():
        assert w.factor(block) == pytest.approx(value)
    assert blocks.resolve_vector("sd1", "a1111", vector, seed=99, A=0.25).factors == w.factors
    assert blocks.resolve_vector("sd1", "a1111", vector, seed=98, A=0.25).factors != w.factors


def test_a1111_inverse_and_negative_and_colon_line():
    w = blocks.resolve_vector("sd1", "a1111", "MINE:-1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,2", inverse=True)
    assert w.factor("TE1") == 2 and w.factor("IN01") == 1 and w.factor("OUT11") == -1
    assert w.factor("OTHER") == 1


def test_a1111_element_override_lbwe_preset():
    w = blocks.resolve_vector("sd1", "a1111", "ALL", element="ATTNDEEPOFF")
    # IN05..OUT05 (layout order, across M00): attention -> 0, everything else keeps its block factor
    assert w.factor("IN05", "attn1") == 0 and w.factor("M00", "attn2") == 0 and w.factor("OUT05", "attn1") == 0
    assert w.factor("IN05", "ff") == 1 and w.factor("IN04", "attn1") == 1 and w.factor("OUT06", "attn2") == 1
    w = blocks.resolve_vector("sd1", "a1111", "ALL", element="NOT IN01 IN02:NOT ff:0.5\nBASE:attn:2")
    assert w.factor("IN01", "attn1") == 1 and w.factor("IN04", "attn1") == 0.5 and w.factor("IN04", "ff") == 1
    # NOT IN01 IN02 includes TE1 and OTHER; the later BASE directive overrides TE1's attention again
    assert w.factor("TE1", "te_attn") == 2 and w.factor("TE1", "te_mlp") == 0.5
    assert w.factor("OTHER", "time_embed") == 0.5 and w.factor("IN02", "ff") == 1
    w = blocks.resolve_vector("sd1", "a1111", "NONE", element="XYZ")
    assert all(w.factor(b) == 1 for b in blocks.BLOCK_IDS["sd1"])


# --------------------------------------------------------------------------------------------- Inspire

def inspire_reference(slot_numbers, vector, seed, A, B, inverse):
    """Independent re-implementation of Inspire's load_lbw for one key per slot: returns (slot factors, base,
    populated list). Numpy's legacy global-style generator, seeded seed % 2**31; entries converted (and random
    values drawn) only when a new block number starts and the vector still has entries; BASE converted last."""
    rs = np.random.RandomState(seed % 2 ** 31)

    def value(token):
        if token in "Uu":
            return round(rs.uniform(-1.5, 1.5), 2)
        if token in "Rr":
            return round(rs.uniform(0, 3.0), 2)
        return {"A": A, "a": A / 2, "B": B, "b": B / 2}.get(token, None) if token in "AaBb" else float(token)

    entries = [e.strip() for e in vector.split(",")]
    out, populated, current, used, previous = [], [], 1.0, 1, object()
    for number in slot_numbers:
        if number != previous and used < len(entries):
            current = value(entries[used])
            used += 1
            populated.append(1 - current if inverse else current)
        previous = number
        out.append(1 - current if inverse else current)
    base = value(entries[0])
    base = 1 - base if inverse else base
    return out, base, [base] + populated


def slot_numbers(slot_ids):
    return [int(s[-1]) if s.startswith("M00.") else 1 if s == "M00" else int(s.lstrip("INOUT")) for s in slot_ids]


@pytest.mark.parametrize("seed", [0, 7, 123456789, 2 ** 40 + 5])
@pytest.mark.parametrize("inverse", [False, True])
def test_inspire_seeded_letters_reproduce_inspire_draws(seed, inverse):
    layout = blocks.INSPIRE_LAYOUTS["sd1"][27][1:]
    vector = "R,U,r,u,A,a,B,b,R,U,1,0.5,-2,R,U,R,U,R,U,R,U,R,U,R,U,R,u"
    w = blocks.resolve_vector("sd1", "inspire", vector, present_blocks=layout, seed=seed, A=4.0, B=-1.0,
                              inverse=inverse)
    expected, base, populated = inspire_reference(slot_numbers(layout), vector, seed, 4.0, -1.0, inverse)
    for slot, value in zip(layout, expected):
        if slot.startswith("M00."):
            assert w.factor("M00", None, f"middle_block.{slot[-1]}.in_layers.2") == pytest.approx(value)
        else:
            assert w.factor(slot) == pytest.approx(value)
    assert w.factor("TE1") == pytest.approx(base) and w.factor("OTHER") == pytest.approx(base)
    assert [float(x) for x in w.populated_vector.split(",")] == pytest.approx(populated)
    for token_range, lo, hi in (("R", 0, 3), ("U", -1.5, 1.5)):
        v = blocks.resolve_vector("sd1", "inspire", ",".join([token_range] * 17), seed=seed).factor("OUT11")
        assert lo <= v <= hi and round(v, 2) == v


def test_inspire_trailing_value_carries_on():
    # 12 values for a full SD LoCon (26 slots): the 11th UNet entry (0.25) carries to every later block
    present = blocks.INSPIRE_LAYOUTS["sd1"][27][1:]
    w = blocks.resolve_vector("sd1", "inspire", "1,0,0,0,0,0,0,0,0,0,0,0.25", present_blocks=present)
    assert w.factor("IN10") == 0 and w.factor("IN11") == 0.25
    assert all(w.factor(b) == 0.25 for b in blocks.BLOCK_IDS["sd1"] if b.startswith("OUT"))
    assert w.factor("M00", "attn1") == 0.25 and "carry the last value" in w.table()
    # Inspire's 17-value SD-OUTALL on a LoCon lands on the wrong blocks (ordinal, not by id)
    w = blocks.resolve_vector("sd1", "inspire", "SD-OUTALL", present_blocks=present)
    assert w.factor("IN08") == 1 and w.factor("IN07") == 0 and w.factor("OUT11") == 1


def test_inspire_lora_missing_blocks_shifts_positions():
    present = {"TE1", "IN04", "IN05", "M00", "OUT03", "OUT04", "OUT05", "OUT09"}
    vector = "0.5,1,2,3,4,5,6,7,8,9,10,11"
    w = blocks.resolve_vector("sd1", "inspire", vector, present_blocks=present)
    assert [w.factor(b) for b in ("IN04", "IN05", "M00", "OUT03", "OUT04", "OUT05", "OUT09")] == [1, 2, 3, 4, 5, 6, 7]
    assert w.factor("TE1") == 0.5 and w.factor("OTHER") == 0.5  # BASE covers non-block keys in Inspire
    assert "IN01" in w.absent and "-" in w.table().splitlines()[2]
    assert "4 trailing value(s) ignored" in " ".join(w.notes)


def test_inspire_equal_numbers_across_groups_share_one_entry():
    # input_blocks.1 then middle_block.1: Inspire compares only the number, so both take one entry
    present = {"IN01": ["input_blocks.1.1.proj_in"], "M00": ["middle_block.1.proj_in"], "OUT03": ["output_blocks.3.1.proj_in"]}
    w = blocks.resolve_vector("sd1", "inspire", "1,0.2,0.3,0,0,0,0,0,0,0,0,0", present_blocks=present)
    assert w.factor("IN01") == 0.2 and w.factor("M00", "proj") == 0.2 and w.factor("OUT03") == 0.3


def test_inspire_middle_parts_and_paths():
    present = blocks.inspire_present_blocks(targets(paths(SD_MODULES, locon=True)))
    assert [k for k in present if k.startswith("M00")] == ["M00.0", "M00.1", "M00.2"]
    vector = "1," + ",".join(["0"] * 11) + ",0.1,0.2,0.3," + ",".join(["0"] * 12)
    w = blocks.resolve_vector("sd1", "inspire", vector, present_blocks=present)
    assert w.factor("M00", None, "middle_block.0.in_layers.2") == 0.1
    assert w.factor("M00", "attn2") == 0.2 and w.factor("M00", "attn2", "middle_block.1.transformer_blocks.0.attn2.to_k") == 0.2
    assert w.factor("M00", None, "middle_block.2.out_layers.3") == 0.3
    with pytest.raises(LoraValueError, match="middle_block.0=0.1.*pass the module path"):
        w.factor("M00", "resnet_conv")
    assert "middle_block.0=0.1" in w.table()


def test_inspire_sub_vectors_follow_key_order():
    present = blocks.inspire_present_blocks(targets(paths(SD_MODULES, locon=False)))
    in01 = present["IN01"]
    w = blocks.resolve_vector("sd1", "inspire", "1,0 0.5 2,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1", present_blocks=present)
    assert [w.factor("IN01", None, p) for p in in01[:4]] == [0, 0.5, 2, 2]  # last sub-value carries on
    assert w.factor("IN02", None, present["IN02"][0]) == 1
    with pytest.raises(LoraValueError, match=r"sub-vector '0 0.5 2' \(position 2\).*inspire_present_blocks"):
        blocks.resolve_vector("sd1", "inspire", "1,0 0.5 2,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1")


def test_inspire_percent_spec():
    present = blocks.INSPIRE_LAYOUTS["sdxl"][21][1:]
    w = blocks.resolve_vector("sdxl", "inspire", "%default=0,in2-3=0.5,mid=1,out9=2,base=0.25",
                              present_blocks=present)
    assert w.factor("IN01") == 0 and w.factor("IN02") == 0.5 and w.factor("IN03") == 0.5 and w.factor("IN04") == 0
    assert w.factor("M00", "resnet_conv") == 1 and w.factor("OUT08") == 2 and w.factor("OUT07") == 0
    assert w.factor("TE2") == 0.25
    with pytest.raises(LoraValueError, match="needs present_blocks"):
        blocks.resolve_vector("sdxl", "inspire", "%default=0")
    with pytest.raises(LoraValueError, match=r"bad token 'in=-1' at position 2"):
        blocks.resolve_vector("sdxl", "inspire", "%default=0,in=-1", present_blocks=present)
    # few blocks: the expanded vector is shorter than Inspire's minimum of 12
    with pytest.raises(LoraValueError, match="length 3 \\(from the % spec"):
        blocks.resolve_vector("sdxl", "inspire", "%default=1", present_blocks={"IN04", "OUT00"})


def test_inspire_preset_name_and_colon_forms():
    w = blocks.resolve_vector("sdxl", "inspire", "SDXL-MIDALL")
    assert w.factor("M00") == 1 and w.factor("IN04") == 0 and w.factor("OUT00") == 0
    w = blocks.resolve_vector("sdxl", "inspire", "MINE:A,b,1,1,1,1,0,0,0,0,0,0", A=3, B=5)
    assert w.factor("TE1") == 3 and w.factor("IN04") == 2.5


# ---------------------------------------------------------------------------------------------- named

def test_named_ranges_wildcards_override_and_default():
    w = blocks.resolve_vector("sdxl", "named", "IN04-IN08=0.5, M00=1, OUT*=0, TE2=0; OUT05=-1\nIN0?=3, IN06=0.25")
    assert w.factor("TE1") == 1 and w.factor("TE2") == 0 and w.factor("OTHER") == 1   # unnamed: 1
    assert w.factor("IN04") == 3 and w.factor("IN06") == 0.25   # IN0? covers IN00..IN08 and overrides
    assert w.factor("OUT00") == 0 and w.factor("OUT05") == -1 and w.factor("M00") == 1
    w = blocks.resolve_vector("sd1", "named", "*=0, OUT02-IN10=2, BASE=0.5")    # reversed range, layout order
    assert [w.factor(b) for b in ("IN09", "IN10", "IN11", "M00", "OUT02", "OUT03")] == [0, 2, 2, 2, 2, 0]
    assert w.factor("TE1") == 0.5


def test_named_elements():
    w = blocks.resolve_vector("sd1", "named", "OUT03.attn2=0, IN*.ff=0.5, IN04=2, *.resnet=0.1, M00.attn=7")
    assert w.factor("OUT03", "attn2") == 0 and w.factor("OUT03", "attn1") == 1 and w.factor("OUT03") == 1
    assert w.factor("IN01", "ff") == 0.5
    assert w.factor("IN04", "ff") == 2 and w.factor("IN04") == 2   # the later block entry wins over IN*.ff
    assert w.factor("OUT07", "resnet_conv") == 0.1 and w.factor("OUT07", "emb") == 0.1
    assert w.factor("OUT07", "norm") == 1
    assert w.factor("M00", "attn1") == 7 and w.factor("M00", "attn2") == 7 and w.factor("M00", "ff") == 1
    assert ".attn2 = 0" in w.table()


def test_named_variables_and_inverse():
    w = blocks.resolve_vector("sd1", "named", "IN01=A, IN02=B, OUT*=R", A=0.3, B=-2, seed=5, inverse=True)
    assert w.factor("IN01") == pytest.approx(0.7) and w.factor("IN02") == 3 and w.factor("M00") == 0
    assert w.factor("OUT00") == pytest.approx(1 - round(random.Random(5).random(), 3))


# -------------------------------------------------------------------------------------------- diffusers

def test_diffusers_dict_sd1():
    w = blocks.parse_diffusers_scales("sd1", {"text_encoder": 0.5, "down": {"block_0": [0.1, 0.2], "block_2": 0.3},
                                              "mid": [0.4], "up": {"block_1": [0.5, 0.6, 0.7], "block_3": 0.8}})
    assert w.factor("TE1") == 0.5 and w.factor("IN01") == 0.1 and w.factor("IN02") == 0.2
    assert w.factor("IN03") == 0.1      # down_blocks.0.downsamplers.0 takes attentions.0's scale
    assert w.factor("IN04") == 1 and w.factor("IN07") == 0.3 and w.factor("IN09") == 0.3
    assert w.factor("IN10") == 1 and w.factor("IN00") == 1 and w.factor("OTHER") == 1
    assert w.factor("M00") == 0.4
    assert [w.factor(f"OUT{i:02d}") for i in range(3, 6)] == [0.5, 0.6, 0.7]
    assert w.factor("OUT05", "upsample") == 0.5 and w.factor("OUT05", "attn1") == 0.7
    assert w.factor("OUT00") == 1 and w.factor("OUT11") == 0.8 and w.factor("OUT11", "upsample") == 0.8


def test_diffusers_dict_sdxl_and_scalars():
    w = blocks.parse_diffusers_scales("sdxl", {"text_encoder_2": 0, "unet": {"down": 0.5, "up": {"block_0": [1, 2, 3]}}})
    assert w.factor("TE1") == 1 and w.factor("TE2") == 0
    assert [w.factor(b) for b in ("IN01", "IN03", "IN04", "IN05", "IN06", "IN07", "IN08")] == [1, 1, .5, .5, .5, .5, .5]
    assert [w.factor(b) for b in ("OUT00", "OUT01", "OUT02", "OUT03", "OUT06")] == [1, 2, 3, 1, 1]
    assert w.factor("OUT02", "upsample") == 1 and w.factor("M00") == 1
    assert all(v == 0.7 for v in blocks.parse_diffusers_scales("sdxl", 0.7).factors.values())
    w = blocks.parse_diffusers_scales("sd1", {"unet": 0.25, "text_encoder": 2})
    assert w.factor("IN05") == 0.25 and w.factor("OTHER") == 0.25 and w.factor("TE1") == 2


@pytest.mark.parametrize("scales,match", [
    ({"down": {"block_0": 1}}, "down.block_0 has no attention on sdxl"),
    ({"up": {"block_1": [1, 1]}}, "up.block_1 takes 3 scales"),
    ({"mid": {"block_0": 1}}, "not a dict"),
    ({"mid": [1, 2]}, "'mid' takes 1 scale"),
    ({"text_encoder_3": 1}, "unknown diffusers scale key 'text_encoder_3'"),
    ({"unet": {"left": 1}}, "unknown diffusers UNet scale key"),
    ({"down": float("nan")}, "not finite"),
])
def test_diffusers_errors(scales, match):
    with pytest.raises(LoraValueError, match=match):
        blocks.parse_diffusers_scales("sdxl", scales)
    with pytest.raises(LoraValueError, match="unknown diffusers scale key 'text_encoder_2' for sd1"):
        blocks.parse_diffusers_scales("sd1", {"text_encoder_2": 1})


# ------------------------------------------------------------------------------------- factor queries

def test_every_arch_module_gets_a_factor():
    for arch, modules in (("sd1", SD_MODULES), ("sdxl", XL_MODULES)):
        present = blocks.inspire_present_blocks(targets(paths(modules, locon=True)))
        full = blocks.resolve_vector(arch, "inspire", ",".join(["0.5"] * 12), present_blocks=present)
        named = blocks.resolve_vector(arch, "named", "OUT*.attn=0")
        for m in modules:
            assert full.factor(m.block, m.kind, m.ldm) == (1 if m.block in ("IN00",) else 0.5)
            assert named.factor(m.block, m.kind) == (0 if m.block.startswith("OUT") and m.kind.startswith("attn") else 1)
    with pytest.raises(LoraValueError, match="unknown block id 'TE2' for sd1"):
        blocks.resolve_vector("sd1", "named", "*=1").factor("TE2")


# ----------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("arch,mode,vector,match", [
    ("sd1", "a1111", "1,1,1", r"wrong A1111 block vector length 3: A1111 vectors on sd1 have 17 or 26 values"),
    ("sdxl", "a1111", ",".join(["1"] * 26), r"26 values, the length of a sd1 vector; this model is sdxl.*12 or 20"),
    ("sd1", "a1111", ",".join(["1"] * 20), r"20 values, the length of a sdxl vector"),
    ("sdxl", "a1111", "FLUXALL", r"61 values, a Flux vector"),
    ("sd1", "a1111", "OUTAL", r"unknown a1111 block-weight preset 'OUTAL' for sd1 \(nearest: OUTALL"),
    ("sd1", "a1111", "all", r"nearest: .*ALL"),
    ("sd1", "a1111", "1,1,1,Q,1,1,1,1,1,1,1,1,1,1,1,1,1", r"bad token 'Q' at position 4 of the a1111"),
    ("sd1", "a1111", "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,", r"bad token '' at position 17"),
    ("sd1", "a1111", "1,nan,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1", r"bad token 'nan' at position 2"),
    ("sd1", "a1111", "1,Xq,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1", r"bad token 'Xq' at position 2"),
    ("sd1", "inspire", "1,1,1,1,1", r"wrong Inspire block vector length 5: Inspire vectors on sd1 have 12 to 28 values, standard 17 or 27"),
    ("sdxl", "inspire", ",".join(["1"] * 58), r"length 58 — a vector for another architecture \(Flux has 58\)"),
    ("sd1", "inspire", "SDXL-ALL", r"Inspire preset 'SDXL-ALL' is for sdxl, not sd1"),
    ("sdxl", "inspire", "FLUX-ALL", r"is for Flux, not sdxl"),
    ("sd1", "inspire", "SD-OUTAL", r"unknown inspire block-weight preset 'SD-OUTAL' for sd1 \(nearest: SD-OUTALL"),
    ("sd1", "inspire", "1,1,.5,1,1,1,1,1,1,1,1,1,1,1,1,1,1", r"bad token '.5' at position 3 of the Inspire"),
    ("sd1", "inspire", ",".join(["1"] * 20), r"pass present_blocks to resolve a 20-value vector"),
    ("sd1", "named", "IN04=0.5, IN12=1", r"unknown block id 'IN12' in entry 2 \('IN12=1'\) for sd1"),
    ("sd1", "named", "TE2=0", r"unknown block id 'TE2'.*\(TE2 exists on sdxl\)"),
    ("sdxl", "named", "IN09-OUT01=1", r"unknown block id 'IN09'.*exists on sd1/sd2"),
    ("sd1", "named", "OUTX*=1", r"pattern 'OUTX\*' \(entry 1, 'OUTX\*=1'\) matches no sd1 block"),
    ("sd1", "named", "IN04.attn3=1", r"unknown element 'attn3' in entry 1"),
    ("sd1", "named", "IN04", r"bad token 'IN04' at position 1 of the named block vector"),
    ("sd1", "named", "IN04=x", r"bad token 'x' at position 1 of the named"),
    ("sd1", "sd", "1", r"unknown block-weight mode 'sd'"),
    ("auraflow", "named", "*=1", r"unknown architecture 'auraflow'"),   # a family the registry does not describe
    ("sd1", "a1111", "   ", r"empty a1111 block vector"),
])
def test_error_messages(arch, mode, vector, match):
    with pytest.raises(LoraValueError, match=match):
        blocks.resolve_vector(arch, mode, vector)


def test_element_and_present_block_errors():
    with pytest.raises(LoraValueError, match="unknown element preset 'ATTNDEEP'.*nearest: ATTNDEEPON"):
        blocks.resolve_vector("sd1", "a1111", "ALL", element="ATTNDEEP")
    with pytest.raises(LoraValueError, match=r"bad token 'IN05:attn' at position 1 of the element spec"):
        blocks.resolve_vector("sd1", "a1111", "ALL", element="IN05:attn")
    with pytest.raises(LoraValueError, match=r"unknown block id 'IN99' in present_blocks"):
        blocks.resolve_vector("sd1", "inspire", "SD-ALL", present_blocks={"IN99"})
    with pytest.raises(LoraValueError, match="variable A=nan"):
        blocks.resolve_vector("sd1", "inspire", "SD-ALL", A=float("nan"))


# ------------------------------------------------------------------------------------------ user presets

def test_user_presets_roundtrip_atomic(tmp_path):
    path = tmp_path / "sub" / "block_presets.json"
    blocks.save_user_preset(path, "face", "IN04-IN08=0, OUT*=1", "named")
    blocks.save_user_preset(path, "mine", "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0", "a1111")
    blocks.save_user_preset(path, "face", "*=0.5", "named")   # same name replaces
    assert blocks.load_user_presets(path) == {"face": {"mode": "named", "vector": "*=0.5"},
                                              "mine": {"mode": "a1111", "vector": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0"}}
    assert json.loads(path.read_text())["version"] == 1
    assert os.listdir(path.parent) == ["block_presets.json"]   # no temp file left behind


def test_user_preset_errors_and_txt_import(tmp_path):
    path = tmp_path / "p.json"
    with pytest.raises(LoraValueError, match="does not resolve on any architecture"):
        blocks.save_user_preset(path, "bad", "1,2,3", "a1111")
    with pytest.raises(LoraValueError, match="must be non-empty and contain no '/'"):
        blocks.save_user_preset(path, "a/b", "*=1", "named")
    with pytest.raises(LoraValueError, match="read-only imports"):
        blocks.save_user_preset(tmp_path / "x.txt", "a", "*=1", "named")
    assert not path.exists()
    path.write_text("{not json")
    with pytest.raises(LoraValueError, match="is not valid JSON"):
        blocks.load_user_presets(path)
    path.write_text(json.dumps({"presets": {"x": {"mode": "zzz", "vector": "1"}}}))
    with pytest.raises(LoraValueError, match="needs \"mode\""):
        blocks.load_user_presets(path)
    with pytest.raises(LoraValueError, match="does not exist"):
        blocks.load_user_presets(tmp_path / "missing.json")
    txt = tmp_path / "lbw-preset.custom.txt"
    txt.write_text("# comment\nMY-FACE:1,0,0,0,0,0,0,0,1,1,1,0,0,0,0,0,0\n@SWEEP:17\n\n")
    assert blocks.load_user_presets(txt) == {"MY-FACE": {"mode": "inspire", "vector": "1,0,0,0,0,0,0,0,1,1,1,0,0,0,0,0,0"}}
    a1111 = tmp_path / "lbwpresets.txt"
    a1111.write_text("X1:1,1,1,1,1,1,1,1,1,1,1,1\n")
    assert blocks.load_user_presets(a1111)["X1"]["mode"] == "a1111"
