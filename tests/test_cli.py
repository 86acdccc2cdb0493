"""The `lora-core` command: inspect (JSON fields on files from each writer), convert (round trips, loading in core
and ours), merge / resize through the command, help and exit codes.

Writers are independent of the code under test (tests/lora_writers.py: kohya layout, LyCORIS, PEFT on diffusers'
classes; tests/dit_writers.py, sd3_writers.py, qwen_image_writers.py: kohya / musubi / PEFT with the naming
rules cited there). References for the loaded weights: ComfyUI core's loader (`comfy.sd.load_lora_for_models` +
`comfy.lora.calculate_weight`); where core cannot read a file (PEFT-named SD UNet attention) core reads the same
tensors renamed to its processor spelling. Block norms are recomputed here from the dense ΔW = s·U·D.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.comfy_host import REPO, import_comfy

import_comfy()

import comfy.lora  # noqa: E402
import comfy.sd  # noqa: E402

from lora_core import cli  # noqa: E402
from lora_core.api import LoraRequest, plan_stack  # noqa: E402
from lora_core.arch import bind_comfy_clip, bind_comfy_model, build_key_map, layout_key_map, get_arch  # noqa: E402
from lora_core.convert import convert_lora  # noqa: E402
from lora_core.engine import patch_weight  # noqa: E402
from lora_core.formats import parse_modules  # noqa: E402
from lora_core.types import LoraFile  # noqa: E402
from tests import dit_writers as dw  # noqa: E402
from tests import lora_writers as lw  # noqa: E402
from tests import qwen_image_writers as qw  # noqa: E402
from tests import sd3_writers as s3  # noqa: E402
from tests import tiny_models as tm  # noqa: E402
from tests import tiny_qwen_image as tq  # noqa: E402
from tests import tiny_sd3 as ts  # noqa: E402

KOHYA_UNET = ("transformer_blocks", "proj_in", "proj_out", "in_layers.2", "out_layers.3", "skip_connection",
              "emb_layers.1", "op", "conv")


def _layers(module, parts):
    return {n: m for n, m in module.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(p in n for p in parts)}


@pytest.fixture(scope="module")
def hosts():
    cache = {}

    def get(kind):
        if kind not in cache:
            if kind == "sd15":
                cache[kind] = (tm.comfy_sd15(), tm.comfy_clip_sd15())
            elif kind == "flux":
                cache[kind] = (tm.comfy_flux(), tm.comfy_clip_flux())
            elif kind == "chroma":
                cache[kind] = (tm.comfy_chroma(), tm.comfy_clip_chroma())
            elif kind == "sd3":
                cache[kind] = (ts.comfy_sd3(), None)
            elif kind == "qwen":
                cache[kind] = (tq.comfy_qwen_image(), None)
        return cache[kind]

    return get


def sd15_kohya(model, clip):
    state = lw.kohya_state_dict(_layers(model.model.diffusion_model, KOHYA_UNET), "lora_unet", rank=4, alpha=2.0,
                                seed=1)
    state.update(lw.kohya_state_dict(_layers(clip.cond_stage_model.clip_l.transformer, (".encoder.layers.",)),
                                     "lora_te", rank=4, alpha=3.0, seed=2))
    return state


def sd15_peft(model, clip):
    state = lw.peft_unet_state_dict(tm.diffusers_twin("sd15"), rank=4, alpha=8, seed=5, alpha_keys=True)
    state.update(lw.peft_text_encoder_state_dict(tm.transformers_clip_twin(32, 2), rank=4, alpha=8, seed=6,
                                                 alpha_keys=True))
    return state


def sd15_loha(model, clip):
    return lw.lycoris_state_dict(model.model.diffusion_model, "loha", prefix="lora_unet", rank=4, alpha=2.0, seed=3)


def flux_kohya(model, clip):
    state = dw.kohya_flux(model, rank=4, alpha=2.0, seed=3)
    state.update(dw.kohya_text_encoders(clip, {"clip_l": "lora_te1", "t5xxl": "lora_te3"}, rank=4, alpha=2.0, seed=4))
    return state


def flux_peft(model, clip):
    state, _ = dw.peft_flux(dw.diffusers_flux_twin(), rank=4, alpha=8, seed=7)
    return state


def chroma_native(model, clip):
    return dw.comfy_native(model, rank=4, alpha=2.0, seed=12)


def sd3_kohya(model, clip):
    return s3.kohya_sd3(model, rank=4, alpha=2.0, seed=8)


def qwen_musubi(model, clip):
    return qw.musubi(model, rank=4, alpha=2.0, seed=9)


# (host, writer, expected format, family, algorithms)
WRITERS = {
    "sd15-kohya": ("sd15", sd15_kohya, "kohya", "sd", {"lora"}),
    "sd15-peft": ("sd15", sd15_peft, "peft", "sd", {"lora"}),
    "sd15-lycoris-loha": ("sd15", sd15_loha, "lycoris", "sd", {"loha"}),
    "flux-kohya": ("flux", flux_kohya, "kohya", "flux", {"lora"}),
    "flux-peft": ("flux", flux_peft, "peft", "flux", {"lora"}),
    "chroma-comfy": ("chroma", chroma_native, "kohya", "flux", {"lora"}),
    "sd3-kohya": ("sd3", sd3_kohya, "kohya", "sd3", {"lora"}),
    "qwen-musubi": ("qwen", qwen_musubi, "kohya", "qwen_image", {"lora"}),
}
META = {"ss_tag_frequency": json.dumps({"10_sks dog": {"sks dog": 12, "grass": 3}, "5_other": {"grass": 4}}),
        "ss_learning_rate": "0.0001", "ss_network_dim": "4", "ss_network_alpha": "2", "ss_steps": "1500",
        "modelspec.trigger_phrase": "sks dog", "ss_optimizer": "AdamW8bit"}


def _dense_norm(module) -> float:
    """||s U D||_F built densely here (plain LoRA) or from LyCORIS' LoHa formula ((w1a w1b) * (w2a w2b))."""
    t = {k: v.double() for k, v in module.tensors.items()}
    if module.algo == "lora":
        up, down = t["up"].reshape(t["up"].shape[0], -1), t["down"].reshape(t["down"].shape[0], -1)
        scale = module.alpha / down.shape[0] if module.alpha is not None else 1.0
        return float((scale * (up @ down)).norm())
    if module.algo == "loha":
        rank = t["w1b"].shape[0]
        w = (t["w1a"] @ t["w1b"].reshape(rank, -1)) * (t["w2a"] @ t["w2b"].reshape(rank, -1))
        return float((module.alpha / rank * w).norm())
    raise AssertionError(module.algo)


