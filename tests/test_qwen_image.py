"""Qwen-Image (and Edit, Edit-2509/2511, Layered) end to end in the real host (ComfyUI 0.3.75): recognition that
claims no other family's state dicts, a key map that is a superset of core's, every writer's file equal to core's
loader where core reads it (1e-5 of the delta at 1.0 and -0.6, same patched keys) and to core on the same tensors
under names it reads where it cannot, the Qwen2.5-VL text encoder where the CLIP holds it, fit and mismatch errors
across families and sizes, block weights (named syntax, element kinds, Inspire's BASE-only behaviour, block info,
sweep), merges that load to the stack's weights in core and ours, and `LoraPatcher` on diffusers'
`QwenImageTransformer2DModel` against diffusers' own `load_lora_weights` + `fuse_lora`.
"""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers.loaders import QwenImageLoraLoaderMixin

from tests.comfy_host import import_comfy
from tests.pack import block_stack_rows, core_drops, diffusers_fuse_reference, loras_folder, node_module
from tests import dit_writers as dw
from tests import lora_writers as lw
from tests import qwen_image_writers as qw
from tests import tiny_models as tm
from tests import tiny_qwen_image as tq
from tests.test_flux import assert_merged_file_equals_stack, assert_same, bake, compare

comfy = import_comfy()
import comfy.lora  # noqa: E402
import comfy.utils  # noqa: E402

from lora_core.arch import registry  # noqa: E402
from lora_core.arch.families import flux as flux_family, qwen_image as qwen_family, sd as sd_family  # noqa: E402
from lora_core.errors import LoraMatchError  # noqa: E402


@pytest.fixture(scope="module")
def qwen():
    return tq.comfy_qwen_image(), tq.comfy_clip_qwen_image()


@pytest.fixture(scope="module")
def twin():
    return tq.diffusers_qwen_image_twin()


# ------------------------------------------------------------------------------------- recognition, key map

def test_recognition_claims_only_qwen_image_state_dicts(qwen, twin):
    model, _ = qwen
    keys = {k[len("diffusion_model."):]: tuple(v.shape) for k, v in model.model.state_dict().items()
            if k.startswith("diffusion_model.")}
    found = registry.detect_host(list(keys), keys, model.model.model_config.unet_config, "QwenImage")
    assert found is not None and found[0] is qwen_family.FAMILY and found[1].name == "Qwen-Image"
    spec = found[2]
    assert (spec.hidden, spec.depth, spec.mlp_hidden, spec.context) == (tq.HIDDEN, tq.DEPTH, 4 * tq.HIDDEN, tq.CONTEXT)
    dif = {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    assert registry.detect_diffusers(list(dif), dif)[0] is qwen_family.FAMILY
    # neither Flux nor SD claims it, and it claims neither Flux (BFL or diffusers names) nor SD
    for family in (flux_family.FAMILY, sd_family.FAMILY):
        assert family.detect_host(list(keys), keys, None) is None and family.detect_diffusers(list(dif), dif) is None
    flux = tm.comfy_flux()
    flux_keys = {k[len("diffusion_model."):]: tuple(v.shape) for k, v in flux.model.state_dict().items()
                 if k.startswith("diffusion_model.")}
    flux_dif = {k: tuple(v.shape) for k, v in dw.diffusers_flux_twin().state_dict().items()}
    sd_keys = {k[len("diffusion_model."):]: tuple(v.shape) for k, v in tm.comfy_sd15().model.state_dict().items()
               if k.startswith("diffusion_model.")}
    for other in (flux_keys, sd_keys):
        assert qwen_family.FAMILY.detect_host(list(other), other, None) is None
    assert qwen_family.FAMILY.detect_diffusers(list(flux_dif), flux_dif) is None
    assert registry.detect_diffusers(list(flux_dif), flux_dif)[0] is flux_family.FAMILY


def test_key_map_is_a_superset_of_cores(qwen):
    """Every name core 0.3.75 maps on this model (model_lora_keys_unet + model_lora_keys_clip: generic
    `diffusion_model.`, `lora_unet_`, bare, `transformer.`, `lycoris_`, `text_encoders.qwen25_7b...`) resolves in
    ours to the same host tensor."""
    model, clip = qwen
    core = comfy.lora.model_lora_keys_unet(model.model, {})
    core = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, core)
    ours = node_module("_host").HostModels(model, clip).key_map
    assert ours.conflicts == []
    checked = 0
    for name, target in core.items():
        host_key = target if isinstance(target, str) else target[0]
        resolved = ours.resolve(name)
        assert resolved is not None, f"core maps {name!r} -> {host_key}; ours does not"
        if resolved.param == "weight" or not host_key.endswith(".weight"):
            assert host_key in resolved.host_keys, f"{name!r}: core {host_key}, ours {resolved.host_keys}"
        checked += 1
    assert checked > 200
    # and the blocks and kinds are the family's
    assert ours.resolve("transformer_blocks.1.attn.add_k_proj").block == "B01"
    assert ours.resolve("lora_unet_transformer_blocks_0_txt_mlp_net_2").kind == "txt_mlp"
    assert ours.resolve("diffusion_model.img_in").block == "IN"
    assert ours.resolve("transformer.norm_out.linear").block == "OUT"
    assert ours.resolve("text_encoders.qwen25_7b.transformer.model.layers.1.mlp.up_proj").component == "te1"


