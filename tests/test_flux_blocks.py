"""Block weights on Flux in the real host: Inspire mode equals Inspire Pack's `LoRA Loader (Block Weight)` (its
58-value layout, ordinal over the blocks a file has, last value carried on, seeded letters, inverse, its Flux
presets verbatim), named syntax with element control inside fused weights, hako-mikan's 61-value A1111 layout,
and merged block-weighted stacks that load to the stack's weights in core and in our loader.

The Inspire reference below is our own re-statement of `LoraLoaderBlockWeight.load_lbw` (read from
ComfyUI-Inspire-Pack `inspire/lora_block_weight.py`): it runs on core's own `load_lora` output, sorts keys into
input/middle/output/double/single groups by the two characters after the group prefix, walks them in that order
drawing a new vector entry (and new random numbers) whenever the block number changes, keeps the last ratio when
the vector runs out, gives BASE (every other key) entry 0 drawn last, and applies each key with
`add_patches(..., strength * ratio)`. One deliberate difference: Inspire sends keys to the CLIP by the substring
'text', which drops T5 text-encoder keys (they go to the model and patch nothing); we apply them, at BASE.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.comfy_host import import_comfy
from tests.pack import block_stack_rows, loras_folder, node_module
from tests import dit_writers as dw
from tests import lora_writers as lw
from tests import tiny_models as tm
from tests.test_flux import assert_same, bake

comfy = import_comfy()
import comfy.lora  # noqa: E402
import comfy.sd  # noqa: E402

from lora_core import blocks  # noqa: E402
from lora_core.arch import FLUX_DEV  # noqa: E402
from lora_core.errors import LoraValueError  # noqa: E402


@pytest.fixture(scope="module")
def flux():
    # 3 double and 5 single blocks: enough for ordinal positions, carry-over and group boundaries
    return tm.comfy_flux(depth=3, depth_single=5), tm.comfy_clip_flux()


def _num(text: str) -> int:
    two = text[:2]
    return int(two[0]) if two[1:] == "." else int(two)


def inspire_reference(model, clip, lora: dict, strength_model, strength_clip, vector, seed=0, A=1.0, B=1.0,
                      inverse=False):
    """(model clone, clip clone) patched the way Inspire's load_lbw does (see the module docstring)."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    loaded = comfy.lora.load_lora(lora, key_map, log_missing=False)
    entries = vector.split(",")
    rs = np.random.RandomState(seed % 2 ** 31)

    def ratios(token):
        out = []
        for t in token.strip().split(" "):
            if t in "Uu":
                out.append(round(rs.uniform(-1.5, 1.5), 2))
            elif t in "Rr":
                out.append(round(rs.uniform(0, 3.0), 2))
            else:
                out.append({"A": A, "a": A / 2, "B": B, "b": B / 2}[t] if t in "AaBb" else float(t))
        return out

    groups = {g: [] for g in ("input_blocks.", "middle_block.", "output_blocks.", "double_blocks.", "single_blocks.")}
    others = []
    for key, value in loaded.items():
        k = key[0] if isinstance(key, tuple) else key
        rest = k[len("diffusion_model."):]
        for prefix in groups:
            if rest.startswith(prefix):
                groups[prefix].append((key, value, _num(rest[len(prefix):])))
                break
        else:
            others.append((key, value))
    ordered = [item for prefix in groups for item in sorted(groups[prefix], key=lambda x: x[2])]
    weights, last, used, pending, ratio = {}, None, 1, [], 1.0
    for key, value, number in ordered:
        if last != number and len(entries) > used:
            pending = ratios(entries[used])
            ratio = pending.pop(0)
            used += 1
        elif pending:
            ratio = pending.pop(0)
        last = number
        weights[key] = (value, 1 - ratio if inverse else ratio)
    base = ratios(entries[0])[0]
    base = 1 - base if inverse else base
    for key, value in others:
        weights[key] = (value, base)
    new_model, new_clip = model.clone(), clip.clone()
    clip_keys = set(clip.cond_stage_model.state_dict())
    for key, (value, r) in weights.items():
        if r == 0:
            continue
        k = key[0] if isinstance(key, tuple) else key
        # Inspire routes by `'text' in k`, which sends T5 keys (t5xxl.transformer.encoder...) to the model, where
        # they patch nothing: a bug we do not copy (README). The reference routes by where the key lives.
        if k in clip_keys:
            new_clip.add_patches({key: value}, strength_clip * r)
        else:
            new_model.add_patches({key: value}, strength_model * r)
    return new_model, new_clip


