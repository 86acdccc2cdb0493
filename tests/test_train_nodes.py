"""The training nodes with real ComfyUI objects: dataset node -> train node -> the returned MODEL in
ComfyUI's sampler; the file in models/loras through core's LoRA loader; cancel + continue; bad inputs.

`import nodes` in a ComfyUI process is ComfyUI's own nodes.py, so nodes/train.py is imported by file path as
a submodule of a stand-in package (its relative imports of nodes/loader.py still work), without running the
pack's nodes/__init__.py (which imports every other node family).
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import types

import pytest
import torch

from tests.comfy_host import REPO, import_comfy
from tests.pack import input_folder, loras_folder
from tests import tiny_models as tm

comfy = import_comfy()
import comfy.model_management as mm  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.taesd.taesd  # noqa: E402
import comfy.utils  # noqa: E402
from lora_core.errors import LoraFileError, LoraValueError  # noqa: E402

STEPS = 120


def train_nodes():
    package = "lora_core_train_nodes"
    if package not in sys.modules:
        stand_in = types.ModuleType(package)
        stand_in.__path__ = [str(REPO / "nodes")]
        sys.modules[package] = stand_in
    return importlib.import_module(package + ".train")


nt = train_nodes()


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_vae():
    """A real comfy.sd.VAE (TAESD architecture, 2.4 M parameters, random weights): 8x downscale, 4 channels."""
    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    tm.seed_weights(taesd, 0)
    state = taesd.state_dict()
    state["vae_scale"] = torch.tensor(1.0)
    state["vae_shift"] = torch.tensor(0.0)
    return comfy.sd.VAE(sd=state)


def square_images(n=8, size=64):
    """A red square on grey, slightly jittered: one coloured shape, as an IMAGE batch (B, H, W, 3)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.full((n, size, size, 3), 0.5)
    images[:, 16:48, 16:48] = torch.tensor([0.9, 0.1, 0.1])
    return (images + 0.02 * torch.randn(images.shape, generator=gen)).clamp(0, 1)


DATASET_DEFAULTS = dict(folder="", caption="sks square", missing_caption="error", repeats=1, resolution=64,
                        bucketing=True, bucket_step=16, min_bucket=32, max_bucket=128, shuffle_caption=False,
                        keep_tokens=1, caption_dropout=0.0)


def train_kwargs(**overrides):
    kwargs = dict(output_name="sq", run="new run", steps=STEPS, algorithm="LoRA", rank=8, alpha=8.0,
                  unet_targets="attn+ff+proj", blocks="", block_lr="", unet_lr=1e-3, train_text_encoder=True,
                  text_encoder_lr=1e-4, optimizer="AdamW", lr_scheduler="constant", warmup_steps=0, batch_size=2,
                  grad_accumulation=1, seed=0, min_snr_gamma=5.0, noise_offset=0.0, mixed_precision="auto",
                  gradient_checkpointing=False, cache_latents=True, cache_text_encoder_outputs=True, save_every=0,
                  keep_last=3, save_precision="fp16", overwrite=False)
    kwargs.update(overrides)
    return kwargs


def tiny_sd15_for_tiny_clip():
    """Tiny SD1.5 (comfy.supported_models.SD15) whose cross-attention width matches the tiny CLIP (32)."""
    config = comfy.supported_models.SD15(tm.unet_config_sd15(context_dim=32))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu")).to(torch.float32)
    tm.seed_weights(model, 0)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    return patcher


@pytest.fixture(scope="module")
def host():
    return tiny_sd15_for_tiny_clip(), tm.comfy_clip_sd15(), tiny_vae()


@pytest.fixture(scope="module")
def dataset():
    ds, summary = nt.LoRACoreTrainDataset().build(images=square_images(), **DATASET_DEFAULTS)
    assert "8 images x 1 repeats" in summary
    return ds


@pytest.fixture(scope="module")
def trained(host, dataset, tmp_path_factory):
    model, clip, vae = host
    folder = tmp_path_factory.mktemp("loras")
    with loras_folder(folder):
        outputs = nt.LoRACoreTrain().train(model, clip, vae, dataset, **train_kwargs())
    return dict(outputs=outputs, folder=folder)