@pytest.mark.parametrize("case", sorted(WRITERS))
def test_inspect_json_fields(case, hosts, tmp_path, capsys):
    kind, writer, fmt, family, algos = WRITERS[case]
    model, clip = hosts(kind)
    state = writer(model, clip)
    path = tmp_path / f"{case}.safetensors"
    save_file(state, str(path), metadata=META)
    assert cli.main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == fmt
    assert info["family"] == family
    assert set(info["algorithms"]) == algos
    parsed = parse_modules(LoraFile(str(path), state, META))
    assert info["modules"] == len(parsed.modules) and info["tensors"] == len(state)
    assert info["unmatched"] == [] and info["unused_keys"] == []
    # rank per module group, counted here from the tensors
    ranks = sum((sum(g["ranks"].values()) for g in info["groups"]), 0)
    assert ranks == (len(parsed.modules) if algos == {"lora"} else 0)
    assert all(set(g["ranks"]) <= {"4"} for g in info["groups"])
    # per-block ||ΔW|| = sqrt(Σ ||ΔW_m||²), ΔW_m built densely here; blocks by the family's layout
    assert info["variant"] in (None, info["layout"])
    key_map = layout_key_map(get_arch(info["layout"]))
    want: dict = {}
    for name, module in parsed.modules.items():
        block = key_map.resolve(name).block
        want[block] = want.get(block, 0.0) + _dense_norm(module) ** 2
    got = {b["block"]: b["norm"] for b in info["blocks"]}
    assert got.keys() == want.keys()
    for block, value in want.items():
        assert got[block] == pytest.approx(math.sqrt(value), rel=1e-5), block
    meta = info["metadata"]
    assert meta["trigger_words"][0] == "sks dog"
    assert meta["tag_frequencies"] == [["sks dog", 12], ["grass", 7]]
    assert meta["training"]["learning_rate"] == 0.0001 and meta["training"]["steps"] == 1500
    assert meta["training"]["optimizer"] == "AdamW8bit"
    # text output names the same facts
    assert cli.main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert info["family_title"] in text and "sks dog (12)" in text