def lora_file(model, clip, double=True, single=True, seed=0) -> dict:
    layers = dw.linear_layers(model.model.diffusion_model,
                              include=(("double_blocks.",) if double else ()) + (("single_blocks.",) if single else ()))
    state = dw.kohya_flux(model, seed=seed, layers=layers)
    state.update(dw.comfy_native(model, seed=seed + 1, layers=dw.linear_layers(model.model.diffusion_model,
                                                                               include=("img_in", "final_layer"))))
    state.update(dw.kohya_text_encoders(clip, {"clip_l": "lora_te1", "t5xxl": "lora_te3"}, seed=seed + 2))
    return state


def run_ours(model, clip, tmp_path, state, vector, mode="inspire", preset="custom", seed=0, A=1.0, B=1.0,
             inverse=False, strengths=(0.8, 0.6)):
    lw.save_safetensors(state, tmp_path / "flux_lbw.safetensors")
    with loras_folder(tmp_path):
        return node_module("block_weight").LoRACoreBlockWeight().load(
            model, "flux_lbw.safetensors", strengths[0], strengths[1], mode, preset, vector, seed, A, B, inverse,
            clip=clip)


def _random_vector(n, seed):
    rng = np.random.RandomState(seed)
    return ",".join(str(round(float(x), 2)) for x in rng.uniform(-1, 2, n))