# ------------------------------------------------------------------------------------- writers core reads

WRITERS_CORE_READS = {
    "comfy-native": lambda m, t: qw.comfy_native(m, seed=1),
    "comfy-native-lora_A/B": lambda m, t: qw.comfy_native(m, seed=2, peft_suffixes=True),
    "ai-toolkit": lambda m, t: qw.ai_toolkit(m, seed=3),
    "diffusion-pipe": lambda m, t: qw.diffusion_pipe(t, seed=4),
    "diffusers-peft": lambda m, t: qw.diffusers_peft(t, seed=5),
    "musubi": lambda m, t: qw.musubi(m, seed=6),
    "musubi-with-mod": lambda m, t: qw.musubi(m, seed=7, exclude_mod=False),
    "diffsynth": lambda m, t: qw.diffsynth(t, seed=8),
    "lightning": lambda m, t: qw.lightning(m, seed=9),
    "full-diffs": lambda m, t: dw.full_diffs(m, seed=10),
}


@pytest.mark.parametrize("writer", list(WRITERS_CORE_READS))
def test_writer_equals_core(qwen, twin, tmp_path, caplog, writer):
    model, _ = qwen
    state = WRITERS_CORE_READS[writer](model, twin)
    if writer == "musubi":
        assert not any("_mod_" in k for k in state) and any("txt_mlp_net_0_proj" in k for k in state)
    reports = compare(qwen, tmp_path, caplog, state)
    assert "Qwen-Image" in reports[0]


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr", "full"])
def test_lycoris_names_equal_core(qwen, tmp_path, caplog, algo):
    """LyCORIS's own wrapper (SimpleTuner's `lycoris_` names) on the transformer's Linears, every algorithm."""
    model, _ = qwen
    blocks = torch.nn.ModuleDict({"transformer_blocks": model.model.diffusion_model.transformer_blocks})
    state = lw.lycoris_state_dict(blocks, algo, prefix="lycoris", rank=4, alpha=2.0, seed=11,
                                  target_module=("Linear",))
    assert any(k.startswith("lycoris_transformer_blocks_0_attn_to_q.") for k in state)
    compare(qwen, tmp_path, caplog, state)


def test_norm_weights_as_full_diffs(qwen, tmp_path, caplog):
    """RMSNorm weights (txt_norm, attn.norm_q ...) take `diff` patches under ComfyUI's generic names."""
    model, _ = qwen
    gen = torch.Generator().manual_seed(12)
    state = {}
    for key, value in model.model.state_dict().items():
        if key.endswith(("txt_norm.weight", "norm_q.weight", "norm_added_k.weight")):
            state[key[:-len(".weight")] + ".diff"] = 0.01 * torch.randn(value.shape, generator=gen)
    assert len(state) == 1 + 2 * tq.DEPTH
    compare(qwen, tmp_path, caplog, state)


# ------------------------------------------------------------------------------------- writers core misreads

