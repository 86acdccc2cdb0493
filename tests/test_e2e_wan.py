"""workflows/09_wan22_lora_pair.json on the real ComfyUI server: core's loaders offer the tiny Wan 2.2 assets,
the workflow writes a 5-frame 64x64 animated WebP and the pair loader's report says which file went where,
core's own LoRA loader places every key of the tiny pair on the tiny experts, and the graph renders the same
frames with our pair loader as with two core LoRA loaders (one per expert) when no block vector is set."""
from __future__ import annotations

import io
import time

from PIL import Image, ImageChops

from demo import WORKFLOWS_DIR
from demo.tiny_flux import CLIP_L_NAME
from demo.tiny_wan import EXPERT_NAMES, LORA_NAMES, VAE_NAME
from demo.workflow_api import load_workflow, ui_to_api

pytest_plugins = ["tests.e2e_helpers"]
WAN_WORKFLOW = WORKFLOWS_DIR / "09_wan22_lora_pair.json"
TIMEOUT_S = 180.0
FRAMES, SIDE = 5, 64   # EmptyHunyuanLatentVideo length 5 -> 2 latent frames -> 1 + 4 decoded frames


def _api(object_info, seed: int) -> dict:
    """Workflow 09 as the frontend queues it, with a seed of this test's own (so nothing is served from cache)."""
    api = ui_to_api(load_workflow(WAN_WORKFLOW), object_info)
    for node in api.values():
        if node["class_type"] == "KSamplerAdvanced":
            node["inputs"]["noise_seed"] = seed
    return api


def _node(api: dict, class_type: str) -> str:
    (node_id,) = [nid for nid, n in api.items() if n["class_type"] == class_type]
    return node_id


def _frames(path) -> list[Image.Image]:
    image = Image.open(io.BytesIO(path.read_bytes()))
    frames = []
    for index in range(getattr(image, "n_frames", 1)):
        image.seek(index)
        frames.append(image.convert("RGB"))
    return frames


def _run(comfy_server, api: dict) -> tuple[dict, str]:
    before = len(comfy_server.log_path.read_text(errors="replace"))
    entry = comfy_server.run(api, timeout=TIMEOUT_S)
    return entry, comfy_server.log_path.read_text(errors="replace")[before:]


def test_tiny_wan_assets_are_offered_by_core_loaders(object_info):
    def choices(node, name):
        return object_info[node]["input"]["required"][name][0]

    assert set(EXPERT_NAMES.values()) <= set(choices("UNETLoader", "unet_name"))
    assert VAE_NAME in choices("VAELoader", "vae_name")
    assert CLIP_L_NAME in choices("CLIPLoader", "clip_name")
    assert set(LORA_NAMES.values()) <= set(choices("LoraLoader", "lora_name"))


def test_wan_workflow_writes_an_animated_webp_and_reports_the_pair(comfy_server, object_info):
    api = _api(object_info, seed=901)
    # the pair loader's report into core's Preview Any, as the Note suggests (added here in API form: the
    # frontend gives Preview Any a display widget of its own that a saved workflow would carry)
    api["930"] = {"class_type": "PreviewAny", "inputs": {"source": [_node(api, "LoRACoreWanPairLoader"), 3]}}
    comfy_server.free_memory()   # the experts really load again (the browser test may have run 09 before)
    time.sleep(1.0)
    entry, log = _run(comfy_server, api)
    assert "Using mixed precision operations" in log and "Requested to load WAN21" in log, log[-3000:]
    (webp,) = comfy_server.output_images(entry)
    assert webp.suffix == ".webp" and webp.read_bytes()[8:12] == b"WEBP"
    frames = _frames(webp)
    assert len(frames) == FRAMES and all(frame.size == (SIDE, SIDE) for frame in frames)
    assert any(ImageChops.difference(frames[0], frame).getbbox() for frame in frames[1:]), "all frames identical"
    (report,) = entry["outputs"]["930"]["text"]
    assert report.startswith(f"Wan 2.2 pair: high noise <- {LORA_NAMES['high']}, low noise <- "
                             f"{LORA_NAMES['low']} ({LORA_NAMES['high']}: modelspec.timestep_range 875,1000; "
                             f"{LORA_NAMES['low']}: modelspec.timestep_range 0,875)"), report[:400]
    assert "[high noise]" in report and "[low noise]" in report


def test_core_lora_loader_places_every_key_of_the_tiny_wan_pair(comfy_server, object_info):
    """Workflow 09 with core's LoraLoaderModelOnly per expert in place of our pair loader: no 'lora key not
    loaded', so the pair are real musubi files for the tiny experts as core reads them."""
    api = _core_pair_graph(_api(object_info, seed=902))
    entry, log = _run(comfy_server, api)
    assert comfy_server.output_images(entry)
    assert "Requested to load WAN21" in log, "the Wan graph did not run (all cached?)"
    assert "lora key not loaded" not in log, [line for line in log.splitlines() if "lora key not loaded" in line][:5]


def _core_pair_graph(api: dict) -> dict:
    """Our pair loader replaced by two core LoraLoaderModelOnly (high file -> high model, low -> low); the CLIP
    goes straight to the text encoders (the tiny pair has no text-encoder part)."""
    ours = _node(api, "LoRACoreWanPairLoader")
    pair = api.pop(ours)["inputs"]
    assert (pair["lora_1"], pair["lora_2"]) == (LORA_NAMES["high"], LORA_NAMES["low"])
    api["920"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": pair["model_high_noise"], "lora_name": pair["lora_1"], "strength_model": pair["strength_high"]}}
    api["921"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": pair["model_low_noise"], "lora_name": pair["lora_2"], "strength_model": pair["strength_low"]}}
    for node in api.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and value[0] == ours:
                node["inputs"][name] = {0: ["920", 0], 1: ["921", 0], 2: pair["clip"]}[value[1]]
    return api


def test_graph_renders_the_same_frames_with_our_pair_loader_as_with_core_loaders(comfy_server, object_info):
    """Without a block vector, our pair loader and core's loader on each expert give the same video (lossless
    WebP; at most 2 of 255 levels apart per pixel: the patched weights agree to float rounding, not bit for bit)."""
    def render(api: dict, prefix: str) -> list[Image.Image]:
        save = _node(api, "SaveAnimatedWEBP")
        api[save]["inputs"].update(lossless=True, filename_prefix=prefix)
        entry, _ = _run(comfy_server, api)
        (webp,) = comfy_server.output_images(entry)
        return _frames(webp)

    ours_api = _api(object_info, seed=903)
    ours_api[_node(ours_api, "LoRACoreWanPairLoader")]["inputs"]["block_vector"] = ""
    ours = render(ours_api, "lora_core_test_wan_ours")
    core = render(_core_pair_graph(_api(object_info, seed=903)), "lora_core_test_wan_core")
    assert len(ours) == len(core) == FRAMES
    for index, (a, b) in enumerate(zip(ours, core)):
        worst = max(high for _, high in ImageChops.difference(a, b).getextrema())
        assert worst <= 2, f"frame {index}: ours and core's differ by {worst} levels"
    # and the block vector the workflow ships with does change the video
    shipped = render(_api(object_info, seed=903), "lora_core_test_wan_blocks")
    assert any(ImageChops.difference(a, b).getbbox() for a, b in zip(shipped, ours)), "block vector had no effect"
