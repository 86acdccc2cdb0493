"""Mixing and export (lora_core/mix.py, nodes/mix.py) against the real ComfyUI 0.3.75 host.

References are independent of the code under test wherever one exists: ComfyUI core's own LoRA loader
(`comfy.sd.load_lora_for_models` + `comfy.lora.calculate_weight`) applies the N source files and the merged
file; torch.linalg.svdvals of the dense change gives the optimal truncation error (Eckart-Young). Where core
has no equivalent (block factors, DoRA per the trainers' formula) the reference is lora_core's patch engine
applying the sources one by one, and core then applies the merged file.
"""
from __future__ import annotations

import json
import logging
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.comfy_host import import_comfy

import_comfy()

import comfy.lora  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

from lora_core import mix  # noqa: E402
from lora_core.api import LoraRequest, plan_stack  # noqa: E402
from lora_core.arch import SD1, SDXL, bind_comfy_clip, bind_comfy_model, build_key_map  # noqa: E402
from lora_core.engine import patch_weight  # noqa: E402
from lora_core.errors import LoraFileError, LoraMatchError, LoraValueError  # noqa: E402
from lora_core.io import read_lora_file  # noqa: E402
from lora_core.types import LoraFile  # noqa: E402
from tests import lora_writers as lw  # noqa: E402
from tests import tiny_models as tm  # noqa: E402
from tests.pack import loras_folder, node_module  # noqa: E402

TOL = 1e-5
CORE_WARNINGS = ("lora key not loaded", "NOT LOADED", "SHAPE MISMATCH")
KOHYA_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", ".alpha", ".diff", ".diff_b",
                  ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b")
UNET_LINEAR = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TE_LINEAR = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


# --------------------------------------------------------------------------------------------- helpers

class Host:
    """A tiny ComfyUI MODEL + CLIP and what lora_core needs to patch them (key map, shapes, base weights)."""

    def __init__(self, model, clip):
        self.model, self.clip = model, clip
        self.msd = model.model.state_dict()
        self.csd = clip.cond_stage_model.state_dict()
        self.base = {**self.msd, **self.csd}
        self.shapes = {k: v.shape for k, v in self.base.items()}
        self.key_map = build_key_map(bind_comfy_model(self.msd, model.model.model_config.unet_config),
                                     bind_comfy_clip(self.csd))

    def unet_modules(self, suffixes=UNET_LINEAR, convs=()):
        """{LDM path: module} of the UNet's Linear layers ending in `suffixes` and Conv2d layers ending in `convs`."""
        found = {}
        for path, module in self.model.model.diffusion_model.named_modules():
            if isinstance(module, torch.nn.Linear) and path.endswith(tuple(suffixes)):
                found[path] = module
            elif isinstance(module, torch.nn.Conv2d) and convs and path.endswith(tuple(convs)):
                found[path] = module
        return found

    def te_modules(self, attr="clip_l"):
        encoder = getattr(self.clip.cond_stage_model, attr).transformer
        return {p: m for p, m in encoder.named_modules() if isinstance(m, torch.nn.Linear) and p.endswith(TE_LINEAR)}

    def ours(self, requests, key_map=None):
        """Patched weights of every touched tensor, sources applied by lora_core's engine (fp32)."""
        plan = plan_stack(requests, key_map or self.key_map, self.shapes, ("te1", "te2", "unet"))
        return {k: patch_weight(self.base[k].float().clone(), p) for k, p in plan.patches.items()}

    def core(self, files, caplog=None):
        """Patched weights from ComfyUI core's loader: files = [(state dict, strength_model, strength_clip)]."""
        model, clip = self.model, self.clip
        if caplog is not None:
            caplog.clear()
        with caplog.at_level(logging.WARNING) if caplog is not None else _nullcontext():
            for sd, strength_model, strength_clip in files:
                model, clip = comfy.sd.load_lora_for_models(model, clip, sd, strength_model, strength_clip)
        if caplog is not None:
            bad = [r.getMessage() for r in caplog.records if any(w in r.getMessage() for w in CORE_WARNINGS)]
            assert not bad, bad[:5]
        out = {}
        for patcher, sd in ((model, self.msd), (clip.patcher, self.csd)):
            for key, patches in patcher.patches.items():
                out[key] = comfy.lora.calculate_weight(patches, sd[key].float().clone(), key)
        return out

    def core_key_map(self):
        key_map = comfy.lora.model_lora_keys_unet(self.model.model, {})
        return comfy.lora.model_lora_keys_clip(self.clip.cond_stage_model, key_map)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def max_error(got: dict, want: dict) -> float:
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))[:5]
    return max(float((got[k] - want[k]).abs().max()) for k in want)


