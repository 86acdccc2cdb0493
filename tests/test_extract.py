"""LoRA extraction (lora_core/extract.py, `lora-core extract`, the LoRACoreExtract node) against the real ComfyUI.

The tuned checkpoint is the base plus a known LoRA as ComfyUI core applies it (`comfy.sd.load_lora_for_models` +
`comfy.lora.calculate_weight`), written as an SD1 single-file checkpoint (`model.diffusion_model.`,
`cond_stage_model.transformer.`). References: the dense change tuned - base and its singular values from
`torch.linalg.svdvals` in float64 (Eckart-Young: the optimal rank-k error is the norm of the dropped singular
values); core's loader applying the extracted file.
"""
from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.comfy_host import import_comfy

import_comfy()

import comfy.lora  # noqa: E402
import comfy.sd  # noqa: E402

from lora_core import cli  # noqa: E402
from lora_core.checkpoint import open_checkpoint  # noqa: E402
from lora_core.errors import LoraValueError  # noqa: E402
from lora_core.extract import extract_files, extract_lora  # noqa: E402
from tests import dit_writers as dw  # noqa: E402
from tests import lora_writers as lw  # noqa: E402
from tests import tiny_models as tm  # noqa: E402
from tests.pack import loras_folder, node_module  # noqa: E402

KOHYA_UNET = ("transformer_blocks", "proj_in", "proj_out", "in_layers.2", "out_layers.3", "skip_connection",
              "emb_layers.1", "op", "conv")
RANK = 4


def _layers(module, parts):
    return {n: m for n, m in module.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(p in n for p in parts)}


def core_patched(model, clip, lora_sd, strength=1.0):
    """{host key: patched fp32 weight} of every key core's loader patches."""
    m, c = comfy.sd.load_lora_for_models(model, clip, lora_sd, strength, strength)
    out = {}
    for patcher, module in ((m, model.model), (c.patcher, clip.cond_stage_model) if c is not None else (None, None)):
        if patcher is None:
            continue
        state = module.state_dict()
        for key, patches in patcher.patches.items():
            out[key] = comfy.lora.calculate_weight(patches, state[key].float().clone(), key)
    return out, m, c


