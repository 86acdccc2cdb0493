"""Layout key maps of variants with the same layout data share one alias table, and sharing changes nothing.

`registry.layout_key_map` builds a full-size variant's KeyMap from data alone; every LoRA read without a model
name in its metadata is detected against all of them, once per process. Variants whose layouts are the same data
(Flux.1-dev / Kontext / Fill, the Qwen-Image editions) now share the table built for the first of them. Here:
each variant's map equals a fresh, unshared build (aliases, targets, conflicts), names its own variant, and the
known same-layout variants do share.
"""
from __future__ import annotations

from lora_core.arch import registry
from lora_core.arch.bindings import bind_layout
from lora_core.arch.keymap import build_key_map, te_aliases


def test_every_layout_map_equals_a_fresh_build_and_names_its_own_variant():
    for name in registry.ARCHS:
        shared = registry.layout_key_map(name)
        fresh = build_key_map(bind_layout(registry.get_arch(name)))
        assert shared.arch is registry.get_arch(name), name
        assert dict(shared.aliases) == dict(fresh.aliases), name
        assert shared.conflicts == fresh.conflicts, name
        assert shared.targets == fresh.targets and shared.param_targets == fresh.param_targets, name
        assert shared.components == fresh.components and shared.te_layers == fresh.te_layers, name


def test_variants_with_the_same_layout_share_one_alias_table():
    tables = {name: registry.layout_key_map(name)._aliases for name in registry.ARCHS}
    for group in (("Flux.1-dev", "Flux.1-Kontext", "Flux.1-Fill"),
                  ("Qwen-Image", "Qwen-Image-Edit", "Qwen-Image-Edit-2509", "Qwen-Image-Layered")):
        assert all(tables[n] is tables[group[0]] for n in group), group
    # different layouts never share (1.3B and 5B Wan have the same names but other row counts)
    assert tables["Wan2.1-T2V-1.3B"] is not tables["Wan2.2-TI2V-5B"]
    assert tables["SD1"] is not tables["SD2"]
    assert len({id(t) for t in tables.values()}) < len(tables)


def test_text_encoder_aliases_are_made_once_and_handed_out_as_fresh_lists():
    spec = registry.get_arch("Flux.1-dev").components["te1"]
    path = "text_model.encoder.layers.0.self_attn.q_proj"
    first, second = te_aliases(spec, path), te_aliases(spec, path)
    assert first == second and first is not second
    first.append("changed by a caller")
    assert "changed by a caller" not in te_aliases(spec, path)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in second