def test_node_contract():
    assert set(nt.NODE_CLASS_MAPPINGS) == {"LoRACoreTrainDataset", "LoRACoreTrain", "LoRACoreApplyTrained"}
    for cls in nt.NODE_CLASS_MAPPINGS.values():
        assert cls.CATEGORY == "LoRA Core/Training" and hasattr(cls, cls.FUNCTION)
    order = list(nt.LoRACoreTrain.INPUT_TYPES()["required"])
    assert order == ["model", "clip", "vae", "dataset"] + list(train_kwargs())
    assert list(nt.LoRACoreTrainDataset.INPUT_TYPES()["required"]) == list(DATASET_DEFAULTS)
    assert nt.LoRACoreTrain.RETURN_TYPES == ("MODEL", "CLIP", "LORA_CORE_LORA", "IMAGE", "STRING", "STRING", "IMAGE")


def test_train_outputs_file_and_loss_curve(trained):
    from safetensors import safe_open

    model, clip, lora, curve, lora_name, report = trained["outputs"][:6]
    assert lora_name == "sq.safetensors" and os.path.isfile(trained["folder"] / lora_name)
    assert lora.path == str(trained["folder"] / lora_name)
    assert curve.ndim == 4 and curve.shape[-1] == 3 and curve.dtype == torch.float32 and 0 <= curve.min()
    assert f"steps {STEPS}" in report
    with safe_open(lora.path, framework="pt") as handle:
        keys, meta = list(handle.keys()), handle.metadata()
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    assert any(k.startswith("lora_unet_output_blocks_3_1_transformer_blocks_0_ff_net_2.") for k in keys)
    assert meta["ss_network_train_unet_only"] == "False" and meta["ss_text_encoder_lr"] == "0.0001"
    assert meta["modelspec.trigger_phrase"] == "sks square" and "ss_tag_frequency" in meta


def test_file_loads_in_core_lora_loader_with_every_key(host, trained, caplog):
    model, clip, _ = host
    path = trained["outputs"][2].path
    lora = comfy.utils.load_torch_file(path, safe_load=True)
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    assert [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()] == []
    modules = {k.split(".")[0] for k in lora}
    unet_modules = {m for m in modules if m.startswith("lora_unet_")}
    assert len(new_model.patches) == len(unet_modules)
    assert len(new_clip.patcher.patches) == len(modules - unet_modules)


def _x0_error(patcher, latents, context):
    """MSE of the model's x0 prediction (ComfyUI's own apply_model path) vs the training latents, over fixed
    noise and sigmas."""
    mm.load_models_gpu([patcher], force_full_load=True)
    base = patcher.model
    gen = torch.Generator().manual_seed(123)
    errors = []
    for percent in (0.3, 0.5, 0.7):
        sigma = base.model_sampling.percent_to_sigma(percent)
        sigmas = torch.full((latents.shape[0],), float(sigma))
        noise = torch.randn(latents.shape, generator=gen)
        noisy = latents + noise * sigmas.view(-1, 1, 1, 1)
        with torch.no_grad():
            x0 = base.apply_model(noisy, sigmas, c_crossattn=context.expand(latents.shape[0], -1, -1))
        errors.append(torch.mean((x0 - latents) ** 2).item())
    return sum(errors) / len(errors)


def test_trained_model_moves_toward_training_images(host, dataset, trained):
    model, clip, vae = host
    new_model, new_clip = trained["outputs"][:2]
    latents = vae.encode(square_images().float()).detach()  # latent space as ComfyUI's sampler sees it
    tokens = clip.tokenize("sks square")
    base_context = clip.encode_from_tokens(tokens).detach()
    trained_context = new_clip.encode_from_tokens(new_clip.tokenize("sks square")).detach()
    base_error = _x0_error(model, latents, base_context)
    trained_error = _x0_error(new_model, latents, trained_context)
    print(f"x0 MSE vs training latents: base {base_error:.4f}, trained {trained_error:.4f}")
    assert trained_error < 0.8 * base_error

    # and a real sample through ComfyUI's sampler runs with the trained model
    positive = [[trained_context, {}]]
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    empty = torch.zeros((1, 4, 8, 8))
    sampled = comfy.sample.sample(new_model, noise, 8, 1.0, "euler", "normal", positive, positive, empty,
                                  denoise=1.0, seed=7, disable_pbar=True)
    base_sampled = comfy.sample.sample(model, noise, 8, 1.0, "euler", "normal", [[base_context, {}]],
                                       [[base_context, {}]], empty, denoise=1.0, seed=7, disable_pbar=True)
    target = latents.mean(0, keepdim=True)
    trained_distance = torch.mean((sampled - target) ** 2).item()
    base_distance = torch.mean((base_sampled - target) ** 2).item()
    print(f"sampled latent MSE to training mean: base {base_distance:.4f}, trained {trained_distance:.4f}")
    assert torch.isfinite(sampled).all() and trained_distance < base_distance


