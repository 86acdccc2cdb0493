"""Shared end-to-end fixtures: one real ComfyUI server (and one headless Chromium) per pytest session.

Test modules use them with `pytest_plugins = ["tests.e2e_helpers"]` (a plugin is registered once, so both
e2e test files share the same server). The server runs the unpacked ComfyUI 0.3.75 host with this repository
linked in as a custom-node pack, the tiny seeded SD1.5 checkpoint and LoRAs (demo/tiny_model.py) and the tiny
Flux.1 with its CLIP-L, TAEF1 and LoRAs (demo/tiny_flux.py), cached in demo-output/models with version stamps,
a fresh base directory (so the frontend sees a first visit), and writes images to that base directory's output/.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from demo import DEMO_MODELS, REPO
from demo.server import ComfyServer
from demo.tiny_model import ensure_demo_models

ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = os.environ.get("LORA_CORE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  # Nothing leaves the machine: every host name but the loopback server fails to resolve.
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """The running server (demo.server.ComfyServer). Fails (never skips) when it cannot start."""
    models = Path(os.environ.get("LORA_CORE_E2E_MODELS", DEMO_MODELS))
    ensure_demo_models(models)
    base = tmp_path_factory.mktemp("comfyui-base")
    server = ComfyServer(base, models)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        # Keep the server log with the artifacts: the first place to look when an e2e test fails.
        ARTIFACTS.mkdir(exist_ok=True)
        try:
            (ARTIFACTS / "comfyui-server.log").write_bytes(server.log_path.read_bytes())
        except OSError:
            pass


@pytest.fixture(scope="session")
def object_info(comfy_server) -> dict:
    return comfy_server.object_info()


@pytest.fixture(scope="session")
def browser():
    """Headless Debian Chromium driven by Playwright. A browser that cannot start fails the test."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (`make setup` runs apt-get install chromium).")
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            yield instance
        finally:
            instance.close()
