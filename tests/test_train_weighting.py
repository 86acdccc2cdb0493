"""DDPM loss weightings of the trainer (lora_core.train.loop.loss_weights): min-SNR (default), kohya's debiased
estimation, and the x0 MSE core's Train LoRA node minimises, each checked against its definition computed
another way; flow models refuse a weighting that does not apply to them."""
from __future__ import annotations

import os

import pytest
import torch

import lora_core.train as lt
from lora_core.errors import LoraValueError


def _batch(prediction):
    gen = torch.Generator().manual_seed(0)
    ac = lt.sd_alphas_cumprod()
    t = torch.tensor([0, 10, 250, 500, 750, 999])
    x0 = torch.randn(6, 4, 8, 8, generator=gen)
    eps = torch.randn(6, 4, 8, 8, generator=gen)
    a = ac[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    pred = torch.randn(6, 4, 8, 8, generator=gen)    # any model output
    target = eps if prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
    return ac, t, a, x0, x_t, pred, target


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_x0_weighting_is_the_x0_mse(prediction):
    ac, t, a, x0, x_t, pred, target = _batch(prediction)
    weighted = ((pred - target) ** 2).mean(dim=(1, 2, 3)) * lt.loss_weights(t, ac, "x0", 5.0, prediction)
    if prediction == "epsilon":
        x0_hat = (x_t - (1 - a).sqrt() * pred) / a.sqrt()
    else:
        x0_hat = a.sqrt() * x_t - (1 - a).sqrt() * pred
    direct = ((x0_hat - x0) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(weighted, direct, rtol=1e-4, atol=1e-6), (weighted, direct)


def test_debiased_and_min_snr():
    ac = lt.sd_alphas_cumprod()
    t = torch.arange(0, 1000, 37)
    snr = ac[t] / (1 - ac[t])
    min_snr = lt.loss_weights(t, ac, "min-snr", 5.0, "epsilon")
    assert torch.allclose(min_snr, torch.clamp(snr, max=5.0) / snr)
    assert lt.loss_weights(t, ac, "min-snr", 0.0, "epsilon") is None          # off: plain MSE
    debiased = lt.loss_weights(t, ac, "debiased", 0.0, "epsilon")
    assert torch.allclose(debiased, 1 / torch.sqrt(torch.clamp(snr, max=1000.0)))
    assert torch.allclose(lt.loss_weights(t, ac, "debiased", 5.0, "epsilon"), debiased * min_snr)


def test_config_and_flow_refuse_bad_weightings():
    with pytest.raises(LoraValueError, match="loss weighting 'x1' is not one of"):
        lt.TrainConfig(loss_weighting="x1").validate()

    class FlowBackend:
        device = "cpu"
        objective = lt.Objective.flow(shift=3.0, multiplier=1000.0)

    with pytest.raises(LoraValueError, match="is for DDPM models"):
        lt.LoraTrainer(FlowBackend(), None, None, lt.TrainConfig(loss_weighting="x0"))


def test_train_node_loss_weighting_input(tmp_path):
    """The train node's loss_weighting: an SD run with core's x0 loss trains another LoRA than the default one
    and says so in its header; a flow model refuses it before anything is written."""
    from safetensors import safe_open

    from tests import tiny_models as tm
    from tests.pack import loras_folder
    from tests.test_train_nodes import (DATASET_DEFAULTS, square_images, tiny_sd15_for_tiny_clip, tiny_vae,
                                        train_kwargs, train_nodes)

    nt = train_nodes()
    model, clip, vae = tiny_sd15_for_tiny_clip(), tm.comfy_clip_sd15(), tiny_vae()
    dataset = nt.LoRACoreTrainDataset().build(images=square_images(4), **DATASET_DEFAULTS)[0]
    files = {}
    for weighting in ("min-snr", "x0"):
        with loras_folder(tmp_path):
            lora = nt.LoRACoreTrain().train(model, clip, vae, dataset, **train_kwargs(
                steps=2, train_text_encoder=False, output_name=f"w_{weighting}", loss_weighting=weighting))[2]
        with safe_open(lora.path, framework="pt") as handle:
            files[weighting] = (handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()})
    assert files["x0"][0]["lora_core.loss_weighting"] == "x0"
    assert "lora_core.loss_weighting" not in files["min-snr"][0]
    assert files["x0"][0]["ss_debiased_estimation"] == "False"
    ups = [k for k in files["x0"][1] if k.endswith("lora_up.weight")]
    assert any(not torch.equal(files["x0"][1][k], files["min-snr"][1][k]) for k in ups)

    flux_model, flux_clip = tm.comfy_flux(), tm.comfy_clip_flux()
    from tests.test_train_flux import target_images, tiny_vae16

    flux_vae = tiny_vae16(flux_model)
    flux_data = nt.LoRACoreTrainDataset().build(images=target_images(), **DATASET_DEFAULTS)[0]
    before = set(os.listdir(tmp_path))
    with loras_folder(tmp_path), pytest.raises(LoraValueError, match="is for DDPM models"):
        nt.LoRACoreTrain().train(flux_model, flux_clip, flux_vae, flux_data, **train_kwargs(
            steps=1, train_text_encoder=False, output_name="w_flux", loss_weighting="x0"))
    assert set(os.listdir(tmp_path)) == before
