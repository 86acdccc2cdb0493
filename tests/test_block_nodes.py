"""Block-weight nodes in the real ComfyUI host (CPU, tiny SD1.5 / SDXL models).

Expected weights are computed here from the LoRA's own tensors with the published formulas (LoRA, LoHa, LoKr,
DoRA) and the A1111 block-id lists of the reference notes, never by the code under test.
"""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import save_file

from tests import tiny_models as tm
from tests.comfy_host import import_comfy
from tests.pack import loras_folder, node_module

comfy = import_comfy()
import comfy.hooks  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402

from lora_core.errors import LoraValueError  # noqa: E402

bw = node_module("block_weight")
tools = node_module("block_tools")

# A1111 block ids (sd-webui-lora-block-weight BLOCKID26 / BLOCKID20), as listed in the reference notes.
BLOCKID26 = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
BLOCKID17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06",
             "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"]
BLOCKID20 = ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]

TE_KEY = "{}.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
SD15_LINEAR = [
    TE_KEY.format("clip_l"),
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
    "diffusion_model.input_blocks.2.1.transformer_blocks.0.ff.net.0.proj.weight",
    "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight",
    "diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_v.weight",
    "diffusion_model.output_blocks.5.1.transformer_blocks.0.ff.net.2.weight",
]
SD15_CONV = [  # LoCon targets: conv_in (IN00), a downsampler (IN03), resnet convs (IN01, IN04, OUT00, OUT02)
    "diffusion_model.input_blocks.0.0.weight",
    "diffusion_model.input_blocks.3.0.op.weight",
    "diffusion_model.input_blocks.1.0.in_layers.2.weight",
    "diffusion_model.input_blocks.4.0.in_layers.2.weight",
    "diffusion_model.output_blocks.0.0.out_layers.3.weight",
    "diffusion_model.output_blocks.2.1.conv.weight",
]
SDXL_KEYS = [
    TE_KEY.format("clip_l"),
    TE_KEY.format("clip_g"),
    "diffusion_model.input_blocks.1.0.emb_layers.1.weight",
    "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
    "diffusion_model.input_blocks.8.1.transformer_blocks.1.attn2.to_k.weight",
    "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight",
    "diffusion_model.output_blocks.2.1.transformer_blocks.0.ff.net.2.weight",
    "diffusion_model.output_blocks.5.1.transformer_blocks.0.attn1.to_out.0.weight",
]


# ----------------------------------------------------------------------------------------------- helpers

def block_of(host_key: str) -> str:
    """A1111 id of a host key: the text encoders are BASE."""
    if host_key.startswith("clip_"):
        return "BASE"
    path = host_key[len("diffusion_model."):]
    m = re.match(r"(input|output)_blocks\.(\d+)\.", path)
    if m:
        return ("IN" if m.group(1) == "input" else "OUT") + f"{int(m.group(2)):02d}"
    return "M00" if path.startswith("middle_block.") else "OTHER"


def kohya_name(host_key: str, sdxl: bool = False) -> str:
    body = host_key[: -len(".weight")]
    if body.startswith("clip_"):
        encoder, path = body.split(".transformer.")
        prefix = {"clip_l": "lora_te1_" if sdxl else "lora_te_", "clip_g": "lora_te2_"}[encoder]
        return prefix + path.replace(".", "_")
    return "lora_unet_" + body[len("diffusion_model."):].replace(".", "_")


def _rand(gen, *shape, std=0.2):
    return torch.randn(*shape, generator=gen) * std