def sd1_checkpoint(model_sd: dict, clip_sd: dict) -> dict:
    """SD1 single-file naming: model.diffusion_model.* and cond_stage_model.transformer.* (HF CLIP-L)."""
    out = {"model." + k: v.contiguous() for k, v in model_sd.items()}
    for k, v in clip_sd.items():
        if k.startswith("clip_l.transformer."):
            out["cond_stage_model.transformer." + k[len("clip_l.transformer."):]] = v.contiguous()
    out["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4, 3, 3)   # a VAE tensor: not read
    return out


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    folder = tmp_path_factory.mktemp("extract")
    model, clip = tm.comfy_sd15(), tm.comfy_clip_sd15()
    unet = _layers(model.model.diffusion_model, KOHYA_UNET)
    te = _layers(clip.cond_stage_model.clip_l.transformer, (".encoder.layers.",))
    lora = lw.kohya_state_dict(unet, "lora_unet", rank=RANK, alpha=2.0, seed=1)
    lora.update(lw.kohya_state_dict(te, "lora_te", rank=RANK, alpha=3.0, seed=2))
    patched, tuned_model, tuned_clip = core_patched(model, clip, lora)
    msd, csd = model.model.state_dict(), clip.cond_stage_model.state_dict()
    tuned_msd = {k: patched.get(k, v) for k, v in msd.items()}
    tuned_csd = {k: patched.get(k, v) for k, v in csd.items()}
    save_file(sd1_checkpoint(msd, csd), str(folder / "base.safetensors"))
    save_file(sd1_checkpoint(tuned_msd, tuned_csd), str(folder / "tuned.safetensors"))
    return {"folder": folder, "model": model, "clip": clip, "lora": lora, "patched": patched,
            "base": {**msd, **csd}, "tuned_model": tuned_model, "tuned_clip": tuned_clip}


def extracted_weights(sd15, lora_sd, strength=1.0):
    patched, _, _ = core_patched(sd15["model"], sd15["clip"], lora_sd, strength)
    return patched


def test_full_rank_recovers_the_delta_in_core_and_ours(sd15, caplog):
    result = extract_files(sd15["folder"] / "base.safetensors", sd15["folder"] / "tuned.safetensors", rank=64)
    assert result.not_extracted == []
    assert any(prefix == "first_stage_model." for prefix, _ in result.skipped)
    with caplog.at_level(logging.WARNING):
        got = extracted_weights(sd15, result.tensors)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    want = sd15["patched"]
    assert set(got) == set(want)   # the same weights, every module of the known LoRA
    for key in want:
        delta = want[key] - sd15["base"][key].float()
        error = float((got[key] - want[key]).abs().max()) / float(delta.abs().max())
        assert error < 1e-5, (key, error)
    # -0.6: the extracted change scales like the original
    minus = extracted_weights(sd15, result.tensors, -0.6)
    original = extracted_weights(sd15, sd15["lora"], -0.6)
    for key in original:
        delta = original[key] - sd15["base"][key].float()
        assert float((minus[key] - original[key]).abs().max()) <= 1e-5 * float(delta.abs().max()), key
    # our loader reads the file too and lands on the same weights
    from lora_core.api import LoraRequest, plan_stack
    from lora_core.arch import bind_comfy_clip, bind_comfy_model, build_key_map
    from lora_core.engine import patch_weight
    from lora_core.types import LoraFile

    msd, csd = sd15["model"].model.state_dict(), sd15["clip"].cond_stage_model.state_dict()
    key_map = build_key_map(bind_comfy_model(msd, sd15["model"].model.model_config.unet_config), bind_comfy_clip(csd))
    base = {**msd, **csd}
    plan = plan_stack([LoraRequest(LoraFile("x", result.tensors), 1.0, 1.0)], key_map,
                      {k: v.shape for k, v in base.items()}, ("te1", "unet"))
    assert set(plan.patches) == set(want)
    for key, patches in plan.patches.items():
        ours = patch_weight(base[key].float().clone(), patches)
        delta = want[key] - base[key].float()
        assert float((ours - want[key]).abs().max()) <= 1e-5 * float(delta.abs().max()), key


def _optimal_error(delta: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(delta.double().reshape(delta.shape[0], -1))
    return float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())


def test_lower_rank_is_the_optimal_truncation(sd15):
    result = extract_files(sd15["folder"] / "base.safetensors", sd15["folder"] / "tuned.safetensors", rank=2,
                           conv_rank=1)
    got = extracted_weights(sd15, result.tensors)
    by_name = {m.name: m for m in result.modules}
    checked = 0
    for key, tuned in sd15["patched"].items():
        delta = tuned - sd15["base"][key].float()
        k = 1 if delta.ndim == 4 and delta.shape[2] > 1 else 2
        optimum = _optimal_error(delta, k)
        actual = float((got[key] - tuned).double().norm() / delta.double().norm())
        assert actual == pytest.approx(optimum, rel=1e-3, abs=1e-6), key
        # the report's error is the same number
        path = key[len("diffusion_model."):] if key.startswith("diffusion_model.") else key[len("clip_l.transformer."):]
        module = next(m for m in by_name.values() if m.path + ".weight" == path)
        assert module.rank == k
        assert module.rel_error == pytest.approx(optimum, rel=1e-3, abs=1e-6), key
        checked += 1
    assert checked == len(sd15["patched"]) == len(result.modules)
    groups = {(g["component"], g["kind"]): g for g in result.groups()}
    assert groups[("unet", "resnet_conv")]["ranks"] == [1, 2]   # 3x3 convs at conv_rank, 1x1 skips at rank
    assert groups[("te1", "te_attn")]["ranks"] == [2]


def test_target_error_picks_the_smallest_rank(sd15):
    base = open_checkpoint(sd15["folder"] / "base.safetensors")
    tuned = open_checkpoint(sd15["folder"] / "tuned.safetensors")
    result = extract_lora(base, tuned, rank=0, target_error=0.3, components=("unet",))
    assert {m.component for m in result.modules} == {"unet"}
    for module in result.modules:
        key = "model.diffusion_model." + module.path + ".weight"
        delta = (tuned.get(key).float() - base.get(key).float())
        s = torch.linalg.svdvals(delta.double().reshape(delta.shape[0], -1))
        errors = [float(s[k:].square().sum().sqrt() / s.square().sum().sqrt()) for k in range(len(s) + 1)]
        smallest = next(k for k, e in enumerate(errors) if e <= 0.3 + 1e-9)
        assert module.rank == max(1, smallest), module.name
        assert module.rel_error <= 0.3 + 1e-6
    meta = result.metadata
    assert meta["ss_network_dim"] == "Dynamic"
    assert json.loads(meta["lora_core.extract"])["target_error"] == 0.3


def test_conv_rank_zero_and_threshold_are_reported(sd15):
    result = extract_files(sd15["folder"] / "base.safetensors", sd15["folder"] / "tuned.safetensors", rank=4,
                           conv_rank=0)
    convs = [k for k, why in result.not_extracted if "conv_rank is 0" in why]
    assert convs and all(k.endswith(".weight") for k in convs)
    assert not any(".lora_down.weight" in k and result.tensors[k].ndim == 4 and result.tensors[k].shape[2] == 3
                   for k in result.tensors)
    # a threshold above every change leaves nothing: a clear error, no empty file
    with pytest.raises(LoraValueError, match="nothing to extract"):
        extract_files(sd15["folder"] / "base.safetensors", sd15["folder"] / "tuned.safetensors", rank=4,
                      threshold=1e9)


def test_metadata_is_kohyas(sd15):
    result = extract_files(sd15["folder"] / "base.safetensors", sd15["folder"] / "tuned.safetensors", rank=4)
    meta = result.metadata
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4"
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "4"}
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in result.tensors}
    assert all(n.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for n in names), sorted(names)[:5]
    for name in names:
        assert float(result.tensors[f"{name}.alpha"]) == result.tensors[f"{name}.lora_down.weight"].shape[0]


