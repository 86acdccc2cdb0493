"""End to end against the real ComfyUI server: the pack loads, its nodes are listed, and every workflow
(the core sanity graph + workflows/*.json, collected at run time) validates and runs to an output image."""
from __future__ import annotations

import json
import time

import pytest

from demo import SANITY_WORKFLOW, WORKFLOWS_DIR, example_workflows
from demo.server import PACK_LINK_NAME
from demo.tiny_flux import CLIP_L_NAME, FLUX_NAME, TAEF1_CHOICE
from demo.workflow_api import (load_workflow, output_node_ids, ui_to_api, validate_workflow,
                               widget_layout)

# Fixtures (one server per session, shared with test_browser.py). Not imported by name: pytest loads it.
pytest_plugins = ["tests.e2e_helpers"]
WORKFLOW_TIMEOUT_S = 180.0
# The core sanity graph, then workflows/*.json as they exist when the tests are collected.
WORKFLOWS = [SANITY_WORKFLOW, *example_workflows()]
FLUX_WORKFLOW = WORKFLOWS_DIR / "07_flux_block_weights.json"


def test_pack_imports_and_registers_all_its_nodes(comfy_server, object_info):
    error = comfy_server.pack_import_error()
    assert error is None, f"ComfyUI could not import LoRA Core:\n{error}"
    from tests.pack import load_pack  # the pack as ComfyUI imports it, in this process

    pack_node_ids = set(load_pack().NODE_CLASS_MAPPINGS)
    assert pack_node_ids, "the pack's NODE_CLASS_MAPPINGS is empty"
    missing = sorted(pack_node_ids - set(object_info))
    assert not missing, f"pack nodes missing from /object_info: {missing}"
    # They are listed as coming from our pack folder, not shadowed by another module of the same id.
    modules = {object_info[node]["python_module"] for node in pack_node_ids}
    assert modules == {f"custom_nodes.{PACK_LINK_NAME}"}, modules


def test_tiny_checkpoint_and_loras_are_offered(object_info):
    checkpoints = object_info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    loras = object_info["LoraLoader"]["input"]["required"]["lora_name"][0]
    assert "lora_core_tiny_sd15.safetensors" in checkpoints
    assert {"tiny_character.safetensors", "tiny_style.safetensors", "tiny_detail_locon.safetensors"} <= set(loras)


def test_tiny_flux_assets_are_offered_by_core_loaders(object_info):
    """The tiny Flux, its CLIP-L, TAEF1 (from the two vae_approx files) and the Flux LoRAs are in the combos of
    core's Load Diffusion Model, Load CLIP, Load VAE and Load LoRA."""
    def choices(node, name):
        return object_info[node]["input"]["required"][name][0]

    assert FLUX_NAME in choices("UNETLoader", "unet_name")
    assert CLIP_L_NAME in choices("CLIPLoader", "clip_name")
    assert TAEF1_CHOICE in choices("VAELoader", "vae_name")
    assert {"tiny_flux_character.safetensors", "tiny_flux_style.safetensors"} <= set(choices("LoraLoader", "lora_name"))


def test_validator_reports_broken_workflows(object_info):
    """The validator the other tests rely on must catch what breaks a workflow (so a pass means something)."""
    good = load_workflow(SANITY_WORKFLOW)
    assert validate_workflow(good, object_info) == []
    broken = json.loads(json.dumps(good))
    by_type = {n["type"]: n for n in broken["nodes"]}
    by_type["KSampler"]["widgets_values"].pop(1)  # lose the control_after_generate value
    by_type["VAEDecode"]["type"] = "NoSuchNodeType"
    by_type["CheckpointLoaderSimple"]["widgets_values"] = ["missing.safetensors"]
    broken["links"][0][5] = "LATENT"  # CheckpointLoader MODEL -> LoraLoader.model now claims LATENT
    problems = "\n".join(validate_workflow(broken, object_info))
    assert "KSampler" in problems and "widget" in problems
    assert "NoSuchNodeType" in problems
    assert "missing.safetensors" in problems
    assert "LATENT" in problems


