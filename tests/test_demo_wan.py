"""The demo's tiny Wan 2.2 assets (demo/tiny_wan.py) are what its docstring says, checked with ComfyUI's own
detection, its diffusion-model and VAE loaders and core's LoRA loader: both experts load through core's
UNETLoader path as Wan 2.1-structured (A14B expert) models whose 768-wide text input ComfyUI's mixed-precision
ops take from the file (plain ops refuse it), the VAE decodes a video latent, the musubi pair applied with
LoRACoreWanPairLoader (with a named block vector) equals core applying each file to its expert, the block's
factor folded into the file's own tensors, and the patched experts sample from the tiny CLIP-L's conditioning
as workflows/09_wan22_lora_pair.json does."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.comfy_host import import_comfy

comfy = import_comfy()
import comfy.model_detection  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.quant_ops  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.utils  # noqa: E402

from demo import DEMO_MODELS  # noqa: E402
from demo import tiny_flux, tiny_wan  # noqa: E402
from lora_core import pairs  # noqa: E402
from lora_core.arch.registry import detect_lora  # noqa: E402
from lora_core.io import read_lora_file  # noqa: E402
from tests.pack import loras_folder, node_module  # noqa: E402
from tests.test_flux import assert_same, bake  # noqa: E402

EXPERT_PARAMETERS = 679_360   # dim 128, FFN 256, 2 blocks, 768-wide text embedding


@pytest.fixture(scope="module")
def assets() -> dict[str, Path]:
    return tiny_wan.ensure_wan_models(Path(os.environ.get("LORA_CORE_E2E_MODELS", DEMO_MODELS)))


@pytest.fixture(scope="module")
def clip_l_path(assets) -> Path:
    """The demo's tiny CLIP-L (demo/tiny_flux.py), built when the models folder has none yet."""
    path = assets["wan_high"].parent.parent / "text_encoders" / tiny_flux.CLIP_L_NAME
    return path if path.exists() else tiny_flux.make_tiny_clip_l(path)


def _expert(path: Path):
    return comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float32})


@pytest.mark.parametrize("expert", ["wan_high", "wan_low"])
def test_expert_text_input_is_768_wide_through_mixed_precision_ops_that_quantise_nothing(assets, expert):
    state, metadata = comfy.utils.load_torch_file(str(assets[expert]), return_metadata=True)
    assert tuple(state["text_embedding.0.weight"].shape) == (128, 768)
    assert tiny_wan.core_wan_layout()["text_embedding.0.weight"] == (128, 4096)   # what plain ops build
    layers = json.loads(metadata["_quantization_metadata"])["layers"]
    assert list(layers) == [tiny_wan.QUANT_MARKER_LAYER]
    model = _expert(assets[expert]).model
    assert model.model_config.layer_quant_config == layers
    modules = dict(model.diffusion_model.named_modules())
    assert tiny_wan.QUANT_MARKER_LAYER not in modules
    linear = modules["text_embedding.0"]
    assert type(linear).__qualname__ == "mixed_precision_ops.<locals>.MixedPrecisionOps.Linear"
    assert tuple(linear.weight.shape) == (128, 768)
    weights = list(model.diffusion_model.state_dict().values())
    assert not any(isinstance(w, comfy.quant_ops.QuantizedTensor) for w in weights)
    assert {w.dtype for w in weights} == {torch.float32}
    torch.testing.assert_close(linear.weight, state["text_embedding.0.weight"].float())


def test_without_the_quantization_metadata_core_refuses_the_768_wide_text_input(assets):
    """Why the metadata is there: ComfyUI's plain ops build text_embedding.0 4096 wide and fail on the file."""
    state, metadata = comfy.utils.load_torch_file(str(assets["wan_high"]), return_metadata=True)
    metadata.pop("_quantization_metadata")
    with pytest.raises(RuntimeError, match=r"size mismatch for text_embedding\.0\.weight"):
        comfy.sd.load_diffusion_model_state_dict(state, model_options={"dtype": torch.float32}, metadata=metadata)


@pytest.mark.parametrize("expert", ["wan_high", "wan_low"])
def test_comfy_detects_each_expert_as_a_wan_t2v_model(assets, expert):
    state = comfy.utils.load_torch_file(str(assets[expert]))
    config = comfy.model_detection.detect_unet_config(state, "")
    assert config == tiny_wan.tiny_wan_config()
    assert type(comfy.model_detection.model_config_from_unet_config(config, state)) is comfy.supported_models.WAN21_T2V
    assert {k: tuple(v.shape) for k, v in state.items()} == tiny_wan.wan_layout()
    assert sum(v.numel() for v in state.values()) == EXPERT_PARAMETERS
    patcher = _expert(assets[expert])
    assert type(patcher.model.diffusion_model).__name__ == "WanModel"
    assert len(patcher.model.diffusion_model.blocks) == 2


def test_the_two_experts_differ(assets):
    high = comfy.utils.load_torch_file(str(assets["wan_high"]))
    low = comfy.utils.load_torch_file(str(assets["wan_low"]))
    assert not torch.equal(high["blocks.0.self_attn.q.weight"], low["blocks.0.self_attn.q.weight"])


