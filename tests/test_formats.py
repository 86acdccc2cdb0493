"""parse_modules / detect_writer on files written by real writers (LyCORIS, PEFT + diffusers) and by our
independent kohya / processor-form writers (tests/lora_writers.py)."""
from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

from lora_core.errors import LoraFormatError
from lora_core.formats import ParsedLora, detect_writer, parse_modules, split_key
from lora_core.io import read_lora_file
from lora_core.types import LoraFile
from tests import lora_writers as lw


@pytest.fixture(scope="module")
def unet():
    return lw.tiny_unet()


@pytest.fixture(scope="module")
def text_encoder():
    return lw.tiny_text_encoder()


def parse(sd, metadata=None) -> ParsedLora:
    return parse_modules(LoraFile(path="test.safetensors", tensors=sd, metadata=metadata or {}))


def assert_every_key_accounted(sd: dict, parsed: ParsedLora) -> None:
    """Each file key is consumed by exactly one module or listed in unused, never both, never twice."""
    consumed = [k for m in parsed.modules.values() for k in m.source_keys]
    unused = [k for k, _ in parsed.unused]
    assert len(consumed) == len(set(consumed))
    assert not set(consumed) & set(unused)
    assert sorted(consumed + unused) == sorted(sd)


def module_prefixes(sd: dict) -> set:
    return {k.split(".", 1)[0] for k in sd}


# ------------------------------------------------------------------------------------------- LyCORIS

# algo -> (our algo name, roles every module has, alpha stored by LyCORIS)
LYCORIS_CASES = {
    "lora": ("lora", {"up", "down"}, 2.0),
    "locon": ("lora", {"up", "down"}, 2.0),
    "loha": ("loha", {"w1a", "w1b", "w2a", "w2b"}, 2.0),
    "lokr": ("lokr", None, 2.0),
    "glora": ("glora", {"a1", "a2", "b1", "b2"}, 2.0),
    "ia3": ("ia3", {"weight"}, None),
    "diag-oft": ("oft", {"blocks"}, 0.0),   # OFT stores its constraint as alpha (0 = unconstrained)
    "boft": ("boft", {"blocks"}, 0.0),
    "full": ("full", {"diff"}, None),
}


@pytest.mark.parametrize("algo", sorted(LYCORIS_CASES))
def test_lycoris_algos(unet, algo):
    sd = lw.lycoris_state_dict(unet, algo, prefix="lora_unet", rank=4, alpha=2.0)
    parsed = parse(sd)
    expected_algo, roles, alpha = LYCORIS_CASES[algo]
    assert_every_key_accounted(sd, parsed)
    assert parsed.unused == []
    assert set(parsed.modules) == module_prefixes(sd)
    assert Counter(m.algo for m in parsed.modules.values()) == Counter({expected_algo: len(parsed.modules)})
    assert parsed.writer == ("kohya" if expected_algo == "lora" else "lycoris")
    for name, module in parsed.modules.items():
        assert module.name == name
        if roles is not None:
            assert roles <= set(module.tensors)
        stored = sd.get(f"{name}.alpha")
        assert module.alpha == (None if stored is None else float(stored))
        if algo != "lokr":  # LoKr with an undecomposed w2 forces alpha = rank (scale 1)
            assert module.alpha == alpha
        for role, tensor in module.tensors.items():
            assert any(tensor is sd[k] for k in module.source_keys), role
        assert module.dora_scale is None


def test_lycoris_roles_map_to_the_file_tensors(unet):
    sd = lw.lycoris_state_dict(unet, "loha", use_tucker=True)
    module = parse(sd).modules["lora_unet_conv_in"]
    for role, suffix in (("w1a", "hada_w1_a"), ("w1b", "hada_w1_b"), ("w2a", "hada_w2_a"), ("w2b", "hada_w2_b"),
                         ("t1", "hada_t1"), ("t2", "hada_t2")):
        assert module.tensors[role] is sd[f"lora_unet_conv_in.{suffix}"]