def module_names(tensors) -> set:
    names = set()
    for key in tensors:
        for suffix in KOHYA_SUFFIXES:
            if key.endswith(suffix):
                names.add(key[: -len(suffix)])
                break
        else:
            raise AssertionError(f"unexpected key {key}")
    return names


def peft_unet_sd(host: Host, paths, rank=3, alpha=6.0, seed=5) -> dict:
    """A diffusers/PEFT-named UNet LoRA (`unet.<diffusers path>.lora_A.weight`, `.alpha`), with the diffusers
    names taken from ComfyUI's own LDM <-> diffusers table."""
    to_diffusers = {v: k for k, v in comfy.utils.unet_to_diffusers(host.model.model.model_config.unet_config).items()}
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for path in paths:
        weight = host.msd[f"diffusion_model.{path}.weight"]
        name = "unet." + to_diffusers[f"{path}.weight"][: -len(".weight")]
        sd[f"{name}.lora_A.weight"] = 0.1 * torch.randn(rank, weight.shape[1], generator=gen)
        sd[f"{name}.lora_B.weight"] = 0.1 * torch.randn(weight.shape[0], rank, generator=gen)
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


def lf(sd, label):
    return LoraFile(label, dict(sd))


# --------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Hundreds of tiny SVDs: with 2 OpenMP threads on a busy 2-core machine they take 30x longer (thread
    contention), so this module runs torch single-threaded and restores the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd15():
    return Host(tm.comfy_sd15(), tm.comfy_clip_sd15())


@pytest.fixture(scope="module")
def sd15_sources(sd15):
    """Three low-rank sources in three formats: kohya LoRA + LoCon (Tucker conv) + TE, old kohya without alpha,
    diffusers/PEFT names. Different ranks, overlapping targets."""
    convs = sd15.unet_modules(suffixes=(), convs=("in_layers.2", "skip_connection", "proj_in"))
    a = {**lw.kohya_state_dict({**sd15.unet_modules(), **convs}, "lora_unet", rank=4, alpha=2.0, seed=1,
                               tucker=True),
         **lw.kohya_state_dict(sd15.te_modules(), "lora_te", rank=4, alpha=3.0, seed=2)}
    b = lw.kohya_state_dict(dict(list(sd15.unet_modules(("to_q", "to_v", "ff.net.2")).items())
                                 + list(convs.items())[::2]), "lora_unet", rank=8, alpha=None, seed=3)
    b.update(lw.kohya_state_dict(dict(list(sd15.te_modules().items())[::3]), "lora_te", rank=2, alpha=1.0, seed=4))
    c = peft_unet_sd(sd15, [p for p in sd15.unet_modules(("attn2.to_k", "attn1.to_out.0", "ff.net.0.proj"))])
    return [(a, 0.8, 0.5), (b, -0.6, 1.2), (c, 1.3, 0.0)]


def requests_of(sources, labels="abc"):
    return [LoraRequest(lf(sd, f"{labels[i]}.safetensors"), sm, sc, name=labels[i])
            for i, (sd, sm, sc) in enumerate(sources)]


# --------------------------------------------------------------------------------------------- exact mode