def _checkpoint(model, clip, path):
    sd = {"model." + k: v.contiguous() for k, v in model.model.state_dict().items()}
    if clip is not None:
        for k, v in clip.cond_stage_model.state_dict().items():
            if k.startswith("clip_l.transformer."):
                sd["cond_stage_model.transformer." + k[len("clip_l.transformer."):]] = v.contiguous()
    save_file(sd, str(path))


def test_inspect_with_model_and_plot(hosts, tmp_path, capsys):
    model, clip = hosts("sd15")
    lora = tmp_path / "l.safetensors"
    save_file(sd15_kohya(model, clip), str(lora))
    ckpt = tmp_path / "sd15.safetensors"
    _checkpoint(model, clip, ckpt)
    png = tmp_path / "blocks.png"
    assert cli.main(["inspect", str(lora), "--model", str(ckpt), "--json", "--plot", str(png)]) == 0
    info = json.loads(capsys.readouterr().out)
    fit = info["fit"]
    assert fit["fits"] is True and fit["unmatched"] == []
    n_unet = sum(1 for k in load_file(str(lora)) if k.startswith("lora_unet_") and k.endswith(".lora_down.weight"))
    n_te = sum(1 for k in load_file(str(lora)) if k.startswith("lora_te_") and k.endswith(".lora_down.weight"))
    assert fit["applied"] == {"unet": n_unet, "te1": n_te}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a Flux LoRA on the SD1.5 checkpoint: the loader's refusal, exit code 4
    flux_model, flux_clip = hosts("flux")
    other = tmp_path / "flux.safetensors"
    save_file(dw.kohya_flux(flux_model), str(other))
    assert cli.main(["inspect", str(other), "--model", str(ckpt), "--json"]) == cli.EXIT_MISMATCH
    info = json.loads(capsys.readouterr().out)
    assert info["fit"]["fits"] is False and "Flux" in info["fit"]["error"]


# --------------------------------------------------------------------------------------------- convert

def core_weights(model, clip, state, strength=1.0):
    m, c = comfy.sd.load_lora_for_models(model, clip, state, strength, strength)
    out = {}
    pairs = [(m, model.model)] + ([(c.patcher, clip.cond_stage_model)] if clip is not None else [])
    for patcher, module in pairs:
        sd = module.state_dict()
        for key, patches in patcher.patches.items():
            out[key] = comfy.lora.calculate_weight(patches, sd[key].float().clone(), key)
    return out


def our_weights(model, clip, state, strength=1.0):
    msd = model.model.state_dict()
    bindings = [bind_comfy_model(msd, model.model.model_config.unet_config)]
    base = dict(msd)
    if clip is not None:
        csd = clip.cond_stage_model.state_dict()
        bindings.append(bind_comfy_clip(csd, bindings[0].arch))
        base.update(csd)
    key_map = build_key_map(*bindings)
    plan = plan_stack([LoraRequest(LoraFile("x", state), strength, strength)], key_map,
                      {k: v.shape for k, v in base.items()}, key_map.components)
    return {k: patch_weight(base[k].float().clone(), p) for k, p in plan.patches.items()}, base


def core_readable(state: dict) -> dict:
    """PEFT-named SD UNet attention in the processor spelling core 0.3.75 maps (`attn1.processor.to_q`,
    `to_out` without `.0`); the same tensors."""
    out = {}
    for key, value in state.items():
        if key.startswith("unet."):
            for proj in ("to_q", "to_k", "to_v"):
                key = key.replace(f".{proj}.", f".processor.{proj}.")
            key = key.replace(".to_out.0.", ".processor.to_out.")
        if key.startswith("transformer.distilled_guidance_layer."):   # Chroma's approximator: core reads ComfyUI's
            key = "diffusion_model." + key[len("transformer."):]   # names (diffusers' linear_1 / linear_2 are
            key = key.replace(".linear_1.", ".in_layer.").replace(".linear_2.", ".out_layer.")   # in / out_layer)
        if key.startswith("text_encoder_2.encoder."):   # Flux's T5 in diffusers naming: core reads ComfyUI's
            key = "text_encoders.t5xxl.transformer." + key[len("text_encoder_2."):]
        out[key] = value
    return out


