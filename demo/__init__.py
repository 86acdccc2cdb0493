"""End-to-end infrastructure for LoRA Core: tiny seeded SD1.5 and Flux.1 assets, the real ComfyUI server as a
subprocess, UI-workflow -> API conversion and validation. `python -m demo` (make demo) runs every example workflow;
`python -m demo --serve` (make serve) starts the same server for a person.

Not part of the node pack: ComfyUI never imports this package (the pack's __init__.py only imports nodes/).
"""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS_DIR = REPO / "workflows"
# A core-only graph (tiny checkpoint + core LoraLoader) kept with the tests, so workflows/ holds only the
# pack's shipped examples.
SANITY_WORKFLOW = REPO / "tests" / "data" / "core_sanity.json"
DEMO_OUTPUT = REPO / "demo-output"
DEMO_MODELS = DEMO_OUTPUT / "models"


def example_workflows() -> list[Path]:
    """The pack's example workflows (workflows/*.json), sorted by name; new files are picked up automatically."""
    return sorted(WORKFLOWS_DIR.glob("*.json")) if WORKFLOWS_DIR.is_dir() else []