def test_exact_merge_round_trips_through_core_loader(sd15, sd15_sources, tmp_path, caplog):
    """File level (no model): 3 sources in 3 formats -> one kohya file; core applying that file at strength 1
    equals core applying the 3 sources with their strengths, to 1e-5, with every key loaded and matched."""
    result = mix.merge_loras(requests_of(sd15_sources), mode="exact", save_dtype=torch.float32)
    assert result.arch is SD1  # auto-detected from the files
    path = mix.save_mix(result, tmp_path / "merged.safetensors")
    merged = load_file(path)

    names = module_names(merged)
    assert names == set(layer.name for layer in result.layers)
    assert all(n.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for n in names)
    assert names <= set(sd15.core_key_map()), sorted(names - set(sd15.core_key_map()))[:5]
    # rank concatenation: a target hit by a (rank 4) and b (rank 8) stores rank 12 and alpha 12 (scale 1)
    both = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    assert merged[f"{both}.lora_down.weight"].shape[0] == 12 and float(merged[f"{both}.alpha"]) == 12.0
    # conv LoCon (Tucker mid folded in): kohya conv layout down (r, in, 3, 3), up (out, r, 1, 1)
    conv = "lora_unet_input_blocks_1_0_in_layers_2"
    assert merged[f"{conv}.lora_down.weight"].dim() == 4 and merged[f"{conv}.lora_down.weight"].shape[2:] == (3, 3)
    assert merged[f"{conv}.lora_up.weight"].shape[2:] == (1, 1)

    # Core cannot load `c` itself (its key map knows diffusers UNet names only in the old processor form), so
    # the 3-source reference is lora_core's engine applying the sources; core applies the merged file.
    want = sd15.ours(requests_of(sd15_sources))
    got = sd15.core([(merged, 1.0, 1.0)], caplog)
    error = max_error(got, want)
    assert error < TOL, error
    # Fully independent of lora_core: core applying the two kohya sources vs core applying their merge.
    ab = mix.merge_loras(requests_of(sd15_sources[:2]), mode="exact", save_dtype=torch.float32)
    assert max_error(sd15.core([(ab.tensors, 1.0, 1.0)], caplog), sd15.core(sd15_sources[:2])) < TOL


def test_exact_merge_with_model_matches_file_level(sd15, sd15_sources):
    """With the model's key map and shapes the same tensors come out as on file level."""
    file_level = mix.merge_loras(requests_of(sd15_sources), mode="exact", arch="sd1", save_dtype=torch.float32)
    hosted = mix.merge_loras(requests_of(sd15_sources), mode="exact", key_map=sd15.key_map, shapes=sd15.shapes,
                             base_weights=sd15.base, save_dtype=torch.float32)
    assert set(hosted.tensors) == set(file_level.tensors)
    for key, tensor in hosted.tensors.items():
        assert tensor.shape == file_level.tensors[key].shape, key
        assert torch.equal(tensor, file_level.tensors[key]), key


def test_exact_merge_bakes_block_factors(sd15, sd15_sources, caplog):
    """Block factors are folded into the merged file: core applying it equals lora_core applying the sources
    with strength x block factor (core has no block weights, so lora_core's engine is the reference)."""
    from lora_core import blocks

    requests = requests_of(sd15_sources)
    requests[0].block_weights = blocks.resolve_vector(SD1, "named", "IN01=0.25, OUT03-OUT05=0, TE1=0.5, M00=-1")
    requests[1].block_weights = blocks.resolve_vector(SD1, "named", "IN04=0, IN01=2")
    result = mix.merge_loras(requests, mode="exact", save_dtype=torch.float32)
    want = sd15.ours(requests)
    got = sd15.core([(result.tensors, 1.0, 1.0)], caplog)
    assert max_error(got, want) < TOL
    # a factor of 0 on OUT03-OUT05 for `a` (rank 4) leaves only `b` (rank 8) or `c` (rank 3) there
    out3 = [n for n in module_names(result.tensors) if n.startswith("lora_unet_output_blocks_3_1_")]
    assert out3
    for name in out3:
        assert result.tensors[f"{name}.lora_down.weight"].shape[0] in (3, 8), name
    sources = json.loads(result.metadata["lora_core.sources"])["sources"]
    assert sources[0]["block_weights"]["factors"]["OUT04"] == 0.0
    assert sources[0]["block_weights"]["factors"]["IN01"] == 0.25


