"""docs/NODES.md (the node reference the README links) matches the pack as ComfyUI loads it: one table row per
node id with its display name, category, inputs in order with their types, and outputs, and no row for a node
the pack no longer has.

Regenerate the file after changing a node's inputs or outputs:

    .venv/bin/python -m tests.test_readme_nodes
"""
from __future__ import annotations

import re
import sys

from tests.comfy_host import REPO
from tests.pack import load_pack

NODES_MD = REPO / "docs" / "NODES.md"
ROW_ID = re.compile(r"^\| `([A-Za-z0-9_]+)` \|", re.MULTILINE)

HEADER = """# LoRA Core node reference

Every node of the pack, as ComfyUI lists it. **Inputs** are in the order the node defines them, which is the
order of the widget values a saved workflow stores (new inputs are only ever added at the end); *optional*
inputs may be left unconnected. A `COMBO` is a drop-down list (LoRA files, modes, presets). Outputs marked
*list* emit one value per item (a KSampler after them runs once per item).

Example workflows using these nodes are in [`workflows/`](../workflows/) (also listed in ComfyUI's template
browser under *comfyui-lora-core*).

This file is generated from the nodes' `INPUT_TYPES` / `RETURN_TYPES` and checked by
`tests/test_readme_nodes.py`; regenerate it with `.venv/bin/python -m tests.test_readme_nodes`.

| Node id | Display name | Category | Inputs (in order) | Outputs |
|---|---|---|---|---|
"""


def _type_name(kind) -> str:
    return "COMBO" if isinstance(kind, (list, tuple)) else str(kind)


def input_cells(node_class) -> list[str]:
    """`name`: TYPE for each required then optional input, in definition order (hidden inputs left out)."""
    spec = node_class.INPUT_TYPES()
    cells = []
    for section in ("required", "optional"):
        for name, entry in (spec.get(section) or {}).items():
            cell = f"`{name}`: {_type_name(entry[0])}"
            cells.append(cell + " *(optional)*" if section == "optional" else cell)
    return cells


def output_cells(node_class) -> list[str]:
    types = list(node_class.RETURN_TYPES)
    names = list(getattr(node_class, "RETURN_NAMES", None) or types)
    is_list = list(getattr(node_class, "OUTPUT_IS_LIST", None) or [False] * len(types))
    return [f"`{name}`: {_type_name(kind)}" + (" *(list)*" if listed else "")
            for name, kind, listed in zip(names, types, is_list)]


def node_row(node_id: str, node_class, display_name: str) -> str:
    inputs = "<br>".join(input_cells(node_class)) or "—"
    outputs = "<br>".join(output_cells(node_class)) or "—"
    return f"| `{node_id}` | {display_name} | {node_class.CATEGORY} | {inputs} | {outputs} |"


def expected_rows() -> dict[str, str]:
    """{node id: its table row}, ordered by category (case-insensitive), then as the pack registers them."""
    pack = load_pack()
    ids = list(pack.NODE_CLASS_MAPPINGS)
    ordered = sorted(ids, key=lambda i: (pack.NODE_CLASS_MAPPINGS[i].CATEGORY.lower(), ids.index(i)))
    return {node_id: node_row(node_id, pack.NODE_CLASS_MAPPINGS[node_id],
                              pack.NODE_DISPLAY_NAME_MAPPINGS.get(node_id, node_id))
            for node_id in ordered}


def render() -> str:
    return HEADER + "\n".join(expected_rows().values()) + "\n"


def documented_ids(text: str) -> list[str]:
    return ROW_ID.findall(text)


# --------------------------------------------------------------------------------------------------- tests

def test_every_node_is_documented_with_its_inputs_and_outputs():
    text = NODES_MD.read_text()
    rows = expected_rows()
    assert rows, "the pack registers no nodes"
    lines = set(text.splitlines())
    stale = {node_id: row for node_id, row in rows.items() if row not in lines}
    assert not stale, ("docs/NODES.md is out of date for " + ", ".join(stale) + "; expected rows:\n"
                       + "\n".join(stale.values()) + "\nRegenerate: .venv/bin/python -m tests.test_readme_nodes")


def test_no_unknown_or_duplicate_node_in_the_reference():
    documented = documented_ids(NODES_MD.read_text())
    known = set(load_pack().NODE_CLASS_MAPPINGS)
    assert sorted(set(documented) - known) == [], "docs/NODES.md lists nodes the pack does not have"
    assert len(documented) == len(set(documented)), "a node has more than one row in docs/NODES.md"
    assert set(documented) == known


def test_rows_reflect_the_node_definitions():
    """The row format really carries the contract: a changed input order or type changes the row."""
    pack = load_pack()
    loader = pack.NODE_CLASS_MAPPINGS["LoRACoreLoader"]
    row = expected_rows()["LoRACoreLoader"]
    cells = input_cells(loader)
    assert cells[:2] == ["`model`: MODEL", "`lora_name`: COMBO"]
    assert cells[-1] == "`clip`: CLIP *(optional)*"
    assert row.endswith("| `MODEL`: MODEL<br>`CLIP`: CLIP<br>`report`: STRING |")

    class Reordered(loader):
        @classmethod
        def INPUT_TYPES(cls):
            spec = loader.INPUT_TYPES()
            required = dict(reversed(list(spec["required"].items())))
            return {**spec, "required": required}

    assert node_row("LoRACoreLoader", Reordered, "Load LoRA (LoRA Core)") not in NODES_MD.read_text()


if __name__ == "__main__":
    NODES_MD.write_text(render())
    print(f"wrote {NODES_MD} ({len(expected_rows())} nodes)", file=sys.stderr)