def test_lycoris_ia3_on_input_flag_and_full_bias():
    layers = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    ia3 = parse(lw.lycoris_state_dict(layers, "ia3", module_options={"train_on_input": True}))
    assert {m.flags["on_input"] for m in ia3.modules.values()} == {True}
    assert ia3.modules["lora_unet_0"].tensors["weight"].shape == (8,)
    ia3_out = parse(lw.lycoris_state_dict(layers, "ia3"))
    assert {m.flags["on_input"] for m in ia3_out.modules.values()} == {False}
    full_sd = lw.lycoris_state_dict(layers, "full")
    full = parse(full_sd).modules["lora_unet_0"]
    assert full.bias_diff is full_sd["lora_unet_0.diff_b"]
    assert full.tensors["diff"] is full_sd["lora_unet_0.diff"]


def test_lycoris_lokr_decomposed_and_tucker():
    layers = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Conv2d(16, 32, 3))
    sd = lw.lycoris_state_dict(layers, "lokr", rank=1, factor=8, decompose_both=True, use_tucker=True)
    parsed = parse(sd)
    assert_every_key_accounted(sd, parsed)
    linear = parsed.modules["lora_unet_0"]
    assert set(linear.tensors) == {"w1a", "w1b", "w2a", "w2b"}
    conv = parsed.modules["lora_unet_1"]
    assert "t2" in conv.tensors and conv.tensors["t2"].ndim == 4
    assert parse(lw.lycoris_state_dict(layers, "lokr")).modules["lora_unet_0"].tensors.keys() >= {"w1", "w2"}


def test_lycoris_tucker_locon_has_mid(unet):
    sd = lw.lycoris_state_dict(unet, "locon", use_tucker=True)
    module = parse(sd).modules["lora_unet_conv_in"]
    assert module.tensors["mid"] is sd["lora_unet_conv_in.lora_mid.weight"]
    assert module.tensors["mid"].shape[2:] == (3, 3)


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_lycoris_dora(unet, algo):
    sd = lw.lycoris_state_dict(unet, algo, dora=True)
    parsed = parse(sd)
    assert_every_key_accounted(sd, parsed)
    for name, module in parsed.modules.items():
        assert module.dora_scale is sd[f"{name}.dora_scale"]


def test_lycoris_oft_rescale_and_boft_dims():
    layers = torch.nn.Sequential(torch.nn.Linear(16, 32))
    oft = parse(lw.lycoris_state_dict(layers, "oft", rescaled=True)).modules["lora_unet_0"]
    assert oft.algo == "oft" and oft.tensors["blocks"].ndim == 3 and "rescale" in oft.tensors
    boft = parse(lw.lycoris_state_dict(layers, "boft")).modules["lora_unet_0"]
    assert boft.algo == "boft" and boft.tensors["blocks"].ndim == 4


def test_early_oft_diag_blocks_are_rotations():
    sd = {"lora_unet_x.oft_diag": torch.eye(4).repeat(2, 1, 1), "lora_unet_x.alpha": torch.tensor(0.0)}
    module = parse(sd).modules["lora_unet_x"]
    assert module.algo == "oft" and module.flags["oft_rotation"] is True
    assert module.tensors["blocks"] is sd["lora_unet_x.oft_diag"]
    assert "oft_rotation" not in parse({"y.oft_blocks": torch.zeros(2, 4, 4)}).modules["y"].flags


def test_lycoris_norm_modules_and_own_prefix():
    layers = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16))
    sd = lw.lycoris_state_dict(layers, "lora", prefix="lycoris", train_norm=True,
                               target_module=("Linear", "LayerNorm"))
    parsed = parse(sd)
    assert_every_key_accounted(sd, parsed)
    norm = parsed.modules["lycoris_1"]
    assert norm.algo == "norm" and norm.bias_diff is sd["lycoris_1.b_norm"]
    assert parsed.modules["lycoris_0"].algo == "lora"
    assert parsed.writer == "lycoris" and detect_writer(sd) == "lycoris"


# ------------------------------------------------------------------------------------------- PEFT / diffusers


