"""lora_core.arch against independent references: ComfyUI's own key maps and diffusers<->LDM table,
real diffusers / transformers module names, and the block rules documented in
/work/shared/reference/block-weight.md (re-stated here as formulas, not computed by the code under test).
"""
from __future__ import annotations

import re
import time

import pytest
import torch

from tests.comfy_host import import_comfy
from tests import tiny_models as tm

comfy = import_comfy()
import comfy.lora  # noqa: E402
import comfy.utils  # noqa: E402

from lora_core.arch import (  # noqa: E402
    SD1, SD2, SDXL, ARCHS, OTHER, UNetSpec, bind_comfy_clip, bind_comfy_model, bind_diffusers_unet,
    bind_layout, bind_transformers_clip, block_id, block_of_ldm_path, build_key_map, detect_arch,
    diffusers_to_ldm, element_kind, get_arch, layout_key_map, unet_modules,
)
from lora_core.errors import LoraMatchError, LoraValueError  # noqa: E402

# A1111 LBW block ids, copied from block-weight.md §2.1 / §2.2 (BLOCKID26 / BLOCKID20 / 17 / 12).
BLOCKID26 = ("BASE IN00 IN01 IN02 IN03 IN04 IN05 IN06 IN07 IN08 IN09 IN10 IN11 M00 OUT00 OUT01 OUT02 OUT03 "
             "OUT04 OUT05 OUT06 OUT07 OUT08 OUT09 OUT10 OUT11").split()
BLOCKID20 = "BASE IN00 IN01 IN02 IN03 IN04 IN05 IN06 IN07 IN08 M00 OUT00 OUT01 OUT02 OUT03 OUT04 OUT05 OUT06 OUT07 OUT08".split()
BLOCKID17 = "BASE IN01 IN02 IN04 IN05 IN07 IN08 M00 OUT03 OUT04 OUT05 OUT06 OUT07 OUT08 OUT09 OUT10 OUT11".split()
BLOCKID12 = "BASE IN04 IN05 IN07 IN08 M00 OUT00 OUT01 OUT02 OUT03 OUT04 OUT05".split()


# --------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def models():
    return {"sd15": tm.comfy_sd15(), "sd2": tm.comfy_sd2(), "sdxl": tm.comfy_sdxl()}


@pytest.fixture(scope="module")
def clips():
    return {"sd15": tm.comfy_clip_sd15(), "sd2": tm.comfy_clip_sd2(), "sdxl": tm.comfy_clip_sdxl()}


def _unet_sd(patcher):
    return patcher.model.state_dict()


def _model_binding(patcher, with_config=True):
    cfg = patcher.model.model_config.unet_config if with_config else None
    return bind_comfy_model(_unet_sd(patcher), cfg)


# --------------------------------------------------------------------------------------------- layouts as data

def test_layouts_match_a1111_block_ids():
    assert SD1.blocks[1:-1] == tuple(BLOCKID26[1:]) and SD2.blocks[1:-1] == tuple(BLOCKID26[1:])
    assert SDXL.blocks[2:-1] == tuple(BLOCKID20[1:])
    assert SD1.blocks[0] == "TE1" and SDXL.blocks[:2] == ("TE1", "TE2") and SDXL.blocks[-1] == OTHER
    assert SDXL.block_groups["BASE"] == ("TE1", "TE2") and SD1.block_groups["BASE"] == ("TE1",)
    assert (SD1.text_encoders["te1"].family, SD2.text_encoders["te1"].family) == ("CLIP-L", "OpenCLIP-H")
    assert (SD2.text_encoders["te1"].num_layers, SD2.text_encoders["te1"].lora_layers) == (24, 23)
    assert [SDXL.text_encoders[c].family for c in ("te1", "te2")] == ["CLIP-L", "OpenCLIP-G"]
    assert SDXL.text_encoders["te2"].num_layers == 32 and SDXL.unet.context_dim == 2048
    assert get_arch("Pony") is SDXL and get_arch("illustrious") is SDXL and get_arch("SD1.5") is SD1
    with pytest.raises(LoraValueError, match="unknown architecture 'auraflow'"):
        get_arch("auraflow")   # a family the registry does not describe (yet)