def assert_same(got: dict, want: dict, base: dict):
    """Equal to 1e-5 of the change, or to two fp32 ulps of the weight where the change is that small (LoHa's
    products of small factors: one rounding of W + ΔW is already more)."""
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:5]
    eps = torch.finfo(torch.float32).eps
    for key in want:
        delta = want[key] - base[key].float()
        tolerance = 1e-5 * float(delta.abs().max()) + 2 * eps * float(base[key].float().abs().max())
        assert float((got[key] - want[key]).abs().max()) <= tolerance, key


ROUND_TRIPS = [("sd15-kohya", "diffusers"), ("sd15-kohya", "comfy"), ("sd15-peft", "kohya"),
               ("sd15-lycoris-loha", "comfy"), ("flux-kohya", "diffusers"), ("flux-kohya", "comfy"),
               ("flux-peft", "kohya"), ("chroma-comfy", "diffusers"), ("sd3-kohya", "diffusers"), ("qwen-musubi", "diffusers")]
SOURCE_CONVENTION = {"sd15-kohya": "kohya", "sd15-peft": "diffusers", "sd15-lycoris-loha": "kohya",
                     "flux-kohya": "kohya", "flux-peft": "diffusers", "chroma-comfy": "comfy", "sd3-kohya": "kohya", "qwen-musubi": "kohya"}