@pytest.mark.parametrize("layout", ["peft", "diffusers"])
@pytest.mark.parametrize("alpha_keys", [False, True])
def test_peft_diffusers_files(unet, text_encoder, layout, alpha_keys):
    sd = lw.peft_unet_state_dict(unet, rank=4, alpha=8, layout=layout, alpha_keys=alpha_keys)
    sd.update(lw.peft_text_encoder_state_dict(text_encoder, rank=4, alpha=8, layout=layout,
                                              alpha_keys=alpha_keys))
    parsed = parse(sd)
    assert_every_key_accounted(sd, parsed)
    assert parsed.unused == []
    assert parsed.writer == layout
    names = set(parsed.modules)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in names
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0" in names
    assert "text_encoder.text_model.encoder.layers.1.self_attn.q_proj" in names
    assert "text_encoder.text_model.encoder.layers.0.mlp.fc2" in names
    for module in parsed.modules.values():
        assert module.algo == "lora"
        assert module.tensors["down"].shape[0] == 4 and module.tensors["up"].shape[1] == 4
        assert module.tensors["up"].abs().sum() > 0
        assert module.alpha == (8.0 if alpha_keys else None)


def test_diffusers_saved_file_alpha_from_adapter_metadata(tmp_path, unet, text_encoder):
    """save_lora_weights stores LoraConfig in the header (no .alpha keys): alpha comes from there."""
    path = lw.save_diffusers_lora(str(tmp_path), unet=unet, text_encoder=text_encoder, rank=4, alpha=6)
    lora = read_lora_file(path)
    assert not any(k.endswith(".alpha") for k in lora.tensors)
    parsed = parse_modules(lora)
    assert_every_key_accounted(lora.tensors, parsed)
    assert {m.alpha for m in parsed.modules.values()} == {6.0}
    assert any(n.startswith("text_encoder.") for n in parsed.modules)
    assert parsed.writer == "peft"
    bare = lw.save_diffusers_lora(str(tmp_path / "bare"), unet=unet, rank=4, alpha=6,
                                  with_adapter_metadata=False)
    assert {m.alpha for m in parse_modules(read_lora_file(bare)).modules.values()} == {None}


def test_peft_alpha_pattern_and_rslora():
    sd = {"unet.a.to_q.lora_A.weight": torch.ones(2, 3), "unet.a.to_q.lora_B.weight": torch.ones(5, 2),
          "unet.a.to_k.lora_A.weight": torch.ones(2, 3), "unet.a.to_k.lora_B.weight": torch.ones(5, 2)}
    meta = {"lora_adapter_metadata": '{"unet.lora_alpha": 4, "unet.r": 2, "unet.alpha_pattern": {"to_k": 1}}'}
    parsed = parse(sd, meta)
    assert parsed.modules["unet.a.to_q"].alpha == 4.0 and parsed.modules["unet.a.to_k"].alpha == 1.0
    rs = parse(sd, {"lora_adapter_metadata": '{"unet.lora_alpha": 4, "unet.use_rslora": true}'})
    assert rs.modules["unet.a.to_q"].alpha == pytest.approx(4.0 * 2 ** 0.5)


def test_peft_default_adapter_names_from_a_peft_model(unet):
    """A raw PEFT model state dict keeps the adapter name: `.lora_A.default.weight`."""
    from peft import LoraConfig, inject_adapter_in_model

    model = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"]),
                                    copy.deepcopy(unet))
    sd = {k: v.detach() for k, v in model.state_dict().items() if "lora_" in k}
    assert all(".default." in k for k in sd)
    parsed = parse(sd)
    assert_every_key_accounted(sd, parsed)
    assert parsed.writer == "peft"
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in parsed.modules
    assert all(m.algo == "lora" and m.tensors["down"].shape[0] == 2 for m in parsed.modules.values())


