"""The example workflows (workflows/*.json) as a user meets them: ComfyUI 0.3.75 lists them in its template
browser for the pack (GET /workflow_templates, app/custom_node_manager.py scans custom_nodes/*/workflows/)
and serves each file (GET /api/workflow_templates/<pack folder>/<name>.json); each one uses only core nodes
and ours, explains itself in a Note, stays small enough to run in seconds on a CPU, and can be run twice
(every node that writes a file has overwrite on). Running them is tests/test_e2e_server.py's job."""
from __future__ import annotations

import json
import re
import urllib.request

import pytest

from demo import REPO, example_workflows
from demo.server import PACK_LINK_NAME
from demo.workflow_api import VIRTUAL_NODES, load_workflow, widget_layout

pytest_plugins = ["tests.e2e_helpers"]

EXPECTED = ["01_load_lora", "02_lora_stack", "03_block_weight_mix", "04_block_sweep_grid",
            "05_train_and_apply", "06_merge_export", "07_flux_block_weights", "08_live_tuning",
            "09_wan22_lora_pair"]
WORKFLOWS = example_workflows()
CORE_MODULES = ("nodes", "comfy_extras.")
MAX_LATENT_SIDE = 64
MAX_SAMPLER_STEPS = 4
MAX_VIDEO_FRAMES = 5
MAX_TRAIN_STEPS = 16
FILE_WRITERS = ("LoRACoreMergeSave", "LoRACoreResize", "LoRACoreTrain")


def _get(server, path: str):
    with urllib.request.urlopen(server.url + path, timeout=30) as response:
        return json.loads(response.read())


def widgets_by_name(node: dict, object_info: dict) -> dict:
    """A UI node's widget values by input name (the positional widgets_values mapped on the live schema)."""
    layout = widget_layout(object_info[node["type"]])
    values = node.get("widgets_values") or []
    assert len(values) == len(layout), f"node {node['id']} ({node['type']}): widget count"
    return {slot.input_name: value for slot, value in zip(layout, values) if slot.input_name}


def test_the_shipped_workflows_are_all_there():
    assert [path.stem for path in WORKFLOWS] == EXPECTED