@pytest.mark.parametrize("case,to", ROUND_TRIPS)
def test_convert_round_trip_and_loading(case, to, hosts, tmp_path, capsys):
    kind, writer, _, _, _ = WRITERS[case]
    model, clip = hosts(kind)
    state = writer(model, clip)
    src = tmp_path / "a.safetensors"
    save_file(state, str(src), metadata={"ss_output_name": "x", "modelspec.trigger_phrase": "sks"})
    mid, back = tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    # SD3's names depend on the depth (diffusers swaps the last block's context modulation): the tiny model's own
    # layout, from its checkpoint; the others are converted on the full-size layout, scaled to the file's width
    extra = []
    if kind == "sd3":
        _checkpoint(model, None, tmp_path / "model.safetensors")
        extra = ["--model", str(tmp_path / "model.safetensors")]
    assert cli.main(["convert", str(src), "--to", to, "-o", str(mid), "--json", *extra]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["to"] == to and report["modules_in"] > 0
    assert cli.main(["convert", str(mid), "--to", SOURCE_CONVENTION[case], "-o", str(back), *extra]) == 0
    capsys.readouterr()
    converted, returned = load_file(str(mid)), load_file(str(back))
    # A -> B -> A: the same keys and bit-equal tensors
    assert returned.keys() == state.keys(), sorted(set(returned) ^ set(state))[:6]
    for key in state:
        assert returned[key].dtype == state[key].dtype and torch.equal(returned[key], state[key]), key
    from safetensors import safe_open

    with safe_open(str(mid), "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_output_name"] == "x" and meta["modelspec.trigger_phrase"] == "sks"
    assert json.loads(meta["lora_core.convert"])["to"] == to
    if to == "diffusers" and kind in ("flux", "sd3"):
        assert any(".attn.to_q.lora_A.weight" in k for k in converted)   # fused qkv split as diffusers holds it
    # the converted file loads in our loader to the same weights as the original in core (and in core itself)
    want = core_weights(model, clip, core_readable(state) if case == "sd15-peft" else state)
    ours, base = our_weights(model, clip, converted)
    assert_same(ours, want, base)
    readable = core_readable(converted) if to == "diffusers" else converted
    assert_same(core_weights(model, clip, readable), want, base)
    minus = core_weights(model, clip, core_readable(state) if case == "sd15-peft" else state, -0.6)
    assert_same(our_weights(model, clip, converted, -0.6)[0], minus, base)


def test_convert_fuses_split_parts_exactly(hosts, tmp_path):
    """diffusers to_q / to_k / to_v with different downs and alphas -> one kohya qkv module: block-stacked; with
    different alpha/rank ratios the scales are folded into up (exact to rounding) and the module applies the same."""
    model, clip = hosts("flux")
    state, _ = dw.peft_flux(dw.diffusers_flux_twin(), rank=4, alpha=8, seed=11,
                            targets=("to_q", "to_k", "to_v"))
    for key in list(state):
        if key.endswith(".lora_A.weight"):
            scale = 2.0 if ".to_k." in key else 3.0
            state[key[: -len(".lora_A.weight")] + ".alpha"] = torch.tensor(scale * 4)
    result = convert_lora(LoraFile("x", state), "kohya")
    assert result.fused > 0 and result.rescaled > 0
    fused = result.tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    assert fused.shape[0] == 12   # three rank-4 parts
    want = core_weights(model, None, state)
    got, base = our_weights(model, None, result.tensors)
    assert_same(got, want, base)
    assert_same(core_weights(model, None, result.tensors), want, base)


def test_convert_refuses_what_it_cannot_do_exactly(hosts, tmp_path, capsys):
    model, clip = hosts("flux")
    loha = lw.lycoris_state_dict(model.model.diffusion_model, "loha", prefix="lora_unet", rank=4, alpha=2.0, seed=1,
                                 target_module=("Linear",))
    path = tmp_path / "loha.safetensors"
    save_file({k: v for k, v in loha.items() if "double_blocks_0_img_attn_qkv" in k}, str(path))
    assert cli.main(["convert", str(path), "--to", "diffusers", "-o", str(tmp_path / "o.safetensors")]) == \
        cli.EXIT_VALUE
    err = capsys.readouterr().err
    assert "double_blocks_0_img_attn_qkv" in err and "kohya or comfy" in err
    assert not (tmp_path / "o.safetensors").exists()
    # renaming it whole is fine
    assert cli.main(["convert", str(path), "--to", "comfy", "-o", str(tmp_path / "c.safetensors")]) == 0
    assert "diffusion_model.double_blocks.0.img_attn.qkv.hada_w1_a" in load_file(str(tmp_path / "c.safetensors"))


# --------------------------------------------------------------------------------------------- merge / resize / misc

def test_merge_and_resize_through_the_command(hosts, tmp_path, capsys):
    from lora_core import mix
    from lora_core.io import read_lora_file

    model, clip = hosts("sd15")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(sd15_kohya(model, clip), str(a))
    save_file(lw.kohya_state_dict(_layers(model.model.diffusion_model, ("attn2",)), "lora_unet", rank=2, alpha=1.0,
                                  seed=9), str(b))
    out = tmp_path / "m.safetensors"
    assert cli.main(["merge", f"{a}:0.8", f"{b}:1.0:0.5", "--blocks", "2=named:IN*=0,OUT*=1", "-o", str(out),
                     "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mode"] == "exact" and data["modules"] > 0
    # the library call with the same requests gives the same tensors
    from lora_core import blocks

    ra, rb = read_lora_file(str(a)), read_lora_file(str(b))
    weights = blocks.resolve_for_lora(layout_key_map(get_arch("sd1")), rb, "named", "IN*=0,OUT*=1")
    lib = mix.merge_loras([LoraRequest(ra, 0.8, 0.8, name="a.safetensors"),
                           LoraRequest(rb, 1.0, 0.5, block_weights=weights, name="b.safetensors")])
    written = load_file(str(out))
    assert written.keys() == lib.tensors.keys()
    assert all(torch.equal(written[k], lib.tensors[k]) for k in written)
    assert not any("input_blocks" in k and "attn2" in k and k.endswith(".lora_up.weight") and written[k].shape[1] > 4
                   for k in written)   # LoRA b's IN blocks were weighted 0
    small = tmp_path / "r.safetensors"
    assert cli.main(["resize", str(a), "--rank", "2", "-o", str(small), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["max_rank"] == 2
    assert cli.main(["resize", str(a), "--rank", "2", "-o", str(small)]) == cli.EXIT_EXISTS
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["merge", str(a), "--blocks", "x", "-o", str(tmp_path / "z.safetensors")]) == cli.EXIT_USAGE


def test_help_and_module_entry_point(tmp_path):
    for command in ("inspect", "convert", "merge", "resize", "extract"):
        with pytest.raises(SystemExit) as exited:
            cli.main([command, "--help"])
        assert exited.value.code == 0
    done = subprocess.run([sys.executable, "-m", "lora_core", "inspect", str(tmp_path / "nope.safetensors")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == cli.EXIT_FILE and "does not exist" in done.stderr
    done = subprocess.run([sys.executable, "-m", "lora_core"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == cli.EXIT_USAGE
    assert 'lora-core = "lora_core.cli:main"' in (REPO / "pyproject.toml").read_text()