def test_base_model_model_names_where_core_fails(qwen, twin, tmp_path, caplog):
    """Raw PEFT state dicts (`base_model.model.`): core maps none of them; the truth is core on the same tensors
    under diffusers' `transformer.` names."""
    model, _ = qwen
    state = qw.base_model_model(twin, seed=13)
    assert core_drops(model, None, state), "core is expected to drop these names"
    compare(qwen, tmp_path, caplog, state, core_state=qw.renamed(state, "base_model.model.", "transformer."))


# ------------------------------------------------------------------------------------- text encoder

def test_text_encoder_applies_where_the_clip_holds_it(qwen, tmp_path, caplog):
    """Qwen2.5-VL-7B modules (language model and vision tower) under ComfyUI's generic names: equal to core with
    the Qwen CLIP; not applied (no CLIP connected) on a model-only load; unmatched with the reason on a CLIP that
    holds other encoders, while the transformer part still applies."""
    model, clip = qwen
    te = qw.text_encoder(clip, seed=15)
    assert any(".visual.blocks.0.attn.qkv." in k for k in te) and any(".model.layers.1.mlp." in k for k in te)
    te_modules = len({k.rsplit(".", 2)[0] for k in te if k.endswith(".weight")})
    state = {**qw.musubi(model, seed=14), **te}
    reports = compare(qwen, tmp_path, caplog, state, with_clip=True)
    assert f"te1 {te_modules}" in reports[0]
    loader = node_module("loader")
    with loras_folder(tmp_path):
        _, report = loader.LoRACoreLoaderModelOnly().load(model, "lora.safetensors", 1.0)
        assert f"not applied: te1 {te_modules} (no CLIP connected)" in report and "unmatched" not in report
        flux_clip = tm.comfy_clip_flux()
        patched, clip_out, report = loader.LoRACoreLoader().load(model, "lora.safetensors", 1.0, 1.0, clip=flux_clip)
    # A CLIP of another family: the encoder's modules are not applied, with the reason (issue 13 item 3).
    assert f"not applied: te1 {te_modules} (the CLIP has no Qwen2.5-VL-7B)" in report and "unmatched" not in report
    assert "applied modules: transformer" in report and patched.patches and not clip_out.patcher.patches


# ------------------------------------------------------------------------------------- fit and mismatch

def test_lora_for_another_family_or_size_is_refused_naming_both(qwen, twin, tmp_path):
    model, _ = qwen
    flux = tm.comfy_flux()
    sd15 = tm.comfy_sd15()
    z_image = tq.comfy_z_image()
    files = {
        "qwen_native": qw.comfy_native(model, seed=20),
        "qwen_musubi": qw.musubi(model, seed=21),
        "qwen_peft": qw.diffusers_peft(twin, seed=22),
        "flux_kohya": dw.kohya_flux(flux, seed=23),
        "flux_peft": dw.peft_flux(dw.diffusers_flux_twin(), seed=24)[0],
        "sd15": lw.kohya_state_dict(lw.unet_targets(sd15.model.diffusion_model), "lora_unet", seed=25),
        "z_image": dw.comfy_native(z_image, seed=26),
        "qwen_wide": qw.comfy_native(tq.comfy_qwen_image(hidden=96, heads=3), seed=27),
        "qwen_deep": qw.musubi(tq.comfy_qwen_image(depth=3), seed=28),
    }
    for name, state in files.items():
        lw.save_safetensors(state, tmp_path / f"{name}.safetensors")
    loader = node_module("loader").LoRACoreLoaderModelOnly()

    def refused(host, name, *words):
        with pytest.raises(LoraMatchError) as caught:
            loader.load(host, f"{name}.safetensors", 1.0)
        text = str(caught.value)
        assert f"{name}.safetensors" in text and all(w in text for w in words), text
        return text

    with loras_folder(tmp_path):
        # musubi's and diffusers' names share `transformer_blocks.N.attn.to_q` ... with Flux's diffusers names, and
        # the tiny Flux has Qwen's widths: they fit in part, and are still refused as another family's
        for name in ("qwen_native", "qwen_musubi", "qwen_peft"):
            refused(flux, name, "made for Qwen-Image", "the model is Flux.1 [dev]")
        for name in ("flux_kohya", "flux_peft"):
            refused(model, name, "made for Flux.1 [dev]", "the model is Qwen-Image")
        refused(model, "sd15", "made for Stable Diffusion 1.x", "Qwen-Image")
        refused(sd15, "qwen_native", "made for Qwen-Image", "Stable Diffusion 1.x")
        refused(model, "z_image", "made for Z-Image", "Qwen-Image")
        refused(z_image, "qwen_native", "made for Qwen-Image", "Z-Image")   # the Lumina family's model
        refused(model, "qwen_wide", "does not fit")
        # a LoRA for a deeper Qwen-Image: the blocks this model has apply, the rest are named
        _, report = loader.load(model, "qwen_deep.safetensors", 1.0)
    assert "WARNING" in report and "key for transformer block 2, but this Qwen-Image model has 2 blocks" in report


