"""DDPM loss weightings of the trainer (lora_core.train.loop.loss_weights): min-SNR (default), kohya's debiased
estimation, and the x0 MSE core's Train LoRA node minimises, each checked against its definition computed
another way; flow models refuse a weighting that does not apply to them."""
from __future__ import annotations

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