def test_peft_dora_magnitude_becomes_dora_scale(unet):
    sd = lw.peft_unet_state_dict(unet, rank=2, alpha=2, target_modules=("to_q",), use_dora=True)
    parsed = parse(sd)
    assert_every_key_accounted(sd, parsed)
    for name, module in parsed.modules.items():
        magnitude = sd[f"{name}.lora_magnitude_vector"]
        assert module.dora_scale.shape == (magnitude.shape[0], 1)
        assert torch.equal(module.dora_scale.flatten(), magnitude)


def test_old_processor_form(unet):
    sd = lw.processor_form_state_dict(unet)
    parsed = parse(sd)
    assert_every_key_accounted(sd, parsed)
    base = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    assert {f"{base}.to_q", f"{base}.to_k", f"{base}.to_v", f"{base}.to_out.0"} <= set(parsed.modules)
    assert not any("processor" in n or n.endswith("_lora") for n in parsed.modules)
    assert parsed.modules[f"{base}.to_q"].tensors["up"] is sd[f"{base}.processor.to_q_lora.up.weight"]
    assert parsed.writer == "diffusers"


def test_old_text_encoder_forms():
    te = "text_encoder.text_model.encoder.layers.0.self_attn"
    sd = {f"{te}.to_q_lora.down.weight": torch.ones(2, 4), f"{te}.to_q_lora.up.weight": torch.ones(4, 2),
          f"{te}.to_out_lora.down.weight": torch.ones(2, 4), f"{te}.to_out_lora.up.weight": torch.ones(4, 2),
          f"{te}.k_proj.lora_linear_layer.down.weight": torch.ones(2, 4),
          f"{te}.k_proj.lora_linear_layer.up.weight": torch.ones(4, 2)}
    parsed = parse(sd)
    assert set(parsed.modules) == {f"{te}.q_proj", f"{te}.out_proj", f"{te}.k_proj"}
    assert_every_key_accounted(sd, parsed)


# ------------------------------------------------------------------------------------------- kohya