def test_detection_from_files_and_metadata():
    """A file is claimed by the family whose names it uses (not by a few shared ones), and musubi's / ai-toolkit's
    metadata strings name the variant (musubi-tuner architectures.py / sai_model_spec.py; ai-toolkit writes
    `qwen_image` for Edit too)."""
    from lora_core.types import LoraFile

    model = tq.comfy_qwen_image()
    state = qw.musubi(model, seed=29)
    assert registry.detect_lora(LoraFile(None, state)).name == "Qwen-Image"
    z_state = dw.comfy_native(tq.comfy_z_image(), seed=30)   # shares `final_layer.linear` with Flux, nothing more
    assert registry.detect_lora(LoraFile(None, z_state)).name == "Z-Image"
    cases = {("Qwen-Image/lora", "qwen_image"): "Qwen-Image",
             ("Qwen-Image-Edit/lora", "qwen_image_edit"): "Qwen-Image-Edit",
             ("Qwen-Image-Edit-Plus/lora", "qwen_image_edit"): "Qwen-Image-Edit-2509",
             ("Qwen-Image-Edit-2511/lora", "qwen_image_edit"): "Qwen-Image-Edit-2511",
             ("Qwen-Image-Layered/lora", "qwen_image_layered"): "Qwen-Image-Layered",
             ("", "qwen_image"): "Qwen-Image"}
    for (architecture, version), want in cases.items():
        meta = {"ss_base_model_version": version, **({"modelspec.architecture": architecture} if architecture else {})}
        assert registry.arch_of_metadata(meta).name == want, (meta, want)
        assert registry.detect_lora(LoraFile(None, state, meta)).name == want


# ------------------------------------------------------------------------------------- block weights

def _block_weight(model, clip, tmp_path, state, vector, mode="named", strengths=(1.0, 0.0), seed=0):
    lw.save_safetensors(state, tmp_path / "qwen_lbw.safetensors")
    with loras_folder(tmp_path):
        return node_module("block_weight").LoRACoreBlockWeight().load(
            model, "qwen_lbw.safetensors", strengths[0], strengths[1], mode, "custom", vector, seed, 1.0, 1.0, False,
            clip=clip)


def _expected_factor(key: str) -> float:
    """The factor `NAMED` below gives a host key, written out by hand from the module names (the test's own
    reading of the layout: IN = img_in / txt_in / time_text_embed, B00 / B01 = transformer_blocks.0 / 1, OUT =
    norm_out / proj_out, txt = the text stream's attention, MLP and modulation)."""
    rest = key[len("diffusion_model."):]
    if rest.startswith(("img_in.", "txt_in.", "time_text_embed.")):
        return 0.0
    if rest.startswith("norm_out."):
        return 0.25
    if rest.startswith("proj_out."):
        return 1.0
    block = int(rest.split(".")[1])
    text_stream = any(part in rest for part in (".add_q_proj.", ".add_k_proj.", ".add_v_proj.", ".to_add_out.",
                                                ".txt_mlp.", ".txt_mod."))
    if block == 0:
        return 2.0 if ".img_mod." in rest else 0.5
    return 0.0 if text_stream else 1.0