def make_module(algo: str, weight: torch.Tensor, gen, rank: int = 4):
    """(file tensors by suffix, reference ΔW(W)) for one module; ΔW follows the published formulas."""
    out_dim, in_flat = weight.shape[0], weight[0].numel()
    alpha = 2.0
    if algo in ("lora", "dora"):
        if weight.ndim == 4:
            up, down = _rand(gen, out_dim, rank, 1, 1), _rand(gen, rank, *weight.shape[1:])
        else:
            up, down = _rand(gen, out_dim, rank), _rand(gen, rank, in_flat)
        tensors = {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(alpha)}
        lora = (up.reshape(out_dim, rank) @ down.reshape(rank, -1)).reshape(weight.shape) * (alpha / rank)
        if algo == "lora":
            return tensors, lambda w: lora
        magnitude = weight.reshape(out_dim, -1).norm(dim=1, keepdim=True) * (1 + _rand(gen, out_dim, 1, std=0.1))
        tensors["dora_scale"] = magnitude

        def dora(w):
            adapted = (w + lora).reshape(out_dim, -1)
            return (magnitude * adapted / adapted.norm(dim=1, keepdim=True)).reshape(w.shape) - w
        return tensors, dora
    if algo == "loha":
        w1a, w1b, w2a, w2b = (_rand(gen, out_dim, rank), _rand(gen, rank, in_flat),
                              _rand(gen, out_dim, rank), _rand(gen, rank, in_flat))
        tensors = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b,
                   "alpha": torch.tensor(alpha)}
        delta = ((w1a @ w1b) * (w2a @ w2b) * (alpha / rank)).reshape(weight.shape)
        return tensors, lambda w: delta
    if algo == "lokr":
        w1, w2 = _rand(gen, 4, 4), _rand(gen, out_dim // 4, in_flat // 4)
        delta = torch.kron(w1, w2).reshape(weight.shape)   # full factors: no alpha scaling
        return {"lokr_w1": w1, "lokr_w2": w2}, lambda w: delta
    raise AssertionError(algo)


def make_lora(keys, weights: dict, algo: str = "lora", sdxl: bool = False, seed: int = 0):
    """(file state dict, {host key: ΔW function})."""
    gen = torch.Generator().manual_seed(seed)
    state, deltas = {}, {}
    for key in keys:
        tensors, delta = make_module(algo, weights[key], gen)
        name = kohya_name(key, sdxl)
        state.update({f"{name}.{suffix}": t.contiguous() for suffix, t in tensors.items()})
        deltas[key] = delta
    return state, deltas


def base_weights(model, clip=None) -> dict:
    out = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
    if clip is not None:
        out.update({k: v.detach().clone() for k, v in clip.cond_stage_model.state_dict().items()})
    return out


def baked(model, clip=None) -> dict:
    """Weights as ComfyUI applies them: load the patchers fully, read, unload (restores the originals)."""
    patchers = [model] + ([clip.patcher] if clip is not None else [])
    mm.load_models_gpu(patchers, force_full_load=True)
    try:
        return base_weights(model, clip)
    finally:
        mm.unload_all_models()


def assert_weights(result: dict, base: dict, deltas: dict, factor_of, strength_model, strength_clip):
    for key, delta in deltas.items():
        strength = strength_clip if key.startswith("clip_") else strength_model
        expected = base[key] + strength * factor_of(key) * delta(base[key])
        torch.testing.assert_close(result[key], expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{key}: {m}")


def vector_text(values) -> str:
    return ",".join(f"{v:g}" for v in values)


def weight_node(model, clip, name, mode="a1111", vector="", preset="custom", strength_model=1.0,
                strength_clip=1.0, seed=0, A=1.0, B=1.0, inverse=False):
    return bw.LoRACoreBlockWeight().load(model, name, strength_model, strength_clip, mode, preset, vector, seed, A,
                                         B, inverse, clip=clip)


def snapshot(model, clip):
    return (base_weights(model, clip), dict(model.patches), model.patches_uuid, dict(clip.patcher.patches),
            clip.patcher.patches_uuid)


def assert_untouched(before, model, clip):
    after = snapshot(model, clip)
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:] == after[1:]


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def sd15():
    return tm.comfy_sd15(), tm.comfy_clip_sd15()


@pytest.fixture(scope="module")
def sdxl():
    return tm.comfy_sdxl(), tm.comfy_clip_sdxl()


@pytest.fixture(autouse=True)
def unloaded():
    """Sampling leaves the last model loaded (its patches baked into the shared tiny model): unload around each
    test so `base_weights` always reads the real base weights."""
    mm.unload_all_models()
    yield
    mm.unload_all_models()


@pytest.fixture()
def loras(tmp_path):
    with loras_folder(tmp_path / "loras") as folder:
        folder.mkdir(exist_ok=True)
        yield folder


@pytest.fixture()
def user_dir(tmp_path):
    saved = folder_paths.get_user_directory()
    folder_paths.set_user_directory(str(tmp_path / "user"))
    try:
        yield tmp_path / "user"
    finally:
        folder_paths.set_user_directory(saved)


def write(folder, name, state) -> str:
    save_file(state, str(folder / name))
    return name


# ------------------------------------------------------------------------------------------ the contract

def test_input_order_and_seed_widget():
    inputs = bw.LoRACoreBlockWeight.INPUT_TYPES()
    assert list(inputs["required"]) == ["model", "lora_name", "strength_model", "strength_clip", "mode", "preset",
                                        "vector", "seed", "A", "B", "inverse"]
    assert list(inputs["optional"]) == ["clip"]
    assert inputs["required"]["seed"][1]["control_after_generate"] is False
    assert inputs["required"]["mode"][0] == ["a1111", "inspire", "named"]
    assert inputs["required"]["preset"][0][0] == "custom"
    assert bw.LoRACoreBlockWeight.RETURN_TYPES == ("MODEL", "CLIP", "STRING")
    hooks = bw.LoRACoreBlockWeightHooks.INPUT_TYPES()
    assert list(hooks["required"]) == list(inputs["required"])
    assert list(hooks["optional"]) == ["clip", "prev_hooks"]
    assert bw.LoRACoreBlockWeightHooks.RETURN_TYPES[0] == "HOOKS"
    assert tools.LoRACoreBlockSweep.OUTPUT_IS_LIST == (True, True)
    assert tools.LoRACoreSweepGrid.INPUT_IS_LIST is True
    import lora_core_pack   # loaded by tests.pack.node_module, the way ComfyUI loads a custom-node pack
    for node_id in ("LoRACoreBlockWeight", "LoRACoreBlockWeightHooks", "LoRACoreBlockStack",
                    "LoRACoreApplyBlockStack", "LoRACoreBlockStackToLoraStack", "LoRACoreSaveBlockPreset",
                    "LoRACoreBlockInfo", "LoRACoreBlockSweep", "LoRACoreSweepGrid"):
        assert node_id in lora_core_pack.NODE_CLASS_MAPPINGS


# ------------------------------------------------------------------------- exact weights per algorithm

@pytest.mark.parametrize("algo", ["lora", "loha", "lokr", "dora"])
def test_sd15_weights_equal_base_plus_strength_factor_delta(sd15, loras, algo):
    model, clip = sd15
    base = base_weights(model, clip)
    keys = SD15_LINEAR + (SD15_CONV[2:4] if algo == "lora" else [])
    state, deltas = make_lora(keys, base, algo)
    name = write(loras, f"{algo}.safetensors", state)
    values = [round(0.2 + 0.05 * i, 2) for i in range(26)]   # a distinct factor per A1111 id
    factors = dict(zip(BLOCKID26, values))
    new_model, new_clip, table = weight_node(model, clip, name, "a1111", vector_text(values),
                                             strength_model=0.8, strength_clip=-0.6)
    assert new_model is not model and new_clip is not clip
    assert "IN01" in table and "OUT05" in table
    assert_weights(baked(new_model, new_clip), base, deltas, lambda k: factors[block_of(k)], 0.8, -0.6)
    # the inputs were never patched
    assert_weights(baked(model, clip), base, {k: (lambda w: torch.zeros_like(w)) for k in keys}, lambda k: 1, 1, 1)


@pytest.mark.parametrize("algo", ["lora", "lokr"])
def test_sdxl_weights_and_base_covers_both_text_encoders(sdxl, loras, algo):
    model, clip = sdxl
    base = base_weights(model, clip)
    state, deltas = make_lora(SDXL_KEYS, base, algo, sdxl=True, seed=3)
    name = write(loras, f"xl_{algo}.safetensors", state)
    values = [round(1.0 - 0.04 * i, 2) for i in range(20)]
    factors = dict(zip(BLOCKID20, values))
    new_model, new_clip, _ = weight_node(model, clip, name, "a1111", vector_text(values), strength_model=1.2,
                                         strength_clip=0.7)
    assert_weights(baked(new_model, new_clip), base, deltas, lambda k: factors[block_of(k)], 1.2, 0.7)


def test_a1111_17_vector_zeroes_conv_only_blocks(sd15, loras):
    model, _ = sd15
    base = base_weights(model)
    state, deltas = make_lora(SD15_CONV + SD15_LINEAR[1:], base, "lora", seed=5)
    name = write(loras, "locon.safetensors", state)
    new_model, _, table = weight_node(model, None, name, "a1111", vector_text([1] * 17), strength_model=1.0)
    result = baked(new_model)
    in17 = set(BLOCKID17)
    assert_weights(result, base, deltas, lambda k: 1.0 if block_of(k) in in17 else 0.0, 1.0, 1.0)
    zeroed = [k for k in deltas if block_of(k) not in in17]
    assert {block_of(k) for k in zeroed} == {"IN00", "IN03", "OUT00", "OUT02"}
    assert all(torch.equal(result[k], base[k]) for k in zeroed)


def test_inspire_ordinal_vector_on_a_lora_missing_blocks(sdxl, loras):
    """Inspire counts only the blocks the file has (here no IN00/IN03/IN06/OUT04), in order, BASE first; a
    vector shorter than the file's slots carries its last value on; extra values are ignored."""
    model, clip = sdxl
    base = base_weights(model, clip)
    slots = ([f"diffusion_model.input_blocks.{b}.0.emb_layers.1.weight" for b in (1, 2, 4, 5, 7, 8)]
             + ["diffusion_model.middle_block.1.proj_in.weight"]
             + [f"diffusion_model.output_blocks.{b}.0.emb_layers.1.weight" for b in (0, 1, 2, 3, 5, 6, 7, 8)])
    keys = [TE_KEY.format("clip_l"), TE_KEY.format("clip_g")] + slots
    state, deltas = make_lora(keys, base, "lora", sdxl=True, seed=7)
    name = write(loras, "partial_xl.safetensors", state)
    order = [block_of(k) for k in slots]          # IN01 IN02 IN04 IN05 IN07 IN08 M00 OUT00 OUT01 OUT02 OUT03 OUT05 ..
    assert "OUT04" not in order and len(order) == 15

    values = [0.5] + [round(0.1 * (i + 1), 2) for i in range(11)]            # 12 values: BASE + 11 slots
    factors = {"BASE": 0.5, **dict(zip(order, values[1:]))}
    factors.update({b: values[-1] for b in order[11:]})                        # OUT05.. inherit the last value
    m, c, table = weight_node(model, clip, name, "inspire", vector_text(values))
    assert_weights(baked(m, c), base, deltas, lambda k: factors[block_of(k)], 1.0, 1.0)

    values = [0.5] + [round(-0.1 * (i + 1), 2) for i in range(15)] + [9.0, 9.0]   # 18 values: 2 extra
    factors = {"BASE": 0.5, **dict(zip(order, values[1:]))}
    m, c, _ = weight_node(model, clip, name, "inspire", vector_text(values))
    assert factors["OUT05"] == -1.2                 # position 12 -> the 12th slot the file has, not OUT04
    assert_weights(baked(m, c), base, deltas, lambda k: factors[block_of(k)], 1.0, 1.0)


def test_inspire_middle_block_parts_are_separate_slots(sd15, loras):
    """A LoCon touching middle_block.0/1/2 has three Inspire slots (mid0, mid1, mid2), each with its own value."""
    model, clip = sd15
    base = base_weights(model, clip)
    mids = ["diffusion_model.middle_block.0.in_layers.2.weight",
            "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight",
            "diffusion_model.middle_block.2.in_layers.2.weight"]
    keys = [SD15_LINEAR[0], SD15_LINEAR[1]] + mids + [SD15_LINEAR[4]]
    state, deltas = make_lora(keys, base, "lora", seed=8)
    name = write(loras, "mid_parts.safetensors", state)
    vector = "0.5,0.1,0.2,0.3,0.4,0.6,1,1,1,1,1,1"    # BASE, IN01, mid0, mid1, mid2, OUT03, (ignored)
    expected = {SD15_LINEAR[0]: 0.5, SD15_LINEAR[1]: 0.1, mids[0]: 0.2, mids[1]: 0.3, mids[2]: 0.4,
                SD15_LINEAR[4]: 0.6}
    m, c, _ = weight_node(model, clip, name, "inspire", vector)
    assert_weights(baked(m, c), base, deltas, lambda k: expected[k], 1.0, 1.0)


def test_empty_vector_means_plain_lora(sd15, loras):
    model, clip = sd15
    base = base_weights(model, clip)
    state, deltas = make_lora(SD15_LINEAR, base, "lora", seed=9)
    name = write(loras, "plain.safetensors", state)
    m, c, table = weight_node(model, clip, name, "a1111", "  ", strength_model=0.5, strength_clip=0.25)
    assert "factor 1" in table
    assert_weights(baked(m, c), base, deltas, lambda k: 1.0, 0.5, 0.25)


# ------------------------------------------------------------------------------------------- bad input

BAD_INPUTS = [
    ("wrong length", "a1111", "custom", "1,1,1,1,1", ["5"]),
    ("bad token", "a1111", "custom", ",".join(["1"] * 16 + ["x"]), ["x"]),
    ("another architecture", "a1111", "custom", vector_text([1] * 12), ["12"]),
    ("unknown preset", "a1111", "a1111/NO-SUCH-PRESET", "", ["NO-SUCH-PRESET"]),
    ("unknown user preset", "a1111", "user/ghost", "", ["ghost"]),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_vectors_raise_and_leave_the_model_untouched(sd15, loras, user_dir, case):
    _, mode, preset, vector, fragments = case
    model, clip = sd15
    state, _ = make_lora(SD15_LINEAR, base_weights(model, clip), "lora")
    name = write(loras, "ok.safetensors", state)
    before = snapshot(model, clip)
    with pytest.raises(LoraValueError) as caught:
        weight_node(model, clip, name, mode, vector, preset=preset)
    for fragment in fragments:
        assert fragment.lower() in str(caught.value).lower(), str(caught.value)
    with pytest.raises(LoraValueError):
        bw.LoRACoreBlockWeightHooks().create(model, name, 1.0, 1.0, mode, preset, vector, 0, 1.0, 1.0, False,
                                             clip=clip)
    assert_untouched(before, model, clip)


def test_bad_row_in_a_stack_patches_nothing(sd15, loras):
    model, clip = sd15
    state, _ = make_lora(SD15_LINEAR, base_weights(model, clip), "lora")
    name = write(loras, "ok.safetensors", state)
    rows = [bw.make_row(name, 1.0, 1.0, bw.BlockSettings("a1111", vector_text([1] * 17))),
            bw.make_row(name, 1.0, 1.0, bw.BlockSettings("a1111", "1,2,3"))]
    before = snapshot(model, clip)
    with pytest.raises(LoraValueError):
        bw.LoRACoreApplyBlockStack().apply(model, rows, clip=clip)
    assert_untouched(before, model, clip)


# -------------------------------------------------------------------------------------------- presets

def test_presets_shipped_and_user_round_trip(sd15, loras, user_dir):
    model, clip = sd15
    choices = bw.preset_choices()
    assert choices[0] == "custom"
    assert any(c.startswith("a1111/") for c in choices) and any(c.startswith("inspire/") for c in choices)
    assert not any(c.startswith("user/") for c in choices)
    vector = "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0"
    message = bw.LoRACoreSaveBlockPreset().save("mine", "a1111", vector)["result"][0]
    path = user_dir / "lora_core" / "block_presets.json"
    assert path.is_file() and str(path) in message
    assert "user/mine" in bw.preset_choices()
    assert "user/mine" in bw.LoRACoreBlockWeight.INPUT_TYPES()["required"]["preset"][0]
    json.loads(path.read_text())   # a documented, human-editable JSON file

    base = base_weights(model, clip)
    state, deltas = make_lora(SD15_LINEAR, base, "lora", seed=11)
    name = write(loras, "p.safetensors", state)
    factors = dict(zip(BLOCKID17, [float(v) for v in vector.split(",")]))
    # the preset brings its own mode: the inspire mode widget is overridden and the table says so
    m, c, table = weight_node(model, clip, name, "inspire", "9,9,9", preset="user/mine")
    assert "user/mine" in table
    assert_weights(baked(m, c), base, deltas, lambda k: factors.get(block_of(k), 0.0), 1.0, 1.0)


def test_shipped_a1111_preset_matches_its_vector(sd15, loras):
    model, clip = sd15
    base = base_weights(model, clip)
    state, deltas = make_lora(SD15_LINEAR, base, "lora", seed=12)
    name = write(loras, "q.safetensors", state)
    preset = next(c for c in bw.preset_choices() if c.upper() == "A1111/OUTALL")
    outall = dict(zip(BLOCKID17, [1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]))   # reference §3.1
    m, c, _ = weight_node(model, clip, name, "a1111", "", preset=preset)
    assert_weights(baked(m, c), base, deltas, lambda k: outall[block_of(k)], 1.0, 1.0)


# ------------------------------------------------------------------------------------------ stacks

def test_block_stack_is_one_patch_set_and_lora_stack_rows_get_factor_one(sd15, loras):
    model, clip = sd15
    base = base_weights(model, clip)
    state_a, deltas_a = make_lora(SD15_LINEAR, base, "lora", seed=21)
    state_b, deltas_b = make_lora(SD15_LINEAR, base, "loha", seed=22)
    a = write(loras, "a.safetensors", state_a)
    b = write(loras, "b.safetensors", state_b)
    rows = {"seed": 0, "A": 1.0, "B": 1.0, "inverse": False}
    values = [round(0.3 + 0.03 * i, 2) for i in range(26)]
    for i in range(1, bw.STACK_ROWS + 1):
        rows.update({f"enabled_{i}": i == 1, f"lora_{i}": b if i == 1 else "None", f"strength_model_{i}": 0.9,
                     f"strength_clip_{i}": 0.4, f"mode_{i}": "a1111", f"preset_{i}": "custom",
                     f"vector_{i}": vector_text(values)})
    (stack,) = bw.LoRACoreBlockStack().build(lora_stack=[(a, 0.5, 1.5), ("None", 1.0, 1.0)], **rows)
    assert [r["name"] for r in stack] == [a, b]
    assert set(stack[0]) == set(bw.ROW_KEYS) and stack[0]["vector"] == ""
    new_model, new_clip, table = bw.LoRACoreApplyBlockStack().apply(model, stack, clip=clip)
    # one patch set: a single adapter per weight carries both LoRAs
    for key in SD15_LINEAR:
        patches = (new_clip.patcher.patches if key.startswith("clip_") else new_model.patches)[key]
        assert len(patches) == 1 and len(patches[0][1].weights) == 2
    factors = dict(zip(BLOCKID26, values))
    result = baked(new_model, new_clip)
    for key in SD15_LINEAR:
        w = base[key]
        clip_key = key.startswith("clip_")
        after_a = w + (1.5 if clip_key else 0.5) * deltas_a[key](w)
        expected = after_a + (0.4 if clip_key else 0.9) * factors[block_of(key)] * deltas_b[key](after_a)
        torch.testing.assert_close(result[key], expected, rtol=1e-5, atol=1e-5)
    (plain, dropped) = bw.LoRACoreBlockStackToLoraStack().convert(stack)
    assert plain == [(a, 0.5, 1.5), (b, 0.9, 0.4)]
    assert b in dropped and a not in dropped


# ---------------------------------------------------------------------------------------- block info

def test_block_info_counts_and_norms(sd15, loras):
    model, clip = sd15
    base = base_weights(model, clip)
    keys = SD15_LINEAR + SD15_CONV[2:3]
    state, deltas = make_lora(keys, base, "lora", seed=31)
    name = write(loras, "info.safetensors", state)
    node = tools.LoRACoreBlockInfo()
    text, chart = node.inspect(name, "SD1")      # no model: layout only, shape-only deltas
    assert chart.dtype == torch.float32 and chart.ndim == 4 and chart.shape[0] == 1 and chart.shape[3] == 3
    assert 0.0 <= float(chart.min()) and float(chart.max()) <= 1.0 and float(chart.std()) > 0
    expected = {}
    for key in keys:
        expected.setdefault(block_of(key).replace("BASE", "TE1"), []).append(float(deltas[key](base[key]).norm()))
    for block, norms in expected.items():
        line = next(line for line in text.splitlines() if line.split()[:1] == [block])
        modules, file_keys, norm = line.split()[1:4]
        assert int(modules) == len(norms) and int(file_keys) == 3 * len(norms)
        assert math.isclose(float(norm), math.sqrt(sum(n * n for n in norms)), rel_tol=1e-3)
    assert "IN04" not in [line.split()[0] for line in text.splitlines() if line.strip()]

    dora_state, dora_deltas = make_lora(SD15_LINEAR[1:3], base, "dora", seed=32)
    dora = write(loras, "dora_info.safetensors", dora_state)
    text, _ = node.inspect(dora, "auto")
    assert "n/a" in text                        # weight-dependent without a model
    text, _ = node.inspect(dora, "auto", model=model)
    line = next(line for line in text.splitlines() if line.split()[:1] == ["IN01"])
    assert math.isclose(float(line.split()[3]), float(dora_deltas[SD15_LINEAR[1]](base[SD15_LINEAR[1]]).norm()),
                        rel_tol=1e-3)


# ---------------------------------------------------------------------- sweep -> KSampler -> grid

def conditioning(width=768, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, width, generator=gen), {}]]


