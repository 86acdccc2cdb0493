"""Graph-level parity in the real ComfyUI server (CPU, tiny seeded SD1.5-shaped checkpoint):

checkpoint loader -> LoRA -> CLIPTextEncode x2 -> KSampler -> SaveLatent / VAEDecode -> SaveImage, queued as
one prompt with one branch per variant, all with the same seed:

* no LoRA;
* core's LoraLoader (tiny_character, strengths 0.8 / 0.8);
* LoRACoreLoader with the same file and strengths.

Ours must equal core and differ from the no-LoRA output. (Stacks against chained core loaders are compared at
weight level in test_parity_core.py; two more sampled branches here would nearly double this file's run time.)

Tolerance (not bit-exact: our patches are computed by lora_core, core's by comfy.lora, in a different order):
the sampled latents (fp32, read from SaveLatent's file) may differ by at most LATENT_RTOL x max|core latent|
(1e-4 of the latent's scale; about 1e-5 is observed, the weight-level tolerance of test_parity_core.py carried
through four Euler steps); the decoded 8-bit PNGs may differ by at most 1 level per channel. The no-LoRA output
must be at least 100x further away than the latent tolerance (mean absolute difference) and differ by more than
one level per pixel on average, so a LoRA that was silently not applied cannot pass.
"""
from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from demo.tiny_model import CHECKPOINT_NAME

pytest_plugins = ["tests.e2e_helpers"]

SEED = 1234
STEPS = 4
LATENT_RTOL = 1e-4  # of max|latent|
PIXEL_ATOL = 1  # 8-bit levels
CHARACTER = ("tiny_character.safetensors", 0.8, 0.8)
VARIANTS = ("none", "core", "ours")


def _core_lora(graph: dict, node_id: str, source: str, lora: tuple) -> str:
    name, strength_model, strength_clip = lora
    graph[node_id] = {"class_type": "LoraLoader", "inputs": {
        "model": [source, 0], "clip": [source, 1], "lora_name": name,
        "strength_model": strength_model, "strength_clip": strength_clip}}
    return node_id


def _our_loader(graph: dict, node_id: str, source: str, lora: tuple) -> str:
    name, strength_model, strength_clip = lora
    graph[node_id] = {"class_type": "LoRACoreLoader", "inputs": {
        "model": [source, 0], "clip": [source, 1], "lora_name": name,
        "strength_model": strength_model, "strength_clip": strength_clip}}
    return node_id


def _sampling_branch(graph: dict, variant: str, model_clip: str, prefix: str) -> None:
    """Text encoders, sampler, latent and image outputs for one variant (ids `<variant>_...`)."""
    graph[f"{variant}_pos"] = {"class_type": "CLIPTextEncode", "inputs": {
        "clip": [model_clip, 1], "text": "tinychar, tinystyle, a red circle on a white background"}}
    graph[f"{variant}_neg"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": [model_clip, 1], "text": "blurry"}}
    graph[f"{variant}_sample"] = {"class_type": "KSampler", "inputs": {
        "model": [model_clip, 0], "positive": [f"{variant}_pos", 0], "negative": [f"{variant}_neg", 0],
        "latent_image": ["latent", 0], "seed": SEED, "steps": STEPS, "cfg": 7.0, "sampler_name": "euler",
        "scheduler": "normal", "denoise": 1.0}}
    graph[f"{variant}_latent"] = {"class_type": "SaveLatent", "inputs": {
        "samples": [f"{variant}_sample", 0], "filename_prefix": f"{prefix}/{variant}"}}
    graph[f"{variant}_decode"] = {"class_type": "VAEDecode", "inputs": {
        "samples": [f"{variant}_sample", 0], "vae": ["ckpt", 2]}}
    graph[f"{variant}_image"] = {"class_type": "SaveImage", "inputs": {
        "images": [f"{variant}_decode", 0], "filename_prefix": f"{prefix}/{variant}"}}


def parity_graph(prefix: str) -> dict:
    """The API-format prompt with every variant as its own branch off one checkpoint loader."""
    graph: dict = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT_NAME}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }
    sources = {
        "none": "ckpt",
        "core": _core_lora(graph, "core_lora", "ckpt", CHARACTER),
        "ours": _our_loader(graph, "ours_lora", "ckpt", CHARACTER),
    }
    for variant in VARIANTS:
        _sampling_branch(graph, variant, sources[variant], prefix)
    return graph


@pytest.fixture(scope="module")
def outputs(comfy_server):
    """{variant: (latent tensor, uint8 image array)} from one run of the parity prompt."""
    prefix = f"graph_parity_{uuid.uuid4().hex[:8]}"  # fresh output nodes: never served from the cache
    entry = comfy_server.run(parity_graph(prefix), timeout=300)
    results = {}
    for variant in VARIANTS:
        latent_files = entry["outputs"][f"{variant}_latent"]["latents"]
        image_files = entry["outputs"][f"{variant}_image"]["images"]
        assert len(latent_files) == 1 and len(image_files) == 1, entry["outputs"]
        latent_path = comfy_server.output_dir / latent_files[0]["subfolder"] / latent_files[0]["filename"]
        image_path = comfy_server.output_dir / image_files[0]["subfolder"] / image_files[0]["filename"]
        latent = load_file(str(latent_path))["latent_tensor"].float()
        image = np.asarray(Image.open(image_path).convert("RGB")).astype(np.int16)
        results[variant] = (latent, image)
    return results


def _check_parity(outputs, ours: str, core: str) -> None:
    our_latent, our_image = outputs[ours]
    core_latent, core_image = outputs[core]
    base_latent, base_image = outputs["none"]
    assert our_latent.shape == core_latent.shape == (1, 4, 8, 8)
    assert torch.isfinite(our_latent).all()
    tolerance = LATENT_RTOL * float(core_latent.abs().max())
    torch.testing.assert_close(our_latent, core_latent, rtol=0, atol=tolerance,
                               msg=lambda m: f"{ours} vs {core} latents: {m}")
    pixel_diff = int(np.abs(our_image - core_image).max())
    assert pixel_diff <= PIXEL_ATOL, f"{ours} vs {core}: images differ by up to {pixel_diff} levels"
    # The LoRA really changed the result: far beyond the tolerance, in latents and in pixels.
    latent_change = float((our_latent - base_latent).abs().mean())
    assert latent_change > 100 * tolerance, f"{ours} is too close to the no-LoRA output ({latent_change:.2e})"
    assert float(np.abs(our_image - base_image).mean()) > 1.0, f"{ours} image equals the no-LoRA image"


def test_loracoreloader_graph_equals_core_loraloader_and_differs_from_no_lora(outputs):
    _check_parity(outputs, "ours", "core")

