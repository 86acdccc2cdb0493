"""Standalone lora_core (no ComfyUI) on a diffusers UNet + transformers CLIP equals diffusers'
`load_lora_weights` + `fuse_lora`, and restores bit-exactly."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin

from lora_core.api import LoraPatcher, LoraRequest
from lora_core.io import read_lora_file
from tests import lora_writers as lw


class TinyPipeline(StableDiffusionLoraLoaderMixin):
    """Just enough of a pipeline for diffusers' LoRA loader: the loadable modules as attributes."""

    def __init__(self, unet, text_encoder):
        self.unet = unet
        self.text_encoder = text_encoder
        self.hf_device_map = None

    @property
    def components(self):
        return {"unet": self.unet, "text_encoder": self.text_encoder}


def diffusers_reference(path, unet, text_encoder, scale):
    pipe = TinyPipeline(copy.deepcopy(unet), copy.deepcopy(text_encoder))
    pipe.load_lora_weights(path, adapter_name="lora")
    pipe.fuse_lora(lora_scale=scale, components=["unet", "text_encoder"])
    pipe.unload_lora_weights()  # drops the adapter layers, keeps the fused weights
    return pipe.unet.state_dict(), pipe.text_encoder.state_dict()


@pytest.fixture(scope="module")
def models():
    return lw.tiny_unet(), lw.tiny_text_encoder()


@pytest.mark.parametrize("with_metadata", [True, False], ids=["alpha-in-metadata", "no-alpha"])
@pytest.mark.parametrize("scale", [1.0, 0.5, -0.7])
def test_lora_patcher_equals_diffusers_fuse(models, tmp_path, with_metadata, scale):
    unet, text_encoder = models
    path = lw.save_diffusers_lora(str(tmp_path), unet=unet, text_encoder=text_encoder, rank=4, alpha=8,
                                  with_adapter_metadata=with_metadata)
    ref_unet, ref_te = diffusers_reference(path, unet, text_encoder, scale)

    ours_unet, ours_te = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    base_unet = {k: v.clone() for k, v in ours_unet.state_dict().items()}
    base_te = {k: v.clone() for k, v in ours_te.state_dict().items()}
    patcher = LoraPatcher(unet=ours_unet, text_encoder=ours_te)
    plan = patcher.apply([LoraRequest(read_lora_file(path), scale, scale)])
    assert not plan.reports[0].unmatched and not plan.reports[0].unused_keys

    changed = 0
    for ours, ref, base in ((ours_unet.state_dict(), ref_unet, base_unet), (ours_te.state_dict(), ref_te, base_te)):
        assert ours.keys() == ref.keys()
        for key in ref:
            torch.testing.assert_close(ours[key], ref[key], rtol=1e-5, atol=1e-6, msg=key)
            changed += not torch.equal(ref[key], base[key])
    assert changed > 10, "the LoRA changed almost nothing: the comparison would prove nothing"

    patcher.restore()
    assert all(torch.equal(v, base_unet[k]) for k, v in ours_unet.state_dict().items())
    assert all(torch.equal(v, base_te[k]) for k, v in ours_te.state_dict().items())


def test_hundred_patch_restore_cycles_are_bit_exact(models, tmp_path):
    unet, text_encoder = copy.deepcopy(models[0]), copy.deepcopy(models[1])
    path = lw.save_diffusers_lora(str(tmp_path), unet=unet, text_encoder=text_encoder)
    lora = read_lora_file(path)
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    patcher = LoraPatcher(unet=unet, text_encoder=text_encoder)
    for cycle in range(100):
        patcher.apply([LoraRequest(lora, 0.3 + cycle / 50, 1.0)])
        patcher.restore()
    assert all(torch.equal(v, base[k]) for k, v in unet.state_dict().items())