def test_readme_table_lists_every_workflow():
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Example workflows\n", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"^\| `([^`]+)\.json` \|", section, re.M) == EXPECTED


def test_template_browser_lists_the_pack_workflows(comfy_server):
    templates = _get(comfy_server, "/workflow_templates")
    assert sorted(templates.get(PACK_LINK_NAME, [])) == EXPECTED, templates


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_template_is_served_as_saved(comfy_server, path):
    served = _get(comfy_server, f"/api/workflow_templates/{PACK_LINK_NAME}/{path.name}")
    assert served == load_workflow(path)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_uses_core_and_pack_nodes_and_explains_itself(object_info, path):
    workflow = load_workflow(path)
    assert workflow.get("version") == 0.4
    pack_module = f"custom_nodes.{PACK_LINK_NAME}"
    notes = [n for n in workflow["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert notes, f"{path.name} has no Note explaining it"
    assert any(len(" ".join(map(str, n.get("widgets_values") or []))) > 200 for n in notes), \
        f"{path.name}: its Note is too short to explain the workflow"
    modules = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODES:
            continue
        assert node["type"] in object_info, f"{path.name}: unknown node {node['type']}"
        modules[node["type"]] = object_info[node["type"]]["python_module"]
    foreign = {t: m for t, m in modules.items() if m != pack_module and not m.startswith(CORE_MODULES)}
    assert not foreign, f"{path.name} needs other packs: {foreign}"
    assert any(m == pack_module for m in modules.values()), f"{path.name} uses no LoRA Core node"
    assert all(n.get("mode", 0) == 0 for n in workflow["nodes"]), f"{path.name}: muted or bypassed nodes"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_small_and_can_run_again(object_info, path):
    for node in load_workflow(path)["nodes"]:
        kind = node["type"]
        if kind in VIRTUAL_NODES:
            continue
        widgets = widgets_by_name(node, object_info)
        where = f"{path.name} node {node['id']} ({kind})"
        if kind in ("EmptyLatentImage", "EmptySD3LatentImage"):
            assert max(widgets["width"], widgets["height"]) <= MAX_LATENT_SIDE, where
            assert widgets["batch_size"] == 1, where
        if kind == "EmptyHunyuanLatentVideo":
            assert max(widgets["width"], widgets["height"]) <= MAX_LATENT_SIDE, where
            assert widgets["length"] <= MAX_VIDEO_FRAMES and widgets["batch_size"] == 1, where
        if kind in ("KSampler", "KSamplerAdvanced"):
            assert widgets["steps"] <= MAX_SAMPLER_STEPS, where
        if kind == "LoRACoreTrain":
            assert widgets["steps"] <= MAX_TRAIN_STEPS, where
        if kind in FILE_WRITERS:
            assert widgets["overwrite"] is True, f"{where}: a second run would fail on the existing file"


WAN_WORKFLOW = REPO / "workflows" / "09_wan22_lora_pair.json"


def _links_into(workflow: dict) -> dict[tuple[int, str], int]:
    """(target node id, input name) -> source node id."""
    by_id = {n["id"]: n for n in workflow["nodes"]}
    sources = {}
    for _, src, _, dst, slot, _ in workflow["links"]:
        sources[(dst, by_id[dst]["inputs"][slot]["name"])] = src
    return sources


def test_wan_workflow_gives_each_expert_its_file_and_splits_one_schedule(object_info):
    """Workflow 09: the high-noise model file reaches the high-noise sampler through the pair loader's
    model_high_noise (and low through low), the two KSamplerAdvanced share seed, steps, cfg, sampler and
    scheduler, the high-noise one adds noise and hands over its leftover noise at the step the low-noise one
    starts from, and the Note says how the tiny model is driven and how to run the real one."""
    workflow = load_workflow(WAN_WORKFLOW)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    sources = _links_into(workflow)
    (pair,) = [n for n in nodes.values() if n["type"] == "LoRACoreWanPairLoader"]
    pair_widgets = widgets_by_name(pair, object_info)
    assert pair_widgets["lora_1"].endswith("_high_noise.safetensors")
    assert pair_widgets["lora_2"].endswith("_low_noise.safetensors")
    assert pair_widgets["block_vector"].strip(), "the example shows block weights (tests/test_e2e_wan.py: they act)"
    samplers = {}
    for node in nodes.values():
        if node["type"] != "KSamplerAdvanced":
            continue
        # sampler <- ModelSamplingSD3 <- pair loader output slot <- UNETLoader file
        sampling = nodes[sources[(node["id"], "model")]]
        assert sampling["type"] == "ModelSamplingSD3" and widgets_by_name(sampling, object_info)["shift"] == 8.0
        slot = next(link[2] for link in workflow["links"] if link[3] == sampling["id"])
        expert = pair["outputs"][slot]["name"]
        assert expert in ("model_high_noise", "model_low_noise")
        unet = nodes[sources[(pair["id"], expert)]]
        assert widgets_by_name(unet, object_info)["unet_name"].endswith(expert[len("model"):] + ".safetensors")
        samplers[expert] = widgets_by_name(node, object_info)
    high, low = samplers["model_high_noise"], samplers["model_low_noise"]
    shared = ("noise_seed", "steps", "cfg", "sampler_name", "scheduler")
    assert {k: high[k] for k in shared} == {k: low[k] for k in shared}
    assert (high["add_noise"], high["return_with_leftover_noise"], high["start_at_step"]) == ("enable", "enable", 0)
    assert (low["add_noise"], low["return_with_leftover_noise"]) == ("disable", "disable")
    assert 0 < high["end_at_step"] == low["start_at_step"] < high["steps"] <= low["end_at_step"]
    low_sampler = next(n for n in nodes.values() if n["type"] == "KSamplerAdvanced"
                       and widgets_by_name(n, object_info)["add_noise"] == "disable")
    assert nodes[sources[(low_sampler["id"], "latent_image")]]["type"] == "KSamplerAdvanced"
    note = " ".join(str(v) for n in nodes.values() if n["type"] == "Note" for v in n["widgets_values"])
    for needed in ("768-wide text input", "CLIP-L", "wan2.2_t2v_high_noise_14B", "wan2.2_t2v_low_noise_14B",
                   "umt5_xxl", "type wan", "wan_2.1_vae", "ModelSamplingSD3 shift 8", "cfg 3.5", "20 steps"):
        assert needed in note, f"the Note does not say {needed!r}"