def test_vae_is_a_wan_2_1_vae_that_decodes_a_video_latent(assets):
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(assets["wan_vae"])))
    assert vae.latent_channels == 16 and vae.latent_dim == 3
    assert type(vae.first_stage_model).__module__ == "comfy.ldm.wan.vae"
    frames = vae.decode(torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert frames.shape == (1, 5, 64, 64, 3)   # 4x temporal (1 + 4 frames), 8x spatial
    assert torch.isfinite(frames).all() and frames.std() > 0


@pytest.mark.parametrize("expert", ["high", "low"])
def test_loras_are_musubi_files_with_timestep_ranges(assets, expert):
    lora = read_lora_file(assets[f"lora_wan_{expert}"])
    assert lora.metadata["ss_network_module"] == "networks.lora_wan"
    assert lora.metadata["modelspec.timestep_range"] == tiny_wan.TIMESTEP_RANGES[expert]
    assert type(detect_lora(lora).family).__name__ == "WanFamily"
    modules = {key.split(".")[0] for key in lora.tensors}
    assert modules == {"lora_unet_" + p.replace(".", "_") for p in tiny_wan.wan_block_targets()}
    assert any(m.startswith("lora_unet_blocks_1_cross_attn_") for m in modules)


def test_pair_is_told_apart_by_metadata_whatever_the_order(assets):
    names = [tiny_wan.LORA_NAMES["low"], tiny_wan.LORA_NAMES["high"]]
    metas = [read_lora_file(assets[f"lora_wan_{e}"]).metadata for e in ("low", "high")]
    decision = pairs.decide_pair((names[0], metas[0]), (names[1], metas[1]), pairs.ASSIGN_AUTO)
    assert (decision.high, decision.low) == (names[1], names[0]) and "timestep_range" in decision.how


def _core_truth(model, path: Path, strength: float, block_factor: dict[int, float]):
    """Core's own loader on the file's tensors with each block's lora_up scaled by its factor."""
    state = comfy.utils.load_torch_file(str(path))
    for key in list(state):
        for block, factor in block_factor.items():
            if key.startswith(f"lora_unet_blocks_{block}_") and key.endswith(".lora_up.weight"):
                state[key] = state[key] * factor
    patched, _ = comfy.sd.load_lora_for_models(model, None, state, strength, 0)
    return patched


@pytest.mark.parametrize("strengths", [(1.0, 1.0), (-0.6, 0.8)])
def test_pair_loader_with_block_vector_equals_core_on_each_expert(assets, tmp_path, strengths):
    folder = tmp_path / "loras"
    folder.mkdir()
    for expert in ("high", "low"):
        shutil.copy(assets[f"lora_wan_{expert}"], folder / tiny_wan.LORA_NAMES[expert])
    high_model, low_model = _expert(assets["wan_high"]), _expert(assets["wan_low"])
    base_high = {k: v.clone() for k, v in high_model.model.state_dict().items()}
    base_low = {k: v.clone() for k, v in low_model.model.state_dict().items()}
    with loras_folder(folder):
        # lora_1 is the low-noise file and lora_2 None: the partner is found by name, the metadata assigns
        high, low, clip, report = node_module("wan").LoRACoreWanPairLoader().load(
            high_model, low_model, tiny_wan.LORA_NAMES["low"], "None", strengths[0], strengths[1], 1.0,
            pairs.ASSIGN_AUTO, clip=None, block_vector="B01=0.5")
    assert clip is None
    assert (f"high noise <- {tiny_wan.LORA_NAMES['high']}, low noise <- {tiny_wan.LORA_NAMES['low']}"
            in report)
    assert_same(bake(high), bake(_core_truth(high_model, assets["lora_wan_high"], strengths[0], {1: 0.5})),
                base_high, "high")
    assert_same(bake(low), bake(_core_truth(low_model, assets["lora_wan_low"], strengths[1], {1: 0.5})),
                base_low, "low")
    # the block vector acted: block 1 got half the delta core gives it without one
    plain = bake(_core_truth(high_model, assets["lora_wan_high"], strengths[0], {}))
    ours = bake(high)
    key = "diffusion_model.blocks.1.self_attn.q.weight"
    full, half = plain[key] - base_high[key], ours[key] - base_high[key]
    assert torch.allclose(half, 0.5 * full, atol=1e-6, rtol=1e-4) and full.abs().max() > 0


def test_experts_patched_by_the_pair_sample_from_clip_l_high_then_low(assets, clip_l_path, tmp_path):
    """What workflows/09_wan22_lora_pair.json does, in-process: the pair on both experts, the tiny CLIP-L's
    CLIPTextEncode conditioning (1, 77, 768), ModelSamplingSD3 shift 8, two KSamplerAdvanced (high-noise steps
    with the leftover noise, then low-noise steps), the VAE decodes frames; the prompt changes the result."""
    import nodes as core_nodes
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    folder = tmp_path / "loras"
    folder.mkdir()
    for expert in ("high", "low"):
        shutil.copy(assets[f"lora_wan_{expert}"], folder / tiny_wan.LORA_NAMES[expert])
    clip = comfy.sd.load_clip([str(clip_l_path)], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    with loras_folder(folder):
        high, low, clip, _ = node_module("wan").LoRACoreWanPairLoader().load(
            _expert(assets["wan_high"]), _expert(assets["wan_low"]), tiny_wan.LORA_NAMES["high"],
            tiny_wan.LORA_NAMES["low"], 1.0, 1.0, 1.0, pairs.ASSIGN_AUTO, clip=clip,
            block_vector="B01=0.5, B*.cross_attn=0.8")
    (high,) = ModelSamplingSD3().patch(high, 8.0)
    (low,) = ModelSamplingSD3().patch(low, 8.0)
    encode = core_nodes.CLIPTextEncode()
    negative = encode.encode(clip, "blurry, static")[0]
    latent = {"samples": torch.zeros(1, 16, 2, 8, 8)}   # EmptyHunyuanLatentVideo's shape for 64x64, 5 frames
    sampler = core_nodes.KSamplerAdvanced()

    def sample(prompt: str):
        positive = encode.encode(clip, prompt)[0]
        assert tuple(positive[0][0].shape) == (1, 77, 768)
        (mid,) = sampler.sample(high, "enable", 42, 4, 3.5, "euler", "simple", positive, negative, latent, 0, 2,
                                "enable")
        (out,) = sampler.sample(low, "disable", 42, 4, 3.5, "euler", "simple", positive, negative, mid, 2, 10000,
                                "disable")
        assert not torch.equal(out["samples"], mid["samples"])
        return out["samples"]

    samples = sample("a red circle drifting")
    assert samples.shape == (1, 16, 2, 8, 8) and torch.isfinite(samples).all()
    assert not torch.allclose(samples, sample("a green square"), atol=1e-4)
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(assets["wan_vae"])))
    frames = vae.decode(samples)
    assert frames.shape == (1, 5, 64, 64, 3) and torch.isfinite(frames).all()