def test_command_and_node_write_the_same_file(sd15, tmp_path):
    out = tmp_path / "cli.safetensors"
    code = cli.main(["extract", str(sd15["folder"] / "base.safetensors"), str(sd15["folder"] / "tuned.safetensors"),
                     "--rank", "3", "-o", str(out), "--quiet"])
    assert code == 0
    nodes = node_module("extract")
    with loras_folder(tmp_path):
        path, report = nodes.LoRACoreExtract().extract(
            sd15["model"], sd15["tuned_model"], 3, "from_node", False, clip_base=sd15["clip"],
            clip_tuned=sd15["tuned_clip"])["result"]
        assert path == str(tmp_path / "from_node.safetensors")
        assert "relative error" in report
        with pytest.raises(Exception, match="already exists"):
            nodes.LoRACoreExtract().extract(sd15["model"], sd15["tuned_model"], 3, "from_node", False)
        with pytest.raises(Exception, match="outside|absolute"):
            nodes.LoRACoreExtract().extract(sd15["model"], sd15["tuned_model"], 3, "../escape", False)
    a, b = load_file(str(out)), load_file(path)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f1, safe_open(path, "pt") as f2:
        m1, m2 = f1.metadata(), f2.metadata()
    skip = {"modelspec.date", "modelspec.title", "ss_output_name", "lora_core.extract"}
    assert {k: v for k, v in m1.items() if k not in skip} == {k: v for k, v in m2.items() if k not in skip}
    e1, e2 = json.loads(m1["lora_core.extract"]), json.loads(m2["lora_core.extract"])
    assert e1["rank"] == e2["rank"] == 3
    assert e1["groups"] == e2["groups"], [(g1, g2) for g1, g2 in zip(e1["groups"], e2["groups"]) if g1 != g2][:2]