def latent_to_image(samples: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(samples[:, :3]).permute(0, 2, 3, 1).contiguous()


def test_sweep_ksampler_grid_chain(sd15, loras):
    import nodes as comfy_nodes   # ComfyUI's nodes.py (the host comes first on sys.path)

    model, _ = sd15
    base = base_weights(model)
    keys = SD15_LINEAR[1:3] + SD15_LINEAR[4:]            # IN01, IN02, OUT03, OUT05
    state, _ = make_lora(keys, base, "lora", seed=41)
    state = {k: v * 4 for k, v in state.items() if not k.endswith(".alpha")} | \
            {k: v for k, v in state.items() if k.endswith(".alpha")}
    name = write(loras, "sweep.safetensors", state)
    models, labels = tools.LoRACoreBlockSweep().sweep(model, name, 1.0, "blocks", 1.0, 0.0, "a1111", "", 0, 1.0, 1.0)
    assert len(models) == len(labels) == 5
    assert labels[0].startswith("baseline") and [l.split()[0] for l in labels[1:]] == ["IN01", "IN02", "OUT03", "OUT05"]
    knocked = {"IN01": SD15_LINEAR[1], "IN02": SD15_LINEAR[2], "OUT03": SD15_LINEAR[4], "OUT05": SD15_LINEAR[5]}
    assert set(models[0].patches) == set(keys)
    for variant, label in zip(models[1:], labels[1:]):
        assert set(variant.patches) == set(keys) - {knocked[label.split()[0]]}

    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    images = []
    for variant in models:     # what ComfyUI's list mapping does for a KSampler fed with a MODEL list
        (out,) = comfy_nodes.common_ksampler(variant, 7, 2, 1.0, "euler", "normal", conditioning(seed=1),
                                             conditioning(seed=2), latent)
        images.append(latent_to_image(out["samples"]))
    grid, summary = tools.LoRACoreSweepGrid().assemble(images, columns=[3], heatmap=[True], threshold=[0.01],
                                                       labels=labels)
    assert grid.ndim == 4 and grid.shape[0] == 1 and grid.shape[3] == 3
    # two rows of tiles: image + heatmap (8 px each) under a label band sized to the wrapped text
    band = grid.shape[1] // 2 - 8 * 2
    assert grid.shape[1] % 2 == 0 and band >= tools.LABEL_FONT_PX + 3 and grid.shape[2] == 3 * 8
    assert 0.0 <= float(grid.min()) and float(grid.max()) <= 1.0
    lines = summary.splitlines()
    assert len(lines) == 5 and lines[0].startswith(labels[0])
    means = [float(re.search(r"mean \|diff\| ([\d.]+)%", line).group(1)) for line in lines]
    assert means[0] == 0.0 and max(means[1:]) > 0.0


def test_sweep_vectors_and_bad_line(sd15, loras):
    model, _ = sd15
    state, _ = make_lora(SD15_LINEAR[1:], base_weights(model), "lora", seed=42)
    name = write(loras, "sv.safetensors", state)
    lines = "a1111/ALL\n" + vector_text([0] * 17)
    models, labels = tools.LoRACoreBlockSweep().sweep(model, name, 1.0, "vectors", 1.0, 0.0, "a1111", lines, 0,
                                                      1.0, 1.0)
    assert labels[1:] == ["a1111/ALL", vector_text([0] * 17)]
    assert set(models[1].patches) == set(SD15_LINEAR[1:]) and not models[2].patches
    with pytest.raises(LoraValueError):
        tools.LoRACoreBlockSweep().sweep(model, name, 1.0, "vectors", 1.0, 0.0, "a1111", "1,2", 0, 1.0, 1.0)


# ----------------------------------------------------------------------------------------------- hooks

def _recording_model(model, watch: list):
    """A clone whose UNet wrapper records the watched weights and whether the batch was cond or uncond."""
    seen = []
    clone = model.clone()

    def wrapper(apply_model, args):
        seen.append((tuple(args["cond_or_uncond"]),
                     {k: comfy.utils.get_attr(clone.model, k).detach().clone() for k in watch}))
        return apply_model(args["input"], args["timestep"], **args["c"])

    clone.set_model_unet_function_wrapper(wrapper)
    return clone, seen


def _sample(model, positive, negative):
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    return comfy.sample.sample(model, noise, 2, 3.0, "euler", "normal", positive, negative,
                               torch.zeros(1, 4, 8, 8), seed=3, disable_pbar=True)


@pytest.mark.parametrize("keyframe", [None, 0.5])
def test_hooks_apply_block_weighted_patches_during_sampling(sd15, loras, keyframe):
    model, clip = sd15
    base = base_weights(model, clip)
    state, deltas = make_lora(SD15_LINEAR, base, "lora", seed=51)
    name = write(loras, "hook.safetensors", state)
    values = [round(0.3 + 0.04 * i, 2) for i in range(26)]
    factors = dict(zip(BLOCKID26, values))
    hooks, table = bw.LoRACoreBlockWeightHooks().create(model, name, 0.9, 0.5, "a1111", "custom",
                                                        vector_text(values), 0, 1.0, 1.0, False, clip=clip)
    assert isinstance(hooks, comfy.hooks.HookGroup) and len(hooks) == 1
    hook = hooks.hooks[0]
    assert isinstance(hook, comfy.hooks.WeightHook) and hook.need_weight_init is False
    assert set(hook.weights) == set(SD15_LINEAR[1:]) and set(hook.weights_clip) == {SD15_LINEAR[0]}
    if keyframe is not None:
        group = comfy.hooks.HookKeyframeGroup()
        group.add(comfy.hooks.HookKeyframe(strength=keyframe, start_percent=0.0))
        hooks = hooks.clone()
        hooks.set_keyframes_on_hooks(group)
    mult = 1.0 if keyframe is None else keyframe

    unet_keys = SD15_LINEAR[1:]
    recorder, seen = _recording_model(model, unet_keys)
    positive = comfy.hooks.set_hooks_for_conditioning(conditioning(seed=1), hooks)
    hooked = _sample(recorder, positive, conditioning(seed=2))
    if keyframe is None:     # the hook changes the result (the weights below prove it for the keyframe case)
        plain = _sample(model, conditioning(seed=1), conditioning(seed=2))
        assert not torch.allclose(hooked, plain)
    cond_calls = [w for who, w in seen if who == (0,)]
    uncond_calls = [w for who, w in seen if who == (1,)]
    assert cond_calls and uncond_calls
    for weights in cond_calls:
        assert_weights(weights, base, {k: deltas[k] for k in unet_keys}, lambda k: factors[block_of(k)],
                       0.9 * mult, 0.5)
    for weights in uncond_calls:       # the negative carries no hook: base weights
        assert all(torch.equal(weights[k], base[k]) for k in unet_keys)
    assert all(torch.equal(comfy.utils.get_attr(model.model, k), base[k]) for k in unet_keys)

    # The CLIP side: core's Set CLIP Hooks path registers weights_clip on the CLIP patcher.
    clip_hooked = clip.clone()
    clip_hooked.patcher.forced_hooks = hooks.clone()
    clip_hooked.use_clip_schedule = False
    clip_hooked.patcher.register_all_hook_patches(hooks, comfy.hooks.create_target_dict(comfy.hooks.EnumWeightTarget.Clip))
    clip_hooked.patcher.patch_model()
    try:
        clip_hooked.patcher.apply_hooks(hooks, force_apply=True)
        weight = comfy.utils.get_attr(clip_hooked.cond_stage_model, SD15_LINEAR[0]).detach().clone()
    finally:
        clip_hooked.patcher.unpatch_model()
    expected = base[SD15_LINEAR[0]] + 0.5 * mult * factors["BASE"] * deltas[SD15_LINEAR[0]](base[SD15_LINEAR[0]])
    torch.testing.assert_close(weight, expected, rtol=1e-5, atol=1e-5)
