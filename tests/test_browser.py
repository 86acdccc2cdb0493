"""The real ComfyUI web frontend in headless Chromium: each workflow (the core sanity graph +
workflows/*.json) is dropped onto the canvas like a user drags a file, must load without a missing-node
dialog or error, must convert to the same API graph our converter makes, is queued with the Run button and
must produce an output image. A screenshot per workflow goes to test-artifacts/browser/."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from demo import REPO, SANITY_WORKFLOW, example_workflows
from demo.workflow_api import load_workflow, ui_to_api

pytest_plugins = ["tests.e2e_helpers"]
WORKFLOWS = [SANITY_WORKFLOW, *example_workflows()]
SCREENSHOTS = REPO / "test-artifacts" / "browser"
UI_TIMEOUT_MS = 60_000
RUN_TIMEOUT_S = 180.0


@pytest.fixture(scope="session")
def page(browser, comfy_server):
    """One frontend page for the session, with the first-visit Templates dialog and banner dismissed."""
    # Draw node text at any zoom (the screenshots fit whole graphs); the first-visit state is untouched.
    comfy_server.set_user_setting("LiteGraph.Canvas.MinFontSizeForLOD", 0)
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    # Only the loopback server may be reached; anything else (fonts, telemetry, docs) is refused here.
    context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(comfy_server.url)
                  or route.request.url.startswith(("data:", "blob:")) else route.abort())
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(comfy_server.url)
    page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=UI_TIMEOUT_MS)
    dismiss_first_visit(page)
    page.page_errors = errors  # type: ignore[attr-defined]
    yield page
    context.close()


def dismiss_first_visit(page) -> None:
    """Close the Templates dialog a first visit opens and the "Nodes 2.0" banner, if they are shown."""
    templates = page.locator('[role="dialog"][aria-labelledby="global-workflow-template-selector"]')
    try:
        templates.wait_for(state="visible", timeout=10_000)
    except Exception:  # noqa: BLE001 - not shown (settings say the visit is not the first): nothing to close
        pass
    if templates.is_visible():
        templates.locator("button:has(i.pi-times)").first.click()  # the dialog's close "x"
        templates.wait_for(state="hidden", timeout=10_000)
    banner_close = page.locator("div:has(> div > span:text-is('Introducing Nodes 2.0 – More flexible workflows, "
                                "powerful new widgets, built for extensibility')) > button")
    banner = page.get_by_text("Introducing Nodes 2.0")
    if banner.count() and banner.first.is_visible():
        if banner_close.count():
            banner_close.first.click()
        else:  # the close "x" is the last button of the banner row
            banner.first.locator("xpath=ancestor::div[button][1]/button[last()]").click()
        banner.first.wait_for(state="hidden", timeout=10_000)


def visible_dialogs(page) -> list[str]:
    texts = []
    for dialog in page.locator('[role="dialog"], [role="alertdialog"]').all():
        if dialog.is_visible():
            texts.append(dialog.inner_text()[:600])
    return texts


def error_toasts(page) -> list[str]:
    return [t.inner_text()[:600] for t in page.locator(".p-toast-message-error").all() if t.is_visible()]


def drop_workflow_file(page, path: Path) -> None:
    """What a drag and drop of the .json file onto the canvas does: a `drop` event carrying the File."""
    data_transfer = page.evaluate_handle(
        """([name, text]) => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([text], name, {type: 'application/json'}));
            return transfer;
        }""", [path.name, path.read_text()])
    page.dispatch_event("#graph-canvas", "drop", {"dataTransfer": data_transfer})


def graph_state(page) -> dict:
    return page.evaluate("""() => ({
        count: window.app.graph.nodes.length,
        types: window.app.graph.nodes.map(n => n.type),
        unknown: window.app.graph.nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type),
        errors: window.app.graph.nodes.filter(n => n.has_errors).map(n => `${n.id} ${n.type}`),
    })""")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_queues_and_renders_in_browser(page, comfy_server, object_info, path):
    workflow = load_workflow(path)
    drop_workflow_file(page, path)
    expected_types = sorted(n["type"] for n in workflow["nodes"])
    page.wait_for_function("(n) => window.app.graph.nodes.length === n", arg=len(workflow["nodes"]),
                           timeout=UI_TIMEOUT_MS)
    page.wait_for_timeout(500)  # let a missing-node dialog or toast open, if the load produced one
    state = graph_state(page)
    assert sorted(state["types"]) == expected_types, "the dropped workflow was not the one loaded"
    assert not visible_dialogs(page), f"dialog after loading {path.name}: {visible_dialogs(page)}"
    assert not error_toasts(page), f"error after loading {path.name}: {error_toasts(page)}"
    assert not state["unknown"], f"frontend does not know node types {state['unknown']}"
    assert not state["errors"], f"nodes flagged with errors: {state['errors']}"

    # The frontend's own conversion is the reference for demo.workflow_api.ui_to_api.
    frontend_api = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    ours = ui_to_api(workflow, object_info)
    assert {k: v["class_type"] for k, v in frontend_api.items()} == {k: v["class_type"] for k, v in ours.items()}
    for node_id, node in frontend_api.items():
        assert node["inputs"] == ours[node_id]["inputs"], f"node {node_id} ({node['class_type']}) converts differently"

    # Drop cached results so the run really executes, then press Run like a person.
    comfy_server.free_memory()
    time.sleep(1.0)
    started = time.time()
    with page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST",
                              timeout=UI_TIMEOUT_MS) as response_info:
        page.locator('button[aria-label="Run"]').first.click()
    response = response_info.value
    answer = response.json()
    assert response.status == 200 and not answer.get("node_errors"), json.dumps(answer)[:3000]
    entry = comfy_server.wait_history(answer["prompt_id"], timeout=RUN_TIMEOUT_S)
    images = comfy_server.output_images(entry)
    assert images and all(image.stat().st_mtime >= started - 1 for image in images), images
    # The frontend received the result for the output node (what it draws on the SaveImage node).
    output_ids = [nid for nid, n in frontend_api.items() if object_info[n["class_type"]].get("output_node")]
    page.wait_for_function(
        """(ids) => ids.some(id => (window.app.nodeOutputs?.[id]?.images ?? []).length > 0)""",
        arg=output_ids, timeout=UI_TIMEOUT_MS)
    page.wait_for_timeout(300)
    assert not error_toasts(page), f"error after running {path.name}: {error_toasts(page)}"
    assert not visible_dialogs(page), f"dialog after running {path.name}: {visible_dialogs(page)}"
    fit_view = page.locator('button[aria-label^="Fit View"]')
    if fit_view.count():  # show the whole graph, the SaveImage preview included
        fit_view.first.click()
        page.wait_for_timeout(500)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{path.stem}.png"))
    assert not page.page_errors, page.page_errors