CASES = {
    "numeric-58": dict(vector=_random_vector(58, 1)),
    "seeded-letters": dict(vector=",".join((["R", "U", "r", "u", "A", "a", "B", "b", "0.5"] * 7)[:58]), seed=77,
                           A=3.0, B=-0.5),
    "short-carries-on": dict(vector="1,0.25,0.5,0.75,1,0.1,0.2,0.3,0.4,0.6,0.7,0.8"),
    "inverse": dict(vector=_random_vector(58, 2), inverse=True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("blocks_in_file", ["all", "double-only"])
def test_inspire_mode_equals_inspire_on_flux_files(flux, tmp_path, case, blocks_in_file):
    model, clip = flux
    state = lora_file(model, clip, single=blocks_in_file == "all", seed=3)
    options = CASES[case]
    ours_model, ours_clip, table = run_ours(model, clip, tmp_path, state, **options)
    ref_model, ref_clip = inspire_reference(model, clip, state, 0.8, 0.6, options["vector"], options.get("seed", 0),
                                            options.get("A", 1.0), options.get("B", 1.0), options.get("inverse", False))
    base = {k: v.clone() for k, v in model.model.state_dict().items()}
    base_clip = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    ours, ref = bake(ours_model), bake(ref_model)
    zero = {k for k in ref if not ref_model.patches.get(k)}
    assert_same({k: v for k, v in ours.items() if k not in zero}, {k: v for k, v in ref.items() if k not in zero},
                base, f"inspire/{case}/{blocks_in_file}/MODEL")
    assert_same(bake(ours_clip.patcher), bake(ref_clip.patcher), base_clip, f"inspire/{case}/CLIP")
    assert "DB00" in table and ("SB04" in table)


@pytest.mark.parametrize("preset", ["FLUX-ALL", "FLUX-DBL-ALL", "FLUX-DBL-TAIL6", "FLUX-SINGLE-1to10"])
def test_inspire_flux_presets_verbatim(flux, tmp_path, preset):
    model, clip = flux
    state = lora_file(model, clip, seed=4)
    vector = blocks.list_presets("inspire", "flux")[preset]
    ours_model, _, _ = run_ours(model, clip, tmp_path, state, "", preset=f"inspire/{preset}")
    ref_model, _ = inspire_reference(model, clip, state, 0.8, 0.6, vector)
    base = {k: v.clone() for k, v in model.model.state_dict().items()}
    ours, ref = bake(ours_model), bake(ref_model)
    assert set(ours) == {k for k in ref if ref_model.patches.get(k)}
    assert_same(ours, {k: ref[k] for k in ours}, base, f"preset {preset}")


def test_named_syntax_and_elements_inside_fused_weights(flux, tmp_path):
    """`SB*.linear1_mlp=0` zeroes only the MLP rows of linear1; `SB*.linear2_mlp=0` only linear2's MLP columns;
    `DB01.txt=0` only the text stream of one double block."""
    model, clip = flux
    state = dw.kohya_flux(model, seed=5)
    vector = "DB00-DB01=0.5, SB*.linear1_mlp=0, SB*.linear2_mlp=0, DB01.txt=0, IN=0"
    ours, _, table = run_ours(model, clip, tmp_path, state, vector, mode="named", strengths=(1.0, 0.0))
    full, _, _ = run_ours(model, clip, tmp_path, state, "", mode="named", strengths=(1.0, 0.0))
    base = model.model.state_dict()
    h = model.model.diffusion_model.hidden_size
    got, whole = bake(ours), bake(full)
    delta = {k: got[k] - base[k] for k in got}
    full_delta = {k: whole[k] - base[k] for k in whole}
    l1 = "diffusion_model.single_blocks.1.linear1.weight"
    torch.testing.assert_close(delta[l1][:3 * h], full_delta[l1][:3 * h], rtol=1e-5, atol=1e-7)
    assert delta[l1][3 * h:].abs().max() == 0
    l2 = "diffusion_model.single_blocks.2.linear2.weight"
    torch.testing.assert_close(delta[l2][:, :h], full_delta[l2][:, :h], rtol=1e-5, atol=1e-7)
    assert delta[l2][:, h:].abs().max() == 0
    q = "diffusion_model.double_blocks.1.img_attn.qkv.weight"
    torch.testing.assert_close(delta[q], 0.5 * full_delta[q], rtol=1e-5, atol=1e-7)
    assert "diffusion_model.double_blocks.1.txt_attn.qkv.weight" not in delta
    assert "diffusion_model.double_blocks.2.txt_attn.qkv.weight" in delta
    assert ".linear1_mlp = 0" in table


def test_a1111_61_value_flux_layout(flux, tmp_path):
    """hako-mikan's Flux layout: CLIP, T5, IN, D00-D18, S00-S37, OUT; ids are by position, not ordinal."""
    vector = ",".join(["1", "0", "0"] + ["0.5"] * 19 + ["0"] * 38 + ["1"])
    w = blocks.resolve_vector(FLUX_DEV, "a1111", vector)
    assert w.factor("TE1") == 1 and w.factor("TE2") == 0 and w.factor("IN") == 0 and w.factor("OUT") == 1
    assert w.factor("DB18") == 0.5 and w.factor("SB00") == 0
    assert blocks.resolve_vector("flux", "a1111", "FLUXALL").factor("SB37") == 1
    with pytest.raises(LoraValueError, match="61 values, a Flux vector"):
        blocks.resolve_vector("sdxl", "a1111", vector)
    with pytest.raises(LoraValueError, match="the length of a sd1 vector|a SD vector|sd1"):
        blocks.resolve_vector("flux", "a1111", ",".join(["1"] * 17))


def test_merged_block_weighted_flux_stack_loads_to_the_stacks_weights(flux, tmp_path):
    """A block-weighted stack of a kohya and a diffusers-named Flux LoRA merged into one kohya file (exact) loads,
    in core and in our loader, to the weights the stack gave; metadata names the family."""
    model, clip = flux
    twin = dw.diffusers_flux_twin(depth=3, depth_single=5)
    a = dw.kohya_flux(model, seed=6)
    b, _ = dw.peft_flux(twin, seed=7)
    lw.save_safetensors(a, tmp_path / "a.safetensors")
    lw.save_safetensors(b, tmp_path / "b.safetensors")
    bw = node_module("block_weight")
    mix = node_module("mix")
    rows = block_stack_rows(enabled_1=True, lora_1="a.safetensors", strength_model_1=0.9, vector_1="DB*=0.5, SB03-SB04=0",
                enabled_2=True, lora_2="b.safetensors", strength_model_2=-0.7, vector_2="SB*.linear1_mlp=0.25")
    with loras_folder(tmp_path):
        stack = bw.LoRACoreBlockStack().build(0, 1.0, 1.0, False, **rows)[0]
        stacked, _, _ = bw.LoRACoreApplyBlockStack().apply(model, stack)
        path, report = mix.LoRACoreMergeSave().merge("exact", 0, 0.0, "flux_merge", False, "auto", "fp32",
                                                     block_stack=stack, model=model)["result"]
        merged = comfy.utils.load_torch_file(path, safe_load=True)
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            meta = handle.metadata()
        assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"
        assert all(k.startswith("lora_unet_") for k in merged)
        ours, _ = node_module("loader").LoRACoreLoaderModelOnly().load(model, "flux_merge.safetensors", 1.0)
    core_model, _ = comfy.sd.load_lora_for_models(model, None, merged, 1.0, 0.0)
    base = {k: v.clone() for k, v in model.model.state_dict().items()}
    want = bake(stacked)
    assert_same(bake(ours), want, base, "merged file in our loader")
    assert_same(bake(core_model), want, base, "merged file in core's loader")