def test_seed_widgets_carry_the_frontend_control_value(object_info):
    layout = [slot.what for slot in widget_layout(object_info["KSampler"])]
    assert layout[:2] == ["value", "control_after_generate"]
    assert len(layout) == 7


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_validates_and_runs(comfy_server, object_info, path):
    workflow = load_workflow(path)
    problems = validate_workflow(workflow, object_info)
    assert not problems, f"{path.name} does not validate against /object_info:\n" + "\n".join(problems)
    api = ui_to_api(workflow, object_info)
    assert output_node_ids(api, object_info), f"{path.name} has no output node"
    started = time.time()
    entry = comfy_server.run(api, workflow=workflow, timeout=WORKFLOW_TIMEOUT_S)
    images = comfy_server.output_images(entry)
    assert images, f"{path.name} ran but reported no output image: {entry.get('outputs')}"
    fresh = [image for image in images if image.stat().st_mtime >= started - 1]
    assert fresh or _was_cached(entry), f"{path.name}: reported images are stale: {images}"
    for image in images:
        head = image.read_bytes()[:12]
        # PNG, or (SaveAnimatedWEBP, workflow 09) a RIFF WebP
        assert image.stat().st_size > 100 and (head[:8] == b"\x89PNG\r\n\x1a\n" or
                                                (head[:4], head[8:12]) == (b"RIFF", b"WEBP")), image


def test_core_loraloader_uses_every_key_of_the_tiny_loras(comfy_server, object_info):
    """Core's LoraLoader logs 'lora key not loaded' for every key it cannot place: none may appear for any
    tiny LoRA, so they really fit the tiny checkpoint (the pack's tests rely on that). One prompt chains all
    three LoRAs after the sanity graph's own loader."""
    api = ui_to_api(load_workflow(SANITY_WORKFLOW), object_info)
    first = next(nid for nid, n in api.items() if n["class_type"] == "LoraLoader")
    api[first]["inputs"].update(lora_name="tiny_character.safetensors", strength_model=0.5)  # not cached
    previous = first
    for new_id, lora in (("900", "tiny_style.safetensors"), ("901", "tiny_detail_locon.safetensors")):
        api[new_id] = {"class_type": "LoraLoader", "inputs": {
            "model": [previous, 0], "clip": [previous, 1], "lora_name": lora,
            "strength_model": 0.7, "strength_clip": 0.7}}
        previous = new_id
    for node_id, node in api.items():
        if node_id in (first, "900", "901"):
            continue
        for name, value in node["inputs"].items():
            if isinstance(value, list) and value[0] == first:
                node["inputs"][name] = [previous, value[1]]
    before = len(comfy_server.log_path.read_text(errors="replace"))
    entry = comfy_server.run(api, timeout=WORKFLOW_TIMEOUT_S)
    assert comfy_server.output_images(entry)
    log = comfy_server.log_path.read_text(errors="replace")[before:]
    assert "Requested to load" in log, "the LoRA graph did not run (all cached?)"
    assert "lora key not loaded" not in log, [l for l in log.splitlines() if "lora key not loaded" in l][:5]


def test_core_loaders_use_every_key_of_the_tiny_flux_loras(comfy_server, object_info):
    """The Flux example graph with core's LoraLoader (both tiny Flux LoRAs chained) in place of our block stack:
    core loads the tiny Flux as FLUX and places every key of both files (no 'lora key not loaded'), CLIP-L
    (lora_te1_) keys included, so the demo's Flux LoRAs are real kohya Flux files for the tiny model."""
    api = ui_to_api(load_workflow(FLUX_WORKFLOW), object_info)
    ours = next(nid for nid, n in api.items() if n["class_type"] == "LoRACoreApplyBlockStack")
    stack = api.pop(api[ours]["inputs"]["block_stack"][0])["inputs"]
    assert [stack["lora_1"], stack["lora_2"]] == ["tiny_flux_character.safetensors", "tiny_flux_style.safetensors"]
    model, clip = api[ours]["inputs"]["model"], api[ours]["inputs"]["clip"]
    api[ours] = {"class_type": "LoraLoader", "inputs": {
        "model": model, "clip": clip, "lora_name": stack["lora_1"], "strength_model": 0.9, "strength_clip": 0.9}}
    api["910"] = {"class_type": "LoraLoader", "inputs": {
        "model": [ours, 0], "clip": [ours, 1], "lora_name": stack["lora_2"], "strength_model": 0.9,
        "strength_clip": 0.9}}
    for node_id, node in api.items():
        if node_id in (ours, "910"):
            continue
        for name, value in node["inputs"].items():
            if isinstance(value, list) and value[0] == ours:
                node["inputs"][name] = ["910", value[1]]
    before = len(comfy_server.log_path.read_text(errors="replace"))
    entry = comfy_server.run(api, timeout=WORKFLOW_TIMEOUT_S)
    assert comfy_server.output_images(entry)
    log = comfy_server.log_path.read_text(errors="replace")[before:]
    assert "Requested to load Flux" in log, "the Flux graph did not run (all cached?)"
    assert "lora key not loaded" not in log, [l for l in log.splitlines() if "lora key not loaded" in l][:5]


def _was_cached(entry: dict) -> bool:
    return any(kind == "execution_cached" and data.get("nodes") for kind, data in entry["status"]["messages"])
