"""Live mode through the real ComfyUI server: re-queueing workflows/08_live_tuning.json with other strengths and
block vectors executes without any weight being written.

The server is the unpacked ComfyUI 0.3.75 host run as a subprocess (demo.server.ComfyServer) with one extra
custom-node folder written here, `lora_core_weight_spy`: on import it wraps every path through which ComfyUI
writes a model weight (ModelPatcher.patch_weight_to_device for a patched key, comfy.utils.set_attr_param and
copy_to_param, which restore backups, comfy.lora.calculate_weight, which computes a patched weight) with
counters, and serves them at GET /lora_core_test/weight_writes. The control: the same re-queue with the merged
node writes weights, so the spy sees what it must.
"""
from __future__ import annotations

import json
import urllib.request

import pytest

from demo import DEMO_MODELS, WORKFLOWS_DIR
from demo.server import ComfyServer
from demo.tiny_model import ensure_demo_models
from demo.workflow_api import load_workflow, ui_to_api

WORKFLOW = WORKFLOWS_DIR / "08_live_tuning.json"
TIMEOUT_S = 180.0

SPY = '''
"""Test-only spy (tests/test_live_server.py): counts ComfyUI's weight writes."""
import collections
import comfy.lora
import comfy.model_patcher
import comfy.utils
import server
from aiohttp import web

COUNTS = collections.Counter()


def _wrap(owner, name, keep=None):
    real = getattr(owner, name)

    def spy(*args, **kwargs):
        if keep is None or keep(*args, **kwargs):
            COUNTS[name] += 1
        return real(*args, **kwargs)

    setattr(owner, name, spy)


_wrap(comfy.model_patcher.ModelPatcher, "patch_weight_to_device", lambda self, key, *a, **k: key in self.patches)
_wrap(comfy.utils, "set_attr_param")
_wrap(comfy.utils, "copy_to_param")
_wrap(comfy.lora, "calculate_weight")


@server.PromptServer.instance.routes.get("/lora_core_test/weight_writes")
async def weight_writes(request):
    return web.json_response(dict(COUNTS))


NODE_CLASS_MAPPINGS = {}
'''


@pytest.fixture(scope="module")
def spied_server(tmp_path_factory):
    ensure_demo_models(DEMO_MODELS)
    base = tmp_path_factory.mktemp("comfyui-live-base")
    spy = base / "custom_nodes" / "lora_core_weight_spy"
    spy.mkdir(parents=True)
    (spy / "__init__.py").write_text(SPY)
    server = ComfyServer(base, DEMO_MODELS)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def writes(server) -> dict:
    with urllib.request.urlopen(server.url + "/lora_core_test/weight_writes", timeout=30) as response:
        return json.loads(response.read())


def _stack_node(api: dict) -> dict:
    return next(n for n in api.values() if n["class_type"] == "LoRACoreBlockStack")["inputs"]


def test_requeued_strength_and_block_change_writes_no_weight(spied_server):
    server = spied_server
    assert "lora_core_weight_spy" in server.log_path.read_text(errors="replace")
    object_info = server.object_info()
    workflow = load_workflow(WORKFLOW)
    api = ui_to_api(workflow, object_info)
    # The live half only (the Bake branch is the merged reference and writes weights by design).
    bake = next(i for i, n in api.items() if n["class_type"] == "LoRACoreBakeLive")
    dropped = {bake} | {i for i, n in api.items() if any(v == [bake, 0] for v in n["inputs"].values())}
    while True:
        more = {i for i, n in api.items() if i not in dropped
                and any(isinstance(v, list) and v[0] in dropped for v in n["inputs"].values())}
        if not more:
            break
        dropped |= more
    live_api = {i: n for i, n in api.items() if i not in dropped}
    first = server.run(live_api, timeout=TIMEOUT_S)
    first_images = [p.read_bytes() for p in server.output_images(first)]
    before = writes(server)
    stack = _stack_node(live_api)
    stack.update(strength_model_1=0.3, vector_1="IN*=1, OUT*=0.25", strength_model_2=1.1)
    second = server.run(live_api, timeout=TIMEOUT_S)
    assert writes(server) == before, f"a live re-queue wrote weights: {before} -> {writes(server)}"
    second_images = [p.read_bytes() for p in server.output_images(second)]
    assert second_images and second_images != first_images, "the new strengths did not change the image"

    # Control: the same change on the merged node is seen writing weights.
    merged_api = json.loads(json.dumps(live_api))
    for node in merged_api.values():
        if node["class_type"] == "LoRACoreApplyBlockStackLive":
            node["class_type"] = "LoRACoreApplyBlockStack"
    server.run(merged_api, timeout=TIMEOUT_S)
    loaded = writes(server)
    _stack_node(merged_api).update(strength_model_1=0.6)
    server.run(merged_api, timeout=TIMEOUT_S)
    after = writes(server)
    assert after.get("calculate_weight", 0) > loaded.get("calculate_weight", 0), (loaded, after)
    assert after.get("patch_weight_to_device", 0) > loaded.get("patch_weight_to_device", 0), (loaded, after)