NAMED = "IN=0, B00=0.5, B00.img_mod=2, B01.txt=0, OUT.final_mod=0.25"


def test_named_syntax_blocks_and_element_kinds(qwen, tmp_path):
    model, _ = qwen
    state = qw.comfy_native(model, seed=31)
    weighted, _, table = _block_weight(model, None, tmp_path, state, NAMED)
    plain, _, _ = _block_weight(model, None, tmp_path, state, "")
    base = model.model.state_dict()
    got, whole = bake(weighted), bake(plain)
    assert set(whole) == {k for k in base if k.startswith("diffusion_model.") and k.endswith(".weight")
                          and base[k].ndim == 2}
    checked = set()
    for key, value in whole.items():
        factor = _expected_factor(key)
        if factor == 0:
            assert key not in got, f"{key} should be off"
            continue
        torch.testing.assert_close(got[key] - base[key], factor * (value - base[key]), rtol=1e-5, atol=1e-7)
        checked.add(factor)
    assert checked == {0.25, 0.5, 1.0, 2.0}
    assert "B01" in table and "OUT" in table


def test_a1111_and_inspire_modes_on_qwen_image(qwen, tmp_path):
    """hako-mikan's A1111 extension has no Qwen-Image layout (refused, pointing to named syntax); Inspire Pack has no
    block groups for it, so every module takes its BASE value (the first), text encoder included: equal to
    Inspire's own rule run on core's loader (tests.test_flux_blocks.inspire_reference, which sends keys to where
    they live; Inspire itself would send `time_text_embed` to the CLIP by its substring 'text' and drop it)."""
    from lora_core.errors import LoraValueError
    from tests.test_flux_blocks import inspire_reference

    model, clip = qwen
    state = {**qw.comfy_native(model, seed=32), **qw.text_encoder(clip, seed=33)}
    with pytest.raises(LoraValueError, match="no positional layout for qwen_image: use named syntax"):
        _block_weight(model, clip, tmp_path, state, ",".join(["1"] * 61), mode="a1111", strengths=(0.8, 0.6))
    vector = "0.3," + ",".join(["0", "2"] * 6)
    ours, ours_clip, table = _block_weight(model, clip, tmp_path, state, vector, mode="inspire", strengths=(0.8, 0.6))
    ref, ref_clip = inspire_reference(model, clip, state, 0.8, 0.6, vector)
    base = {k: v.clone() for k, v in model.model.state_dict().items()}
    base_clip = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    assert_same(bake(ours), bake(ref), base, "inspire/MODEL")
    assert_same(bake(ours_clip.patcher), bake(ref_clip.patcher), base_clip, "inspire/CLIP")
    assert "no block layout for qwen_image" in table


def _block_of(key: str) -> str:
    """The block of a file key, by hand from its module name (IN / B<NN> / OUT)."""
    if any(w in key for w in ("img_in", "txt_in", "time_text_embed")):
        return "IN"
    if any(w in key for w in ("norm_out", "proj_out")):
        return "OUT"
    return f"B{int(key.split('transformer_blocks.')[1].split('.')[0]):02d}"