def test_non_lowrank_sources_become_exact_diffs(sd15, caplog):
    """LoHa (LyCORIS) + kohya, partly on the same targets: a target with a LoHa is stored as one `diff` (ComfyUI
    keeps one adapter per module name); core applying the file equals core applying both sources."""
    unet = sd15.model.model.diffusion_model
    # LoHa on every conv (stored flat (out, in*k*k) by LyCORIS: the merged diff must get the kernel shape back)
    loha = lw.lycoris_state_dict(unet, "loha", prefix="lora_unet", rank=3, alpha=1.5, seed=7,
                                 target_module=("Conv2d",))
    loha.update(lw.lycoris_state_dict(unet.input_blocks[1][1], "loha", rank=2, seed=17,
                                      prefix="lora_unet_input_blocks_1_1"))
    kohya = lw.kohya_state_dict(sd15.unet_modules(("attn1.to_q", "ff.net.2")), "lora_unet", rank=4, seed=8)
    # bias deltas (diff_b) ride along with a module's weight adapter, in both formats
    for name in [k[: -len(".alpha")] for k in kohya if k.endswith("ff_net_2.alpha")][:3]:  # to_q has no bias
        out = kohya[f"{name}.lora_up.weight"].shape[0]
        kohya[f"{name}.diff_b"] = 0.05 * torch.randn(out, generator=torch.Generator().manual_seed(len(name)))
    sources = [(loha, 0.7, 0.0), (kohya, -1.1, 0.0)]
    result = mix.merge_loras(requests_of(sources, "lk"), mode="exact", arch="sd1", save_dtype=torch.float32)
    loha_modules = {k.rsplit(".", 1)[0] for k in loha}
    for layer in result.layers:   # any LoHa on a target -> one full diff; kohya alone -> concatenated ranks
        assert layer.storage == ("diff" if layer.name in loha_modules else "lowrank"), layer.name
    assert {layer.storage for layer in result.layers} == {"diff", "lowrank"}
    assert sum(k.endswith(".diff_b") for k in result.tensors) == 3
    want = sd15.core(sources)
    assert sum(k.endswith(".bias") for k in want) == 3
    assert max_error(sd15.core([(result.tensors, 1.0, 1.0)], caplog), want) < TOL


def test_weight_dependent_sources_need_the_base_model(sd15, caplog):
    """DoRA: refused on file level with a message naming the fix; with base weights stored as an exact diff."""
    unet = sd15.model.model.diffusion_model
    dora = lw.lycoris_state_dict(unet, "lora", prefix="lora_unet", rank=4, alpha=4.0, seed=9, dora=True,
                                 target_module=("Linear",))
    assert any(k.endswith(".dora_scale") for k in dora)
    requests = requests_of([(dora, 0.6, 0.0)], "d")
    with pytest.raises(LoraValueError, match="base model"):
        mix.merge_loras(requests, mode="exact", arch="sd1")
    with pytest.raises(LoraValueError, match="base model"):
        mix.merge_loras(requests, mode="exact", key_map=sd15.key_map, shapes=sd15.shapes)
    result = mix.merge_loras(requests, mode="exact", key_map=sd15.key_map, shapes=sd15.shapes,
                             base_weights=sd15.base, save_dtype=torch.float32)
    assert {layer.storage for layer in result.layers} == {"diff"}
    assert max_error(sd15.core([(result.tensors, 1.0, 1.0)], caplog), sd15.ours(requests)) < TOL


# --------------------------------------------------------------------------------------------- svd mode

def _delta_by_key(host: Host, requests, key_map=None):
    return {k: w - host.base[k].float() for k, w in host.ours(requests, key_map).items()}


def test_svd_error_falls_with_rank_and_matches_optimum(sd15, sd15_sources):
    requests = requests_of(sd15_sources)
    exact = _delta_by_key(sd15, requests)
    total = math.sqrt(sum(float(d.square().sum()) for d in exact.values()))
    # Optimal (Eckart-Young) error per rank from the dense change's singular values.
    svals = {k: torch.linalg.svdvals(d.reshape(d.shape[0], -1)) for k, d in exact.items()}
    errors = []
    for rank in (1, 3, 6, 16):
        result = mix.merge_loras(requests, mode="svd", rank=rank, save_dtype=torch.float32)
        for layer in result.layers:
            assert layer.rank <= rank
            assert result.tensors[f"{layer.name}.lora_down.weight"].shape[0] <= rank
            assert float(result.tensors[f"{layer.name}.alpha"]) == layer.rank
        got = _delta_by_key(sd15, [LoraRequest(LoraFile("svd", result.tensors), 1.0, 1.0)])
        assert got.keys() == exact.keys()
        error = math.sqrt(sum(float((got[k] - exact[k]).square().sum()) for k in exact)) / total
        optimum = math.sqrt(sum(float(s[rank:].square().sum()) for s in svals.values())) / total
        assert error == pytest.approx(optimum, rel=1e-3, abs=1e-6), (rank, error, optimum)
        errors.append(error)
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-5  # rank 16 >= every layer's full rank (4 + 8 + 3 at most)