def test_kohya_linear_conv_and_tucker(unet):
    targets = lw.unet_targets(unet, convs=True)
    sd = lw.kohya_state_dict(targets, prefix="lora_unet", rank=4, alpha=2.0, tucker=True)
    parsed = parse(sd)
    assert_every_key_accounted(sd, parsed)
    assert parsed.unused == [] and parsed.writer == "kohya"
    assert len(parsed.modules) == len(targets)
    q = parsed.modules["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert q.tensors["down"].ndim == 2 and q.alpha == 2.0 and "mid" not in q.tensors
    conv = parsed.modules["lora_unet_conv_in"]
    assert conv.tensors["down"].shape[2:] == (1, 1) and conv.tensors["mid"].shape[2:] == (3, 3)
    plain = parse(lw.kohya_state_dict({"conv_in": unet.conv_in}, tucker=False)).modules["lora_unet_conv_in"]
    assert plain.tensors["down"].shape[2:] == (3, 3) and "mid" not in plain.tensors


def test_kohya_without_alpha_and_text_encoder_prefix(text_encoder):
    layers = {n: m for n, m in text_encoder.named_modules() if isinstance(m, torch.nn.Linear)}
    sd = lw.kohya_state_dict(layers, prefix="lora_te1", alpha=None)
    parsed = parse(sd)
    assert all(m.alpha is None for m in parsed.modules.values())
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in parsed.modules


# ------------------------------------------------------------------------------------------- leftovers & errors


def test_dangling_partner_and_unknown_keys_are_listed_not_dropped():
    sd = {"lora_unet_a.lora_up.weight": torch.ones(4, 2), "lora_unet_a.alpha": torch.tensor(1.0),
          "lora_unet_b.lora_down.weight": torch.ones(2, 4),
          "lora_unet_c.lora_up.weight": torch.ones(4, 2), "lora_unet_c.lora_down.weight": torch.ones(2, 4),
          "lora_unet_c.strange_suffix": torch.ones(1), "stray": torch.ones(1),
          "lora_unet_d.hada_w1_a": torch.ones(4, 2)}
    parsed = parse(sd)
    assert list(parsed.modules) == ["lora_unet_c"]
    reasons = dict(parsed.unused)
    assert reasons["lora_unet_a.lora_up.weight"] == "lora_up without lora_down"
    assert reasons["lora_unet_b.lora_down.weight"] == "lora_down without lora_up"
    assert "no weight adapter" in reasons["lora_unet_a.alpha"]
    assert "unknown key" in reasons["lora_unet_c.strange_suffix"] and "unknown key" in reasons["stray"]
    assert "no weight adapter" in reasons["lora_unet_d.hada_w1_a"]
    assert_every_key_accounted(sd, parsed)


def test_second_weight_adapter_for_a_module_is_listed():
    sd = {"m.lora_up.weight": torch.ones(4, 2), "m.lora_down.weight": torch.ones(2, 4), "m.diff": torch.ones(4, 4),
          "m.weight": torch.ones(4), "m.bm.weight": torch.ones(1)}
    parsed = parse(sd)
    reasons = dict(parsed.unused)
    assert parsed.modules["m"].algo == "lora"
    assert "not used by the lora adapter" in reasons["m.diff"]
    assert "IA" in reasons["m.weight"] and "bm.weight" in reasons["m.bm.weight"]
    assert_every_key_accounted(sd, parsed)


def test_rank_mismatch_is_a_format_error():
    sd = {"lora_unet_x.lora_up.weight": torch.ones(8, 4), "lora_unet_x.lora_down.weight": torch.ones(2, 16)}
    with pytest.raises(LoraFormatError) as info:
        parse(sd)
    message = str(info.value)
    assert "lora_unet_x" in message and "(8, 4)" in message and "(2, 16)" in message and "test.safetensors" in message


def test_alpha_must_be_a_scalar():
    sd = {"x.lora_up.weight": torch.ones(8, 2), "x.lora_down.weight": torch.ones(2, 16), "x.alpha": torch.ones(3)}
    with pytest.raises(LoraFormatError, match="x: alpha"):
        parse(sd)


def test_set_weight_reshape_and_diff_b_fold_in():
    sd = {"a.set_weight": torch.ones(3, 3), "b.lora_up.weight": torch.ones(6, 1),
          "b.lora_down.weight": torch.ones(1, 4), "b.reshape_weight": torch.tensor([6, 2, 2]),
          "b.diff_b": torch.ones(6), "c.w_norm": torch.ones(6)}
    parsed = parse(sd)
    assert parsed.modules["a"].algo == "set" and parsed.modules["c"].algo == "norm"
    assert parsed.modules["b"].flags["reshape_weight"] == [6, 2, 2]
    assert parsed.modules["b"].bias_diff is sd["b.diff_b"]
    assert parsed.unused == []


# ------------------------------------------------------------------------------------------- writer detection


def test_detect_writer(unet, text_encoder):
    assert detect_writer(lw.kohya_state_dict(lw.unet_targets(unet))) == "kohya"
    assert detect_writer(lw.lycoris_state_dict(unet, "loha")) == "lycoris"
    assert detect_writer(lw.peft_text_encoder_state_dict(text_encoder)) == "peft"
    assert detect_writer(lw.peft_text_encoder_state_dict(text_encoder, layout="diffusers")) == "diffusers"
    assert detect_writer(lw.processor_form_state_dict(unet)) == "diffusers"
    assert detect_writer(["a.set_weight"]) == "comfyui"
    assert detect_writer(["a.lora_up.weight", "b.lora_A.weight"]) == "mixed"
    assert detect_writer(["model.diffusion_model.x.weight"]) == "unknown"


def test_split_key():
    assert split_key("lora_unet_x.lora_up.weight") == ("lora_unet_x", "up", "kohya")
    assert split_key("x.lora_B.default.weight") == ("x", "up", "peft")
    assert split_key("x.lokr_w1_a") == ("x", "lokr_w1a", "lycoris")
    assert split_key("x.diff_b") == ("x", "diff_b", "lycoris")
    assert split_key("nothing_here") is None


# ------------------------------------------------------------------------------------------- ComfyUI as a reference


def test_consumed_keys_match_comfyui_core(unet):
    """ComfyUI core's load_lora, given our module names, consumes the very keys we consume."""
    from tests.comfy_host import import_comfy

    import_comfy()
    import comfy.lora

    layers = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Conv2d(8, 16, 3))
    files = [lw.lycoris_state_dict(layers, algo) for algo in ("lora", "loha", "lokr", "glora", "diag-oft", "boft")]
    files += [lw.lycoris_state_dict(layers, "lora", dora=True), lw.lycoris_state_dict(layers, "locon",
                                                                                         use_tucker=True),
              lw.peft_unet_state_dict(unet, target_modules=("to_q",)), lw.processor_form_state_dict(unet)]
    for sd in files[:-1]:  # the processor form is renamed by us, so core cannot find it by our names
        parsed = parse(sd)
        ours = {k for m in parsed.modules.values() for k in m.source_keys}
        patches = comfy.lora.load_lora(sd, {name: name for name in parsed.modules}, log_missing=False)
        assert len(patches) == len(parsed.modules)
        theirs = set()
        for name in parsed.modules:
            adapter = patches[name]
            theirs |= set(getattr(adapter, "loaded_keys", ()))
        alpha_keys = {k for k in sd if k.endswith((".alpha", ".dora_scale"))}
        assert ours - alpha_keys == theirs - alpha_keys