def test_full_size_specs_equal_comfyui_detection_configs():
    """Our SD15/SD21/SDXL UNet facts equal the configs ComfyUI's detector lists for diffusers UNets."""
    import comfy.model_detection as md
    import inspect

    src = inspect.getsource(md.unet_config_from_diffusers_unet)
    for name, arch in (("SD15", SD1), ("SD21", SD2), ("SDXL", SDXL)):
        literal = re.search(rf"\n    {name} = (\{{.*?\}})\n", src, re.S).group(1)
        cfg = eval(literal, {"dtype": None, "torch": torch})  # the dict literal from ComfyUI's source
        assert UNetSpec.from_comfy_config(cfg) == arch.unet, name


# --------------------------------------------------------------------------------------------- LDM <-> diffusers

SPECS = {"SD1": SD1.unet, "SD2": SD2.unet, "SDXL": SDXL.unet}


@pytest.mark.parametrize("name", ["SD1", "SD2", "SDXL", "tiny_sd15", "tiny_sdxl_uneven"])
def test_ldm_diffusers_agree_with_comfy_unet_to_diffusers(name):
    cfg = (SPECS[name].to_comfy_config() if name in SPECS else
           tm.unet_config_sd15() if name == "tiny_sd15" else
           tm.unet_config_sdxl(transformer_depth=(0, 0, 1, 1, 3, 3), transformer_depth_middle=2,
                               transformer_depth_output=(0, 0, 0, 1, 2, 1, 3, 1, 3)))
    theirs = comfy.utils.unet_to_diffusers(cfg)  # diffusers param -> ldm param
    their_modules = {}
    for dif, ldm in theirs.items():
        their_modules.setdefault(ldm.rsplit(".", 1)[0], set()).add(dif.rsplit(".", 1)[0])
    ours = diffusers_to_ldm(UNetSpec.from_comfy_config(cfg))
    assert len(ours) > 50
    for dif, ldm in ours.items():
        assert dif in their_modules.get(ldm, set()), (dif, ldm)
    # everything ComfyUI pairs for a module we list, we pair the same way
    our_ldm = set(ours.values())
    for ldm, difs in their_modules.items():
        if ldm in our_ldm:
            assert difs <= {d for d, l in ours.items() if l == ldm}, ldm


@pytest.mark.parametrize("kind", ["sd15", "sd2", "sdxl"])
def test_ldm_module_list_equals_real_comfy_model(models, kind):
    sd = _unet_sd(models[kind])
    real = {k[len("diffusion_model."):-len(".weight")] for k in sd if k.endswith(".weight")}
    spec = UNetSpec.from_comfy_config(models[kind].model.model_config.unet_config)
    assert {m.ldm for m in unet_modules(spec)} == real
    binding = _model_binding(models[kind], with_config=False)  # structure read from keys + shapes only
    assert binding.unbound == [] and {p for _, p in binding.targets} == real
    assert binding.unet.channel_mult == spec.channel_mult and binding.unet.num_res_blocks == spec.num_res_blocks


def _diffusers_unet(kind):
    return tm.diffusers_twin(kind)