def test_block_info_and_sweep(qwen, tmp_path):
    model, _ = qwen
    state = qw.comfy_native(model, seed=34)
    lw.save_safetensors(state, tmp_path / "qwen_tool.safetensors")
    tools = node_module("block_tools")
    with loras_folder(tmp_path):
        text, chart = tools.LoRACoreBlockInfo().inspect("qwen_tool.safetensors", "auto", model=model)
        info = tools.block_info("qwen_tool.safetensors", "auto", model=model)
        layout_text, _ = tools.LoRACoreBlockInfo().inspect("qwen_tool.safetensors", "auto")   # full-size layout
        models, labels = tools.LoRACoreBlockSweep().sweep(model, "qwen_tool.safetensors", 1.0, "blocks", 1.0, 0.0,
                                                          "named", "", 0, 1.0, 1.0)
        vector_models, vector_labels = tools.LoRACoreBlockSweep().sweep(
            model, "qwen_tool.safetensors", 1.0, "vectors", 1.0, 0.0, "named", "B*=0\nB*.txt=0", 0, 1.0, 1.0)
    assert "Qwen-Image" in text and chart.ndim == 4 and chart.shape[-1] == 3
    assert list(info["blocks"]) == ["IN", "B00", "B01", "OUT"] and all(e["norm"] > 0 for e in info["blocks"].values())
    for block, entry in info["blocks"].items():   # the norms are the file's own deltas (alpha 2 / rank 4), by block
        keys = [k for k in state if k.endswith(".lora_up.weight") and _block_of(k) == block]
        expected = sum(float((0.5 * state[k] @ state[k.replace("lora_up", "lora_down")]).square().sum())
                       for k in keys) ** 0.5
        assert abs(entry["norm"] - expected) <= 1e-3 * expected, (block, entry["norm"], expected)
        assert entry["modules"] == len(keys)
    assert "layout only" in layout_text and "B01" in layout_text
    assert [label.split()[0] for label in labels[1:]] == ["IN", "B00", "B01", "OUT"]
    full = set(models[0].patches)
    assert set(models[3].patches) == {k for k in full if ".transformer_blocks.1." not in k} != full
    assert vector_labels[1:] == ["B*=0", "B*.txt=0"]
    assert not any(".transformer_blocks." in k for k in vector_models[1].patches)
    assert any(".attn.to_q." in k for k in vector_models[2].patches)
    assert not any(".attn.add_q_proj." in k or ".txt_mlp." in k for k in vector_models[2].patches)


# ------------------------------------------------------------------------------------- merge / export

def test_merged_block_weighted_stack_loads_to_the_stacks_weights(qwen, twin, tmp_path):
    """A block-weighted stack of a musubi file (with text-encoder modules) and a diffusers PEFT file merged into
    one file (exact): musubi's naming for the transformer, ComfyUI's generic names for Qwen2.5-VL, the family's
    metadata; loaded in core and in our loader it gives the weights the stack gave."""
    model, clip = qwen
    a = {**qw.musubi(model, seed=35), **qw.text_encoder(clip, seed=36)}
    b = qw.diffusers_peft(twin, seed=37)
    lw.save_safetensors(a, tmp_path / "a.safetensors")
    lw.save_safetensors(b, tmp_path / "b.safetensors")
    bw, mix = node_module("block_weight"), node_module("mix")
    rows = block_stack_rows(enabled_1=True, lora_1="a.safetensors", strength_model_1=0.9, strength_clip_1=0.7,
                       vector_1="B00=0.5, B01.txt=0", enabled_2=True, lora_2="b.safetensors",
                       strength_model_2=-0.7, vector_2="B*.img_mlp=0.25, OUT=0, IN=2")
    with loras_folder(tmp_path):
        stack = bw.LoRACoreBlockStack().build(0, 1.0, 1.0, False, **rows)[0]
        stacked, stacked_clip, _ = bw.LoRACoreApplyBlockStack().apply(model, stack, clip=clip)
        path, _ = mix.LoRACoreMergeSave().merge("exact", 0, 0.0, "qwen_merge", False, "auto", "fp32",
                                                block_stack=stack, model=model, clip=clip)["result"]
        merged = comfy.utils.load_torch_file(path, safe_load=True)
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            meta = handle.metadata()
        ours, ours_clip, _ = node_module("loader").LoRACoreLoader().load(model, "qwen_merge.safetensors", 1.0, 1.0,
                                                                         clip=clip)
    assert meta["ss_base_model_version"] == "qwen_image" and meta["modelspec.architecture"] == "Qwen-Image/lora"
    assert meta["ss_network_module"] == "networks.lora_qwen_image"
    modules = {k.rsplit(".", 2)[0] if ".lora_" in k else k.rsplit(".", 1)[0] for k in merged}
    assert all(m.startswith(("lora_unet_transformer_blocks_", "lora_unet_img_in", "lora_unet_txt_in",
                             "lora_unet_time_text_embed_", "text_encoders.qwen25_7b.transformer.")) for m in modules)
    assert any(m.startswith("text_encoders.qwen25_7b.transformer.visual.") for m in modules)
    assert_merged_file_equals_stack(model, clip, merged, ours, ours_clip, stacked, stacked_clip)