def test_svd_energy_keeps_the_fewest_directions(sd15, sd15_sources):
    requests = requests_of(sd15_sources)
    exact = _delta_by_key(sd15, requests)
    shares = {}
    for key, delta in exact.items():
        s2 = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1)).square()
        shares[key] = torch.cumsum(s2, 0) / s2.sum()
    for energy in (0.5, 0.99):
        result = mix.merge_loras(requests, mode="svd", energy=energy, arch="sd1")
        assert len(result.layers) == len(exact)
        for layer in result.layers:
            share = shares[sd15.key_map.resolve(layer.name).host_key]
            assert float(share[layer.rank - 1]) >= energy - 1e-6
            assert layer.rank == 1 or float(share[layer.rank - 2]) < energy
            assert layer.kept_energy == pytest.approx(float(share[layer.rank - 1]), abs=1e-5)
    # rank and energy together: the smaller wins
    both = mix.merge_loras(requests, mode="svd", energy=0.999, rank=2, arch="sd1")
    assert max(layer.rank for layer in both.layers) == 2


def test_resize_lora_conv_shapes_and_report(sd15):
    convs = sd15.unet_modules(suffixes=(), convs=("in_layers.2", "out_layers.3"))
    sd = lw.kohya_state_dict(convs, "lora_unet", rank=8, alpha=4.0, seed=11)
    result = mix.resize_lora(lf(sd, "big.safetensors"), rank=3, arch="sd1", save_dtype=torch.float32)
    for layer in result.layers:
        down = result.tensors[f"{layer.name}.lora_down.weight"]
        up = result.tensors[f"{layer.name}.lora_up.weight"]
        assert down.shape[0] == 3 and down.dim() == 4 and down.shape[2:] == (3, 3)
        assert up.shape[1:] == (3, 1, 1)
        assert 0.0 < layer.kept_energy < 1.0 and layer.full_rank == 8
    text = result.text()
    assert "kept energy" in text and f"{result.layers[0].name}: 3/8," in text


# --------------------------------------------------------------------------------------------- SDXL naming

@pytest.fixture(scope="module")
def sdxl():
    return Host(tm.comfy_sdxl(), tm.comfy_clip_sdxl())


def test_sdxl_merge_names_load_in_core(sdxl, tmp_path, caplog):
    """SDXL: te1/te2 kohya names, text_projection under ComfyUI's generic name; all keys load in core."""
    first = {**lw.kohya_state_dict(sdxl.unet_modules(("attn2.to_k", "proj_in", "ff.net.2")), "lora_unet", seed=12),
             **lw.kohya_state_dict(sdxl.te_modules("clip_l"), "lora_te1", seed=13),
             **lw.kohya_state_dict(sdxl.te_modules("clip_g"), "lora_te2", rank=2, seed=14)}
    proj = sdxl.clip.cond_stage_model.clip_g.transformer.text_projection
    second = {**lw.kohya_state_dict({"text_projection": proj}, "lora_te2", rank=3, seed=15),
              **lw.kohya_state_dict(sdxl.unet_modules(("attn2.to_k",)), "lora_unet", rank=5, seed=16)}
    sources = [(first, 0.9, 0.4), (second, 0.5, 1.5)]
    result = mix.merge_loras(requests_of(sources), mode="exact", save_dtype=torch.float32)
    assert result.arch is SDXL
    assert result.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert result.metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    names = module_names(result.tensors)
    assert any(n.startswith("lora_te1_text_model_encoder_layers_") for n in names)
    assert any(n.startswith("lora_te2_text_model_encoder_layers_") for n in names)
    assert "text_encoders.clip_g.transformer.text_projection" in names
    assert names <= set(sdxl.core_key_map())
    merged = load_file(mix.save_mix(result, tmp_path / "xl.safetensors"))
    assert max_error(sdxl.core([(merged, 1.0, 1.0)], caplog), sdxl.core(sources)) < TOL