def test_command_exit_codes(sd15, tmp_path, capsys):
    base, tuned = str(sd15["folder"] / "base.safetensors"), str(sd15["folder"] / "tuned.safetensors")
    assert cli.main(["extract", base, str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "x.safetensors"),
                     "-q"]) == cli.EXIT_FILE
    assert "does not exist" in capsys.readouterr().err
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"x")
    assert cli.main(["extract", base, tuned, "-o", str(out), "-q"]) == cli.EXIT_EXISTS
    assert cli.main(["extract", base, tuned, "-o", str(tmp_path / "y.safetensors"), "--rank", "0", "-q"]) == \
        cli.EXIT_VALUE
    assert "rank is 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        cli.main(["extract", base])
    assert exited.value.code == cli.EXIT_USAGE
    # a checkpoint of another family: a mismatch, named
    flux = tm.comfy_flux()
    save_file({"model." + k: v.contiguous() for k, v in flux.model.state_dict().items()},
              str(tmp_path / "flux.safetensors"))
    assert cli.main(["extract", base, str(tmp_path / "flux.safetensors"), "-o", str(tmp_path / "z.safetensors"),
                     "-q"]) == cli.EXIT_MISMATCH
    assert "Flux" in capsys.readouterr().err
    # --json is machine-readable
    assert cli.main(["extract", base, tuned, "-o", str(tmp_path / "j.safetensors"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["arch"] == "SD1" and data["modules"] > 0 and data["groups"]


def test_flux_extraction_keeps_the_fused_layout(tmp_path):
    """A DiT: the extracted file names the fused weights as kohya does and core applies it to the same weights."""
    model = tm.comfy_flux()
    lora = dw.kohya_flux(model, rank=RANK, alpha=2.0, seed=3)
    patched, tuned_model, _ = core_patched(model, None, lora)
    msd = model.model.state_dict()
    save_file({"model." + k: v.contiguous() for k, v in msd.items()}, str(tmp_path / "b.safetensors"))
    save_file({"model." + k: patched.get(k, v).contiguous() for k, v in msd.items()},
              str(tmp_path / "t.safetensors"))
    result = extract_files(tmp_path / "b.safetensors", tmp_path / "t.safetensors", rank=16)
    assert result.arch.family.name == "flux"
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in result.tensors
    assert result.metadata["modelspec.architecture"].startswith("flux-1")
    got, _, _ = core_patched(model, None, result.tensors)
    assert set(got) == set(patched)
    for key in patched:
        delta = patched[key] - msd[key].float()
        assert float((got[key] - patched[key]).abs().max()) <= 1e-5 * float(delta.abs().max()), key


def test_pickled_checkpoints_are_read_weights_only(tmp_path, sd15):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x.weight": torch.zeros(2, 2)}, "x": Evil()}, str(path))
    assert cli.main(["extract", str(path), str(sd15["folder"] / "tuned.safetensors"), "-o",
                     str(tmp_path / "o.safetensors"), "-q"]) == cli.EXIT_FILE
    good = tmp_path / "base.ckpt"
    torch.save({"state_dict": load_file(str(sd15["folder"] / "base.safetensors"))}, str(good))
    result = extract_files(good, sd15["folder"] / "tuned.safetensors", rank=64)
    reference = extract_files(sd15["folder"] / "base.safetensors", sd15["folder"] / "tuned.safetensors", rank=64)
    assert result.tensors.keys() == reference.tensors.keys()
    assert pickle  # the module is used for the class above


def test_fast_top_directions_are_the_optimal_truncation():
    """Large matrices take the Gram / Rayleigh-Ritz path (lora_core.extract.top_singular): its rank-k product has
    the optimal error (singular values from float64 svdvals) and its factors are those of the thin SVD."""
    from lora_core.extract import FAST_SVD_MIN_SIDE, factor_difference, top_singular

    gen = torch.Generator().manual_seed(3)
    for m, n in ((FAST_SVD_MIN_SIDE + 88, 1500), (1400, FAST_SVD_MIN_SIDE + 20)):
        side = min(m, n)
        u = torch.linalg.qr(torch.randn(m, side, generator=gen))[0]
        v = torch.linalg.qr(torch.randn(n, side, generator=gen))[0]
        s = 1.0 / (1.0 + torch.arange(side, dtype=torch.float32) / 6.0)
        diff = (u * s) @ v.T
        for k in (1, 8, 40):
            up, down, kept, _, reported, _ = factor_difference(diff, k)
            assert kept == k and up.shape == (m, k) and down.shape == (k, n)
            exact = torch.linalg.svdvals(diff.double())
            optimum = float(exact[k:].square().sum().sqrt() / exact.square().sum().sqrt())
            actual = float((diff - up @ down).double().norm() / diff.double().norm())
            assert actual == pytest.approx(optimum, rel=1e-5)
            assert reported == pytest.approx(optimum, rel=1e-4)
        _, values, _ = top_singular(diff, 8)
        assert values.numel() < side   # the fast path ran
        assert torch.allclose(values[:8].double(), exact[:8], rtol=1e-5)


def to_openclip(hf: dict, prefix: str) -> dict:
    """HF-named CLIP tensors (`text_model.*`, `text_projection.weight`) in OpenCLIP's naming, the inverse of ComfyUI's
    `comfy.utils.clip_text_transformers_convert` (resblocks, fused attn.in_proj_weight = q | k | v, ln_1/ln_2,
    mlp.c_fc/c_proj, text_projection stored transposed): how SDXL single files hold OpenCLIP-G."""
    block = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    out, qkv = {}, {}
    for key, value in hf.items():
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
            continue
        rest = key[len("text_model."):]
        if rest == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif rest == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
        elif rest.startswith("final_layer_norm."):
            out[prefix + "ln_final." + rest.rsplit(".", 1)[1]] = value
        elif rest.startswith("encoder.layers."):
            _, _, layer, tail = rest.split(".", 3)
            module, param = tail.rsplit(".", 1)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((layer, param), {})[module[-6]] = value
            else:
                out[f"{prefix}transformer.resblocks.{layer}.{block[module]}.{param}"] = value
        else:
            out[prefix + key] = value
    for (layer, param), parts in qkv.items():
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts[x] for x in "qkv"])
    return out


def test_sdxl_single_file_with_openclip_g(tmp_path):
    """SDXL single files hold OpenCLIP-G in OpenCLIP's naming: read as HF (q/k/v thirds of in_proj) and extracted
    as kohya's lora_te2_; core applies the file to the same text-encoder weights as the known LoRA."""
    model, clip = tm.comfy_sdxl(), tm.comfy_clip_sdxl()
    lora = {}
    for attribute, prefix in (("clip_l", "lora_te1"), ("clip_g", "lora_te2")):
        layers = _layers(getattr(clip.cond_stage_model, attribute).transformer, (".encoder.layers.",))
        lora.update(lw.kohya_state_dict(layers, prefix, rank=RANK, alpha=2.0, seed=5))
    patched, _, _ = core_patched(model, clip, lora)
    csd = clip.cond_stage_model.state_dict()

    def single_file(weights):
        sd = {"model." + k: v.contiguous() for k, v in model.model.state_dict().items()}
        for attribute, target in (("clip_l", "conditioner.embedders.0.transformer."), ("clip_g", None)):
            hf = {k[len(attribute) + len(".transformer."):]: weights.get(k, v).contiguous() for k, v in csd.items()
                  if k.startswith(attribute + ".transformer.")}
            if target is not None:
                sd.update({target + k: v for k, v in hf.items()})
            else:
                sd.update(to_openclip(hf, "conditioner.embedders.1.model."))
        sd["conditioner.embedders.1.model.logit_scale"] = torch.tensor(1.0)
        return sd

    save_file(single_file({}), str(tmp_path / "b.safetensors"))
    save_file(single_file(patched), str(tmp_path / "t.safetensors"))
    result = extract_files(tmp_path / "b.safetensors", tmp_path / "t.safetensors", rank=64,
                           components=("te1", "te2"))
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_q_proj") for k in result.tensors)
    assert any("logit_scale" in why for _, why in result.skipped)
    got, _, _ = core_patched(model, clip, result.tensors)
    assert set(got) == set(patched)
    for key in patched:
        delta = patched[key] - csd[key].float()
        assert float((got[key] - patched[key]).abs().max()) <= 1e-5 * float(delta.abs().max()), key