def test_merge_without_a_model_keeps_the_variant(tmp_path):
    """A file without a model: the full-size layout of the variant its metadata names; the merged file carries
    that variant's strings (here musubi's Edit-2509 file: `Qwen-Image-Edit-Plus`)."""
    model = tq.comfy_qwen_image()
    state = qw.musubi(model, seed=38)
    meta = {"ss_base_model_version": "qwen_image_edit", "modelspec.architecture": "Qwen-Image-Edit-Plus/lora",
            "ss_network_module": "networks.lora_qwen_image"}
    lw.save_safetensors(state, tmp_path / "edit.safetensors", metadata=meta)
    mix = node_module("mix")
    with loras_folder(tmp_path):
        path, _ = mix.LoRACoreMergeSave().merge("exact", 0, 0.0, "edit_merge", False, "auto", "fp32",
                                                lora_stack=[("edit.safetensors", 0.5, 0.0)])["result"]
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        out = handle.metadata()
        keys = set(handle.keys())
    assert out["modelspec.architecture"] == "Qwen-Image-Edit-Plus/lora"
    assert out["ss_base_model_version"] == "qwen_image_edit"
    assert {k.rsplit(".", 2)[0] for k in keys if k.endswith(".lora_down.weight")} == \
        {k.rsplit(".", 2)[0] for k in state if k.endswith(".lora_down.weight")}


# ------------------------------------------------------------------------------------- standalone (diffusers)

def _diffusers_reference(path, transformer, scale):
    return diffusers_fuse_reference(QwenImageLoraLoaderMixin, path, transformer, scale)


STANDALONE_WRITERS = {
    "diffusers-peft": lambda m, t: qw.diffusers_peft(t, seed=40),
    "diffusion-pipe": lambda m, t: qw.diffusion_pipe(t, seed=41),
    "ai-toolkit": lambda m, t: qw.ai_toolkit(m, seed=42),
    "comfy-native": lambda m, t: qw.comfy_native(m, seed=43),
    "musubi": lambda m, t: qw.musubi(m, seed=44, exclude_mod=False),
    "diffsynth": lambda m, t: qw.diffsynth(t, seed=45),
    "lightning": lambda m, t: qw.lightning(m, seed=46),
}


@pytest.mark.parametrize("writer", list(STANDALONE_WRITERS))
def test_lora_patcher_on_diffusers_equals_diffusers_fuse_lora(qwen, twin, tmp_path, writer):
    """`LoraPatcher(transformer=...)` on diffusers' QwenImageTransformer2DModel equals
    `QwenImageLoraLoaderMixin.load_lora_weights` + `fuse_lora` (which converts `diffusion_model.`, musubi's
    `lora_unet_`, `.default.` and alpha itself: `_convert_non_diffusers_qwen_lora_to_diffusers`) at 1.0 and -0.6;
    re-applying and `restore()` stay exact."""
    from lora_core.api import LoraPatcher, LoraRequest
    from lora_core.io import read_lora_file

    model, _ = qwen
    path = lw.save_safetensors(STANDALONE_WRITERS[writer](model, twin), tmp_path / f"{writer}.safetensors")
    ours = copy.deepcopy(twin)
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    patcher = LoraPatcher(transformer=ours)
    assert patcher.key_map.arch.name == "Qwen-Image"
    for scale in (1.0, -0.6):
        reference = _diffusers_reference(path, twin, scale)
        plan = patcher.apply([LoraRequest(read_lora_file(path), scale, 0.0)])
        report = plan.reports[0]
        assert not report.unmatched and not report.unused_keys, plan.text()
        state = ours.state_dict()
        assert state.keys() == reference.keys()
        changed = 0
        for key in reference:
            delta = (reference[key] - base[key]).abs().max().item()
            error = (state[key] - reference[key]).abs().max().item()
            assert error <= 1e-5 * delta + 2 * torch.finfo(torch.float32).eps * reference[key].abs().max().item(), \
                (key, error, delta)
            changed += delta > 0
        assert changed >= 10 and changed == sum(1 for k in plan.patches)
    patcher.restore()
    assert all(torch.equal(v, base[k]) for k, v in ours.state_dict().items())