def test_sd2_single_text_encoder_naming(caplog):
    """SD2: OpenCLIP-H is the only text encoder, named lora_te_ like SD1; UNet-only names are shared with SD1, so
    auto detection reads the linear proj_in / 1024-wide context off the shapes."""
    host = Host(tm.comfy_sd2(), tm.comfy_clip_sd2())
    sd = {**lw.kohya_state_dict(host.unet_modules(("proj_in", "attn1.to_q", "ff.net.2")), "lora_unet", seed=21),
          **lw.kohya_state_dict(host.te_modules("clip_h"), "lora_te", rank=2, seed=22)}
    result = mix.merge_loras(requests_of([(sd, 0.7, 1.1)]), mode="svd", rank=3, save_dtype=torch.float32)
    assert result.arch.name == "SD2" and result.metadata["ss_base_model_version"] == "sd_v2"
    assert result.metadata["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    names = module_names(result.tensors)
    assert any(n.startswith("lora_te_text_model_encoder_layers_") for n in names)
    assert names <= set(host.core_key_map())
    # svd at rank 3: the rank-4 UNet layers are cut, the rank-2 text-encoder layers come through exactly
    got = host.core([(result.tensors, 1.0, 1.0)], caplog)
    want = host.core([(sd, 0.7, 1.1)])
    te_keys = [k for k in want if k.startswith("clip_h.")]
    assert te_keys and max_error({k: got[k] for k in te_keys}, {k: want[k] for k in te_keys}) < TOL


# --------------------------------------------------------------------------------------------- metadata, refusals

def test_metadata_records_sources(sd15, sd15_sources, tmp_path):
    result = mix.merge_loras(requests_of(sd15_sources), mode="svd", rank=6, energy=0.95, title="my mix")
    path = mix.save_mix(result, tmp_path / "m.safetensors")
    meta = read_lora_file(path).metadata
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == meta["ss_network_alpha"] == str(result.max_rank)
    assert int(meta["ss_network_dim"]) <= 6
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.title"] == "my mix"
    record = json.loads(meta["lora_core.sources"])
    assert record["mode"] == "svd" and record["rank"] == 6 and record["energy"] == 0.95
    assert [(s["name"], s["strength_model"], s["strength_clip"]) for s in record["sources"]] == \
        [("a", 0.8, 0.5), ("b", -0.6, 1.2), ("c", 1.3, 0.0)]


def test_save_never_overwrites_unless_asked(sd15, sd15_sources, tmp_path):
    result = mix.merge_loras(requests_of(sd15_sources[:1]), mode="exact")
    path = tmp_path / "once.safetensors"
    path.write_bytes(b"keep me")
    with pytest.raises(LoraFileError, match="overwrite"):
        mix.save_mix(result, path)
    assert path.read_bytes() == b"keep me"
    mix.save_mix(result, path, overwrite=True)
    assert set(load_file(path)) == set(result.tensors)
    assert [p.name for p in tmp_path.iterdir()] == ["once.safetensors"]  # no temp file left behind


def test_refusals(sd15, sd15_sources, sdxl):
    requests = requests_of(sd15_sources)
    with pytest.raises(LoraValueError, match="rank"):
        mix.merge_loras(requests, mode="svd")
    with pytest.raises(LoraValueError, match="energy"):
        mix.merge_loras(requests, mode="svd", energy=1.5)
    with pytest.raises(LoraValueError, match="mode"):
        mix.merge_loras(requests, mode="ties")
    with pytest.raises(LoraValueError, match="empty"):
        mix.merge_loras([], mode="exact")
    xl = lw.kohya_state_dict(sdxl.te_modules("clip_g"), "lora_te2", seed=1)
    with pytest.raises(LoraMatchError, match="different base models"):
        mix.merge_loras(requests + requests_of([(xl, 1.0, 1.0)], "x"), mode="exact")
    zero = [LoraRequest(lf(sd15_sources[0][0], "z"), 0.0, 0.0)]
    with pytest.raises(LoraValueError, match="nothing to write"):
        mix.merge_loras(zero, mode="exact", arch="sd1")


# --------------------------------------------------------------------------------------------- nodes

def test_merge_and_resize_nodes(sd15, sd15_sources, tmp_path, caplog):
    nodes = node_module("mix")
    assert nodes.NODE_CLASS_MAPPINGS.keys() == {"LoRACoreMergeSave", "LoRACoreResize"}
    with loras_folder(tmp_path):
        for i, (sd, _, _) in enumerate(sd15_sources):
            lw.save_safetensors(sd, tmp_path / f"src_{'abc'[i]}.safetensors")
        stack = [(f"src_{'abc'[i]}.safetensors", sm, sc) for i, (_, sm, sc) in enumerate(sd15_sources)]
        stack.insert(1, ("None", 1.0, 1.0))
        merge = nodes.LoRACoreMergeSave()
        out = merge.merge("exact", 32, 0.0, "mixes/merged", False, "auto", "fp32", lora_stack=stack)
        path, report = out["result"]
        assert path == str(tmp_path / "mixes" / "merged.safetensors") and os.path.isfile(path)
        assert "exact" in report and "source LoRA: src_b.safetensors" in report
        want = sd15.ours(requests_of(sd15_sources))
        assert max_error(sd15.core([(load_file(path), 1.0, 1.0)], caplog), want) < TOL
        with pytest.raises(LoraFileError, match="overwrite"):
            merge.merge("exact", 32, 0.0, "mixes/merged", False, "auto", "fp32", lora_stack=stack)
        with pytest.raises(LoraValueError, match="outside"):
            merge.merge("exact", 32, 0.0, "../escape", False, "auto", "fp32", lora_stack=stack)
        # With MODEL and CLIP connected (their key map and shapes), the same file comes out.
        out = merge.merge("exact", 32, 0.0, "mixes/merged", True, "auto", "fp32", lora_stack=stack,
                          model=sd15.model, clip=sd15.clip)
        assert max_error(sd15.core([(load_file(out["result"][0]), 1.0, 1.0)], caplog), want) < TOL

        # A block stack row (vector baked in) before the plain stack.
        block_row = {"name": "src_a.safetensors", "strength_model": 1.0, "strength_clip": 1.0, "mode": "named",
                     "vector": "IN01=0, TE1=0.5"}
        out = merge.merge("svd", 4, 0.0, "bw", False, "sd1", "fp16", block_stack=[block_row],
                          lora_stack=[stack[3]])
        written = read_lora_file(out["result"][0])
        assert all(t.dtype == torch.float16 for t in written.tensors.values())
        record = json.loads(written.metadata["lora_core.sources"])
        assert record["sources"][0]["block_vector"] == "IN01=0, TE1=0.5"
        requests = [LoraRequest(read_lora_file(tmp_path / "src_a.safetensors"), 1.0, 1.0),
                    LoraRequest(read_lora_file(tmp_path / "src_c.safetensors"), 1.3, 0.0)]
        from lora_core import blocks

        requests[0].block_weights = blocks.resolve_vector(SD1, "named", "IN01=0, TE1=0.5")
        exact = mix.merge_loras(requests, mode="svd", rank=4, arch="sd1")
        assert set(exact.tensors) == set(written.tensors)

        # MODEL only: the text-encoder half is still exported (on the layout's names, from the files).
        out = merge.merge("exact", 32, 0.0, "model_only", False, "auto", "fp32", lora_stack=stack,
                          model=sd15.model)
        assert max_error(sd15.core([(load_file(out["result"][0]), 1.0, 1.0)], caplog), want) < TOL

        resize = nodes.LoRACoreResize()
        path, report = resize.resize("src_b.safetensors", 2, 0.0, "small", False, "auto", "auto")["result"]
        small = load_file(path)
        assert max(t.shape[0] for k, t in small.items() if k.endswith("lora_down.weight")) == 2
        assert "per layer" in report and "2/8," in report and "%" in report


def test_loader_output_bakes_into_core_save_checkpoint(sd15, sd15_sources, tmp_path):
    """Baking = our loader's MODEL/CLIP into core's Save Checkpoint: the checkpoint holds the patched weights."""
    import comfy_extras.nodes_model_merging as merging

    loader = node_module("loader")
    with loras_folder(tmp_path):
        sd, sm, sc = sd15_sources[0]
        lw.save_safetensors(sd, tmp_path / "bake.safetensors")
        model, clip, _ = loader.LoRACoreLoader().load(sd15.model, "bake.safetensors", sm, sc, clip=sd15.clip)
    want = sd15.core([(sd, sm, sc)])
    merging.save_checkpoint(model, clip=clip, vae=None, filename_prefix="baked", output_dir=str(tmp_path))
    saved = load_file(next(str(p) for p in tmp_path.iterdir() if p.name.startswith("baked")))
    unet_keys = [k for k in want if k.startswith("diffusion_model.")]
    te_keys = [k for k in want if k.startswith("clip_l.")]
    assert unet_keys and te_keys
    for key in unet_keys:
        assert torch.allclose(saved["model." + key].float(), want[key], atol=TOL), key
        assert not torch.allclose(saved["model." + key].float(), sd15.base[key].float(), atol=TOL), key
    for key in te_keys:
        saved_key = "cond_stage_model.transformer." + key[len("clip_l.transformer."):]
        assert torch.allclose(saved[saved_key].float(), want[key], atol=TOL), key
    comfy.model_management.unload_all_models()


def test_inspire_vector_means_the_same_in_loader_stack_and_merge(tmp_path):
    """A full-size SD1.5 LoCon touches middle_block.0/1/2, which Inspire counts as three slots: a 27-value
    Inspire vector must put OUT00/OUT01 at the same factor whether the LoRA is loaded, stacked or merged."""
    from tests.test_flux import assert_same, bake

    model = tm.comfy_sd15(channel_mult=(1, 2, 2, 2))   # 4 levels: input_blocks 0-11, output_blocks 0-11
    layers = {p: m for p, m in lw.unet_targets(model.model.diffusion_model, convs=True).items()
              if not p.startswith(("input_blocks.0.", "out.", "time_embed"))}   # kohya's LoCon: not conv_in / out
    locon = lw.kohya_state_dict(layers, "lora_unet", seed=21)
    lw.save_safetensors(locon, tmp_path / "locon.safetensors")
    vector = ",".join(["1"] * 12 + ["0.5", "0.25", "0.75"] + ["0", "0"] + ["1"] * 10)   # 27: M00.0-2, OUT00-01 = 0
    bw, mix_nodes = node_module("block_weight"), node_module("mix")
    with loras_folder(tmp_path):
        loaded, _, table = bw.LoRACoreBlockWeight().load(model, "locon.safetensors", 1.0, 0.0, "inspire", "custom",
                                                         vector, 0, 1.0, 1.0, False)
        assert "OUT00  0" in table and "OUT01  0" in table
        rows = {f"{k}_{i}": v for i in range(1, 6) for k, v in dict(
            enabled=i == 1, lora="locon.safetensors" if i == 1 else "None", strength_model=1.0,
            strength_clip=0.0, mode="inspire", preset="custom", vector=vector if i == 1 else "").items()}
        stack = bw.LoRACoreBlockStack().build(0, 1.0, 1.0, False, **rows)[0]
        stacked, _, _ = bw.LoRACoreApplyBlockStack().apply(model, stack)
        for connect in (None, model):
            path = mix_nodes.LoRACoreMergeSave().merge("exact", 0, 0.0, f"merged_{connect is None}", False, "sd1",
                                                       "fp32", block_stack=stack, model=connect)["result"][0]
            merged = comfy.utils.load_torch_file(path, safe_load=True)
            assert not any("output_blocks_0_" in k or "output_blocks_1_" in k for k in merged), \
                "OUT00/OUT01 have factor 0: the merge must leave them out, as the loader does"
            core_model, _ = comfy.sd.load_lora_for_models(model, None, merged, 1.0, 0.0)
            base = {k: v.clone() for k, v in model.model.state_dict().items()}
            want = bake(loaded)
            assert_same(bake(core_model), want, base, f"merge (model connected: {connect is not None})")
    assert_same(bake(stacked), bake(loaded), base, "stack")