@pytest.mark.parametrize("kind", ["sd15", "sd2", "sdxl"])
def test_mapping_pairs_real_comfy_and_diffusers_weights(models, kind):
    """Same config built by ComfyUI and by diffusers: every LDM weight maps to a diffusers weight of the
    same shape, one to one (shape equality is the independent check that the pairing is right)."""
    comfy_sd = _unet_sd(models[kind])
    dif_sd = _diffusers_unet(kind).state_dict()
    dif_weights = {k for k in dif_sd if k.endswith(".weight")}
    spec = UNetSpec.from_comfy_config(models[kind].model.model_config.unet_config)
    paired = set()
    for m in unet_modules(spec):
        dif_key = next(d for d in m.diffusers if d + ".weight" in dif_sd) + ".weight"
        assert comfy_sd[f"diffusion_model.{m.ldm}.weight"].shape == dif_sd[dif_key].shape, (m.ldm, dif_key)
        paired.add(dif_key)
    assert paired == dif_weights
    binding = bind_diffusers_unet(dif_sd)
    assert binding.unbound == [] and binding.unet == spec  # structure, channels, context read back from diffusers
    assert detect_arch(dif_sd) is {"sd15": SD1, "sd2": SD2, "sdxl": SDXL}[kind]


def test_peft_adapter_names_on_diffusers_unet_resolve():
    """Module names PEFT itself injects into a diffusers UNet resolve, as `unet.<name>`, to that module."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    unet = _diffusers_unet("sd15")
    km = build_key_map(bind_diffusers_unet(unet.state_dict()))
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "conv2", "time_emb_proj"]
    inject_adapter_in_model(LoraConfig(r=2, target_modules=targets), unet)
    names = [n for n, mod in unet.named_modules() if isinstance(mod, LoraLayer)]
    assert len(names) > 40
    for n in names:
        t = km.resolve(f"unet.{n}")
        assert t is not None and t.host_key == n + ".weight", n


# --------------------------------------------------------------------------------------------- superset of ComfyUI

@pytest.mark.parametrize("kind", ["sd15", "sd2", "sdxl"])
@pytest.mark.parametrize("with_config", [True, False])
def test_unet_keymap_superset_of_comfy(models, kind, with_config):
    patcher = models[kind]
    sd = _unet_sd(patcher)
    theirs = comfy.lora.model_lora_keys_unet(patcher.model, {})
    km = build_key_map(_model_binding(patcher, with_config))
    assert km.conflicts == []
    usable = {k: v for k, v in theirs.items() if isinstance(v, str) and v in sd}
    # the rest point at modules this model does not have (ComfyUI lists a last-level downsampler etc.)
    assert all(v not in sd for v in theirs.values() if isinstance(v, str) and v not in usable.values())
    assert len(usable) > 300
    for alias, host_key in usable.items():
        t = km.resolve(alias)
        assert t is not None and t.host_key == host_key, (alias, host_key, t)
    assert len(km) > len(usable)


@pytest.mark.parametrize("kind", ["sd15", "sd2", "sdxl"])
def test_clip_keymap_superset_of_comfy(clips, kind):
    csm = clips[kind].cond_stage_model
    sd = csm.state_dict()
    theirs = comfy.lora.model_lora_keys_clip(csm, {})
    binding = bind_comfy_clip(sd)
    km = build_key_map(binding)
    assert km.conflicts == [] and binding.unbound == []
    assert len(theirs) > 30
    for alias, host_key in theirs.items():
        assert host_key in sd
        t = km.resolve(alias)
        assert t is not None and t.host_key == host_key, (alias, host_key, t)


def test_clip_components_and_writer_forms(clips):
    sdxl = build_key_map(bind_comfy_clip(clips["sdxl"].cond_stage_model.state_dict()))
    t1 = sdxl.resolve("lora_te1_text_model_encoder_layers_0_self_attn_q_proj")
    t2 = sdxl.resolve("lora_te2_text_model_encoder_layers_0_self_attn_q_proj")
    assert (t1.component, t1.block, t1.host_key.split(".")[0]) == ("te1", "TE1", "clip_l")
    assert (t2.component, t2.block, t2.host_key.split(".")[0]) == ("te2", "TE2", "clip_g")
    # transformers-5 kohya form, diffusers form without text_model, ComfyUI generic form
    assert sdxl.resolve("lora_te2_encoder_layers_0_self_attn_q_proj") == t2
    assert sdxl.resolve("text_encoder_2.encoder.layers.0.self_attn.q_proj") == t2
    assert sdxl.resolve("text_encoders.clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj") == t2
    assert t2.kind == "te_attn" and sdxl.resolve("lora_te1_text_model_encoder_layers_1_mlp_fc2").kind == "te_mlp"
    sd2 = build_key_map(bind_comfy_clip(clips["sd2"].cond_stage_model.state_dict()))
    t = sd2.resolve("lora_te_text_model_encoder_layers_2_mlp_fc1")
    assert t.component == "te1" and t.host_key.startswith("clip_h.transformer.") and sd2.resolve("lora_te2_text_model_encoder_layers_0_mlp_fc1") is None


def test_transformers_clip_binding_matches_comfy_clip(clips):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                         projection_dim=32, vocab_size=49408, max_position_embeddings=77)
    hf = CLIPTextModel(cfg).state_dict()
    hf_proj = CLIPTextModelWithProjection(cfg).state_dict()
    comfy_sd = clips["sd15"].cond_stage_model.state_dict()
    b = bind_transformers_clip(hf, "te1")
    bp = bind_transformers_clip(hf_proj, "te2")
    bc = bind_comfy_clip(comfy_sd)
    assert b.unbound == [] and bp.unbound == []
    # same canonical paths, same shapes, as ComfyUI's CLIP of the same config (ComfyUI adds text_projection)
    assert set(b.targets) | {("te1", "text_projection")} == set(bc.targets)
    for (c, path), key in b.targets.items():
        assert hf[key].shape == comfy_sd[bc.targets[(c, path)]].shape
    assert bp.targets[("te2", "text_projection")] == "text_projection.weight"
    km = build_key_map(b)
    assert km.resolve("lora_te_text_model_encoder_layers_1_self_attn_out_proj").host_key == \
        "text_model.encoder.layers.1.self_attn.out_proj.weight"
    # transformers 5 drops `text_model.` from module names: the host keys bind to the same canonical paths
    tf5 = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in hf.items()}
    assert set(bind_transformers_clip(tf5, "te1").targets) == set(b.targets)


# --------------------------------------------------------------------------------------------- blocks

def _expected_block_diffusers(name: str, nrb: int = 2) -> str:
    """Block of a kohya diffusers-style UNet name by the formulas documented in block-weight.md §2.1."""
    rest = name[len("lora_unet_"):]
    if m := re.match(r"down_blocks_(\d+)_(resnets|attentions)_(\d+)_", rest):
        return f"IN{(nrb + 1) * int(m.group(1)) + int(m.group(3)) + 1:02d}"
    if m := re.match(r"down_blocks_(\d+)_downsamplers_0_", rest):
        return f"IN{(nrb + 1) * int(m.group(1)) + nrb + 1:02d}"
    if rest.startswith("mid_block_"):
        return "M00"
    if m := re.match(r"up_blocks_(\d+)_(resnets|attentions)_(\d+)_", rest):
        return f"OUT{(nrb + 1) * int(m.group(1)) + int(m.group(3)):02d}"
    if m := re.match(r"up_blocks_(\d+)_upsamplers_0_", rest):
        return f"OUT{(nrb + 1) * int(m.group(1)) + nrb:02d}"
    raise AssertionError(name)


def _expected_block_ldm(name: str) -> str:
    m = re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_(\d+)_", name)
    return {"input_blocks": "IN", "middle_block": "M", "output_blocks": "OUT"}[m.group(1)] + (
        "00" if m.group(1) == "middle_block" else f"{int(m.group(2)):02d}")


STANDARD_KINDS = {"attention": {"attn1", "attn2", "ff", "proj"}, "locon": {"resnet_conv", "emb", "downsample", "upsample"}}


@pytest.mark.parametrize("arch,attention_blocks", [(SD1, BLOCKID17[1:]), (SDXL, BLOCKID12[1:])])
def test_full_size_kohya_targets_map_to_documented_blocks(arch, attention_blocks):
    km = layout_key_map(arch)
    assert km.conflicts == []
    seen = {"attention": set(), "locon": set()}
    for m in unet_modules(arch.unet):
        group = next((g for g, kinds in STANDARD_KINDS.items() if m.kind in kinds), None)
        if group is None:
            continue
        ldm_name = "lora_unet_" + m.ldm.replace(".", "_")
        dif_name = "lora_unet_" + m.diffusers[0].replace(".", "_")
        for name, expected in ((ldm_name, _expected_block_ldm(ldm_name)), (dif_name, _expected_block_diffusers(dif_name))):
            t = km.resolve(name)
            assert t is not None and t.block == expected and block_id(t) == expected, (name, t)
            assert t.host_key == f"diffusion_model.{m.ldm}.weight"
        seen[group].add(expected)
    assert sorted(seen["attention"]) == sorted(attention_blocks)  # the 17 / 12 LierLa layouts
    unet_blocks = [b for b in arch.blocks if b.startswith(("IN", "M", "OUT")) and b != "IN00"]
    assert sorted(seen["attention"] | seen["locon"]) == sorted(unet_blocks)  # LoCon reaches every block but conv_in
    for component, spec in arch.text_encoders.items():
        prefix = "lora_te_" if len(arch.text_encoders) == 1 else f"lora_te{component[-1]}_"
        for layer in range(spec.lora_layers):
            t = km.resolve(f"{prefix}text_model_encoder_layers_{layer}_self_attn_k_proj")
            assert t.block == component.upper() and t.host_key.startswith(spec.comfy_name + ".transformer.")


def test_input_blocks_1_vs_10_never_confused():
    km = layout_key_map(SD1)
    pairs = [("lora_unet_input_blocks_1_0_in_layers_2", "IN01"), ("lora_unet_input_blocks_10_0_in_layers_2", "IN10"),
             ("lora_unet_input_blocks_11_0_out_layers_3", "IN11"), ("lora_unet_output_blocks_1_0_emb_layers_1", "OUT01"),
             ("lora_unet_output_blocks_10_1_proj_in", "OUT10"), ("lora_unet_output_blocks_11_1_proj_out", "OUT11")]
    for name, block in pairs:
        assert km.resolve(name).block == block, name
    assert km.resolve("lora_unet_input_blocks_10_0_in_layers_2").path == "input_blocks.10.0.in_layers.2"
    assert block_of_ldm_path("input_blocks.1.1.proj_in") == "IN01" and block_of_ldm_path("input_blocks.10.0.op") == "IN10"
    assert block_of_ldm_path("time_embed.0") == OTHER and block_of_ldm_path("middle_block.1.norm") == "M00"


def test_other_slot_and_in00_and_element_kinds():
    km = layout_key_map(SDXL)
    cases = {
        "lora_unet_conv_in": ("IN00", "conv_in"), "lora_unet_time_embedding_linear_1": (OTHER, "time_embed"),
        "lora_unet_add_embedding_linear_2": (OTHER, "label_emb"), "lora_unet_label_emb_0_0": (OTHER, "label_emb"),
        "lora_unet_conv_out": (OTHER, "conv_out"), "lora_unet_conv_norm_out": (OTHER, "norm"),
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q": ("IN04", "attn1"),
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_out_0": ("IN04", "attn2"),
        "lora_unet_middle_block_1_transformer_blocks_9_ff_net_0_proj": ("M00", "ff"),
        "lora_unet_output_blocks_2_1_proj_in": ("OUT02", "proj"),
        "lora_unet_output_blocks_2_2_conv": ("OUT02", "upsample"),
        "lora_unet_input_blocks_3_0_op": ("IN03", "downsample"),
        "lora_unet_input_blocks_1_0_emb_layers_1": ("IN01", "emb"),
        "lora_unet_input_blocks_4_0_skip_connection": ("IN04", "resnet_conv"),
        "lora_unet_output_blocks_0_1_transformer_blocks_0_norm2": ("OUT00", "norm"),
        "lora_te2_text_model_encoder_layers_31_mlp_fc1": ("TE2", "te_mlp"),
        "lora_te1_text_model_final_layer_norm": ("TE1", "norm"),
    }
    for name, (block, kind) in cases.items():
        t = km.resolve(name)
        assert t is not None and (t.block, element_kind(t)) == (block, kind), (name, t)


def test_alias_forms_for_one_target():
    km = layout_key_map(SD1)
    want = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight"
    names = [
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_out_0",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
        "lycoris_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out",
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0",
    ]
    for n in names:
        assert km.resolve(n).host_key == want, n
    t = km.resolve(names[0])
    assert set(names) <= set(km.aliases_of(t))
    te = km.resolve("text_encoder.text_model.encoder.layers.3.self_attn.v_proj")
    assert te == km.resolve("lora_te1_text_model_encoder_layers_3_self_attn_v_proj") == km.resolve("lora_te_encoder_layers_3_self_attn_v_proj")


def test_bias_params_resolve_like_comfy(models):
    km = build_key_map(_model_binding(models["sd15"]))
    t = km.resolve("diffusion_model.input_blocks.1.1.proj_in.bias")
    assert t.param == "bias" and t.host_key == "diffusion_model.input_blocks.1.1.proj_in.bias" and t.block == "IN01"
    assert all(t.param == "weight" for t in km.targets)


def test_resolution_is_fast():
    t0 = time.perf_counter()
    km = layout_key_map(SDXL)
    build_s = time.perf_counter() - t0
    names = list(km.aliases)[:20000]
    t0 = time.perf_counter()
    for n in names:
        km.resolve(n)
    per_lookup = (time.perf_counter() - t0) / len(names)
    assert len(km) > 10000 and build_s < 2.0 and per_lookup < 5e-6


# --------------------------------------------------------------------------------------------- detection

def test_detection(models, clips):
    for kind, arch in (("sd15", SD1), ("sd2", SD2), ("sdxl", SDXL)):
        sd = _unet_sd(models[kind])
        assert detect_arch(sd) is arch, kind
        assert _model_binding(models[kind]).arch is arch
        assert detect_arch(clips[kind].cond_stage_model.state_dict()) is arch
        assert detect_arch({k.replace("diffusion_model.", "model.diffusion_model."): v for k, v in sd.items()}) is arch
    # names only: SDXL shows by its label_emb; SD1 and SD2 UNets have identical names
    assert detect_arch(list(_unet_sd(models["sdxl"]))) is SDXL
    assert detect_arch(list(_unet_sd(models["sd15"]))) is None
    assert detect_arch(["foo.weight", "bar.bias"]) is None
    with pytest.raises(LoraMatchError, match="input_blocks.0.0.weight"):
        bind_comfy_model(["foo.weight"])
    with pytest.raises(LoraMatchError, match="clip_l/clip_g/clip_h"):
        bind_comfy_clip(["foo.weight"])


# --------------------------------------------------------------------------------------------- explain_unmatched

def test_explain_unmatched(models, clips):
    sd1_full = build_key_map(_model_binding(models["sd15"]), bind_comfy_clip(clips["sd15"].cond_stage_model.state_dict()))
    sdxl_full = build_key_map(_model_binding(models["sdxl"]), bind_comfy_clip(clips["sdxl"].cond_stage_model.state_dict()))
    model_only = build_key_map(_model_binding(models["sd15"]))
    sdxl_layout = layout_key_map(SDXL)
    cases = [
        (sd1_full, "lora_te2_text_model_encoder_layers_0_mlp_fc1", "one text encoder: this LoRA was made for SDXL"),
        (sd1_full, "text_encoder_2.text_model.encoder.layers.0.mlp.fc1", "made for SDXL"),
        (sd1_full, "lora_te_text_model_encoder_layers_30_mlp_fc1", "layer 30, but te1 (CLIP-L) has 2 layers"),
        (model_only, "lora_te_text_model_encoder_layers_0_mlp_fc1", "no text encoder is in this key map"),
        (sdxl_layout, "lora_unet_down_blocks_3_resnets_0_conv1", "down_blocks.3, but this model has 3 levels"),
        (sdxl_layout, "lora_unet_input_blocks_11_0_in_layers_2", "input_blocks.11, but this model has input_blocks.0-8"),
        (sdxl_layout, "lora_unet_down_blocks_0_attentions_0_proj_in", "no attention in down_blocks.0"),
        (sdxl_layout, "lora_unet_input_blocks_1_1_proj_in", "input_blocks.1 has no attention"),
        (sdxl_full, "lora_unet_up_blocks_3_resnets_0_conv1", "up_blocks.3, but this model has 3 levels"),
        (sd1_full, "lora_unet_input_blocks_1_1_transformer_blocks_5_attn1_to_q", "transformer_blocks.5"),
        (sd1_full, "lora_unet_double_blocks_0_img_attn_qkv", "Flux"),
        (sd1_full, "transformer.transformer_blocks.0.attn.to_q", "DiT"),
        (sd1_full, "lora_te3_encoder_block_0_layer_0_SelfAttention_q", "T5"),
        (sd1_full, "some.random.module", "unknown prefix"),
    ]
    for km, name, expected in cases:
        assert km.resolve(name) is None, name
        reason = km.explain_unmatched(name)
        assert expected in reason, (name, reason)
    assert "resolves to" in sd1_full.explain_unmatched("lora_unet_input_blocks_1_1_proj_in")


def test_layout_binding_covers_every_block():
    for arch in ARCHS.values():
        b = bind_layout(arch)
        blocks = {b.blocks[k] for k in b.targets}
        assert blocks == set(arch.blocks), arch.name


def test_tiny_models_patch_through_comfy_loader(models, clips):
    """ComfyUI's own LoRA loader patches the tiny model and tiny CLIP at exactly the host keys our KeyMap
    resolves for the same kohya names (the tiny builders are usable by LoRA tests end to end)."""
    import comfy.sd

    model, clip = models["sd15"], clips["sd15"]
    km = build_key_map(_model_binding(model), bind_comfy_clip(clip.cond_stage_model.state_dict()))
    names = ["lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k",
             "lora_te_text_model_encoder_layers_1_self_attn_q_proj"]
    gen = torch.Generator().manual_seed(1)
    lora, expected = {}, {}
    for name in names:
        t = km.resolve(name)
        host = (model.model if t.component == "unet" else clip.cond_stage_model).state_dict()[t.host_key]
        down = torch.randn(2, host.shape[1], generator=gen)
        up = torch.randn(host.shape[0], 2, generator=gen)
        lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"] = down, up
        lora[f"{name}.alpha"] = torch.tensor(2.0)
        expected[(t.component, t.host_key)] = host.clone() + up @ down
    new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    # the way ComfyUI applies patches before sampling / encoding (comfy.sd.CLIP loads its patcher at init,
    # so a clone must go through load_models_gpu, which swaps the loaded patcher for the clone)
    comfy.model_management.load_models_gpu([new_model, new_clip.patcher], force_full_load=True)
    try:
        for (component, key), want in expected.items():
            owner = new_model.model if component == "unet" else new_clip.cond_stage_model
            torch.testing.assert_close(owner.state_dict()[key], want, rtol=1e-5, atol=1e-5)
    finally:
        comfy.model_management.unload_all_models()
    for (component, key), want in expected.items():  # unloading restores the shared weights
        owner = model.model if component == "unet" else clip.cond_stage_model
        assert not torch.allclose(owner.state_dict()[key], want)