def test_apply_trained_node_at_zero_strength_is_base(host, trained):
    model, clip, _ = host
    lora = trained["outputs"][2]
    new_model, new_clip, report = nt.LoRACoreApplyTrained().apply(model, lora, 0.0, 0.0, clip)
    assert new_model is model and new_clip is clip
    half_model, _, report = nt.LoRACoreApplyTrained().apply(model, lora, 0.5, 0.5, clip)
    assert half_model is not model and len(half_model.patches) > 0


def test_cancel_leaves_loadable_file_then_continue(host, dataset, tmp_path, caplog):
    model, clip, vae = host
    stop_at = 4

    def hook(value, total, preview, node_id=None):
        if value >= stop_at:
            mm.interrupt_current_processing(True)

    previous_hook = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with loras_folder(tmp_path):
            with pytest.raises(mm.InterruptProcessingException):
                nt.LoRACoreTrain().train(model, clip, vae, dataset, **train_kwargs(output_name="cut", steps=50,
                                                                                    train_text_encoder=False))
    finally:
        comfy.utils.set_progress_bar_global_hook(previous_hook)
        mm.interrupt_current_processing(False)
    path = tmp_path / "cut.safetensors"
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["ss_steps"] == str(stop_at)
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]

    # chunked training: continue the cut run for 3 more steps
    with loras_folder(tmp_path):
        outputs = nt.LoRACoreTrain().train(model, clip, vae, dataset, **train_kwargs(output_name="cut", steps=3,
                                                                                     run="continue",
                                                                                     train_text_encoder=False))
    assert f"steps {stop_at + 3} (this run 3" in outputs[5]
    # a new run under the same name is refused (it would clobber the state of the cut run)
    with loras_folder(tmp_path):
        with pytest.raises(LoraValueError, match="run named 'cut' was started before"):
            nt.LoRACoreTrain().train(model, clip, vae, dataset, **train_kwargs(output_name="cut", steps=1))


def test_bad_inputs_have_clear_messages(host, dataset, tmp_path):
    model, clip, vae = host
    node = nt.LoRACoreTrain()
    with loras_folder(tmp_path):
        with pytest.raises(LoraValueError, match="Block OUT11 does not exist in this model"):
            node.train(model, clip, vae, dataset, **train_kwargs(blocks="IN01, OUT11"))
        with pytest.raises(LoraFileError, match="nothing to continue"):
            node.train(model, clip, vae, dataset, **train_kwargs(output_name="never", run="continue"))
        with pytest.raises(LoraValueError, match="not a usable file name"):
            node.train(model, clip, vae, dataset, **train_kwargs(output_name="  "))
        (tmp_path / "taken.safetensors").write_bytes(b"x")
        with pytest.raises(LoraFileError, match="already exists"):
            node.train(model, clip, vae, dataset, **train_kwargs(output_name="taken", steps=1))
        with pytest.raises(LoraValueError, match="learning rate"):
            node.train(model, clip, vae, dataset, **train_kwargs(unet_lr=float("nan")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with input_folder(tmp_path), pytest.raises(LoraFileError, match="has no images"):
        nt.LoRACoreTrainDataset().build(**{**DATASET_DEFAULTS, "folder": str(empty)})
    with input_folder(tmp_path / "empty"), pytest.raises(LoraValueError, match="outside ComfyUI's input folder"):
        nt.LoRACoreTrainDataset().build(**{**DATASET_DEFAULTS, "folder": str(tmp_path)})
    with input_folder(tmp_path), pytest.raises(LoraValueError, match="not a usable file name"):
        nt.LoRACoreTrainDataset().build(**{**DATASET_DEFAULTS, "folder": "../etc"})
    with pytest.raises(LoraValueError, match="No dataset folder given"):
        nt.LoRACoreTrainDataset().build(**DATASET_DEFAULTS)


def test_dataset_node_from_folder(tmp_path):
    from PIL import Image

    for i, size in enumerate([(96, 64), (64, 64)]):
        Image.new("RGB", size, (200, 10, 10)).save(tmp_path / f"img{i}.png")
    (tmp_path / "img0.txt").write_text("sks, red")
    with input_folder(tmp_path.parent):
        ds, summary = nt.LoRACoreTrainDataset().build(**{**DATASET_DEFAULTS, "folder": tmp_path.name,
                                                         "missing_caption": "use caption widget", "repeats": 2})
    assert [s.caption for s in ds.samples] == ["sks, red", "sks square"]
    assert len(ds.bucket_counts()) == 2 and "4 samples per epoch" in summary