WORKFLOW_09 = Path(__file__).resolve().parent.parent / "workflows" / "09_wan22_lora_pair.json"
SHIPPED_VECTOR = "B01=0.5, B*.cross_attn=0.8"


def _shipped_factor(module: str) -> float:
    """SHIPPED_VECTOR by hand: cross-attention 0.8 in every block (the later entry wins in block 1), the rest
    of block 1 0.5, everything else 1."""
    block, rest = module[len("lora_unet_blocks_"):].split("_", 1)
    return 0.8 if rest.startswith("cross_attn_") else 0.5 if block == "1" else 1.0


@pytest.mark.parametrize("strength", [1.0, -0.6])
def test_workflow_09_pair_and_vector_equal_core_with_each_module_scaled(assets, clip_l_path, tmp_path, strength):
    """The pair loader as workflow 09 sets it (its block vector, a CLIP-L on the clip input) on the experts as
    the workflow's UNETLoader loads them (weight_dtype default) equals core's loader on each expert with every
    module's lora_up scaled by the vector's factor; the CLIP comes back unpatched (the pair has no text part)."""
    (pair_node,) = [n for n in json.loads(WORKFLOW_09.read_text())["nodes"] if n["type"] == "LoRACoreWanPairLoader"]
    assert pair_node["widgets_values"][6] == SHIPPED_VECTOR, "workflow 09's vector changed: update this test"
    folder = tmp_path / "loras"
    folder.mkdir()
    for expert in ("high", "low"):
        shutil.copy(assets[f"lora_wan_{expert}"], folder / tiny_wan.LORA_NAMES[expert])
    models = {e: comfy.sd.load_diffusion_model(str(assets[f"wan_{e}"])) for e in ("high", "low")}
    bases = {e: {k: v.clone() for k, v in m.model.state_dict().items()} for e, m in models.items()}
    clip = comfy.sd.load_clip([str(clip_l_path)], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    with loras_folder(folder):
        high, low, clip_out, _ = node_module("wan").LoRACoreWanPairLoader().load(
            models["high"], models["low"], tiny_wan.LORA_NAMES["high"], tiny_wan.LORA_NAMES["low"], strength,
            strength, 1.0, pairs.ASSIGN_AUTO, clip=clip, block_vector=SHIPPED_VECTOR)
    assert not clip_out.patcher.patches
    for expert, ours in (("high", high), ("low", low)):
        state = comfy.utils.load_torch_file(str(assets[f"lora_wan_{expert}"]))
        factors = {key: _shipped_factor(key.split(".")[0]) for key in state if key.endswith(".lora_up.weight")}
        assert set(factors.values()) == {0.5, 0.8, 1.0}
        # in fp32: 0.8 is not exact in the file's fp16
        state = {key: value.float() * factors.get(key, 1.0) for key, value in state.items()}
        core, _ = comfy.sd.load_lora_for_models(models[expert], None, state, strength, 0)
        assert_same(bake(ours), bake(core), bases[expert], expert)