def test_a_file_is_parsed_once_while_its_tensors_stay_the_same():
    """A strength change re-plans from the same LoraFile: the parse is reused (same ModuleLora objects, which the
    engine recognises without walking their tensors); replacing a tensor or the metadata parses again."""
    g = torch.Generator().manual_seed(0)
    tensors = {"lora_unet_a_proj.lora_down.weight": torch.randn(4, 8, generator=g),
               "lora_unet_a_proj.lora_up.weight": torch.randn(8, 4, generator=g),
               "lora_unet_a_proj.alpha": torch.tensor(2.0)}
    lora = LoraFile(None, dict(tensors), {"ss_network_dim": "4"})
    first = parse_modules(lora)
    assert parse_modules(lora) is first
    lora.tensors["lora_unet_a_proj.alpha"] = torch.tensor(4.0)
    second = parse_modules(lora)
    assert second is not first and second.modules["lora_unet_a_proj"].alpha == 4.0
    lora.metadata["lora_adapter_metadata"] = "{}"
    assert parse_modules(lora) is not second
    assert LoraFile(None, dict(tensors)) == LoraFile(None, dict(tensors))   # the cache is not a dataclass field


def _peft_model_state(adapters: list[str]) -> dict[str, torch.Tensor]:
    """A PEFT model's own state dict (what `torch.save(peft_model.state_dict())` writes): adapter names in keys."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("to_q", torch.nn.Linear(8, 8))
    for name in adapters:
        config = LoraConfig(r=2, lora_alpha=4, target_modules=["to_q"], init_lora_weights=False)
        model = inject_adapter_in_model(config, model, adapter_name=name)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def test_a_peft_adapter_with_its_own_name_is_read_like_default():
    state = _peft_model_state(["style"])
    assert any(".lora_A.style.weight" in k for k in state)
    parsed = parse_modules(LoraFile(None, state))
    assert list(parsed.modules) == ["to_q"] and parsed.unused == []
    module = parsed.modules["to_q"]
    assert torch.equal(module.tensors["down"], state["to_q.lora_A.style.weight"])
    assert torch.equal(module.tensors["up"], state["to_q.lora_B.style.weight"])


def test_a_file_with_several_peft_adapters_reads_the_first_and_reports_the_others():
    state = _peft_model_state(["style", "detail"])
    parsed = parse_modules(LoraFile(None, state))
    assert torch.equal(parsed.modules["to_q"].tensors["down"], state["to_q.lora_A.style.weight"])
    reported = dict(parsed.unused)
    assert set(reported) == {"to_q.lora_A.detail.weight", "to_q.lora_B.detail.weight"}
    assert all("PEFT adapter 'detail'" in why and "'style'" in why for why in reported.values())
