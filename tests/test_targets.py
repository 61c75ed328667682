import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.targets import TargetError, kind, portable_targets, resolve

EXPECTED = {  # family -> preset -> kinds (block-relative names) it must select, per layer
    "llama": {"qv": {"self_attn.q_proj", "self_attn.v_proj"},
              "attention": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"},
              "all-linear": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}},
    "gpt2": {"qv": {"attn.c_attn"}, "attention": {"attn.c_attn", "attn.c_proj"},
             "all-linear": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}},
    "bert": {"qv": {"attention.self.query", "attention.self.value"},
             "attention": {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"},
             "all-linear": {"attention.self.query", "attention.self.key", "attention.self.value",
                            "attention.output.dense", "intermediate.dense", "output.dense"}},
}
EXPECTED["qwen2"] = EXPECTED["llama"]
OUTSIDE_BLOCKS = {"bert": {"all-linear": {"bert.pooler.dense"}}}   # peft's all-linear takes the pooler, not the head


@pytest.mark.parametrize("preset", ["qv", "attention", "all-linear"])
def test_presets_per_family(tiny, family, preset):
    chosen = resolve(tiny, preset)
    outside = OUTSIDE_BLOCKS.get(family, {}).get(preset, set())
    assert {kind(n) for n in chosen} == EXPECTED[family][preset] | outside
    assert len(chosen) == 2 * len(EXPECTED[family][preset]) + len(outside)  # two layers


def test_all_linear_never_takes_the_head(tiny):
    head = tiny.get_output_embeddings() if hasattr(tiny, "get_output_embeddings") else None
    names = resolve(tiny, "all-linear")
    for n in names:
        assert tiny.get_submodule(n) is not head
        assert "lm_head" not in n and "classifier" not in n and "score" not in n


def test_list_matches_exact_name_or_dot_suffix():
    model = lk.tiny_model("llama")
    assert resolve(model, ["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert resolve(model, ["model.layers.1.self_attn.q_proj"]) == ["model.layers.1.self_attn.q_proj"]
    with pytest.raises(TargetError, match=r"\['proj'\]"):   # 'proj' is not a whole dotted suffix
        resolve(model, ["proj"])


def test_string_is_a_full_match_regex():
    model = lk.tiny_model("llama")
    assert resolve(model, r".*\.1\.self_attn\.(q|v)_proj") == ["model.layers.1.self_attn.q_proj",
                                                                "model.layers.1.self_attn.v_proj"]
    with pytest.raises(TargetError):
        resolve(model, "q_proj")       # a partial match is not a match


def test_exclude_uses_the_same_rules():
    model = lk.tiny_model("llama")
    chosen = resolve(model, "all-linear", exclude=["mlp.down_proj", "layers.0.self_attn.q_proj"])
    assert "model.layers.0.mlp.down_proj" not in chosen and "model.layers.0.self_attn.q_proj" not in chosen
    assert "model.layers.1.self_attn.q_proj" in chosen and len(chosen) == 14 - 3


def test_nothing_matched_lists_modules_and_working_presets():
    model = lk.tiny_model("gpt2")
    with pytest.raises(TargetError) as e:
        lk.inject(model, lk.LoraConfig(targets=["q_proj", "v_proj"]))
    text = str(e.value)
    assert "['q_proj', 'v_proj']" in text and "attn.c_attn x2" in text and "mlp.c_fc x2" in text
    assert "Presets that match this model: qv, attention, mlp, all-linear" in text
    assert not any(p.requires_grad is False for p in model.parameters())   # model untouched


def test_unknown_family_all_linear_is_every_linear_layer():
    """peft's rule: a model that is not a transformers model has no output head to leave out."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj_in, self.proj_out = nn.Linear(8, 16), nn.Linear(16, 8)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])
            self.head = nn.Linear(8, 4)

    net = Net()
    assert resolve(net, "all-linear") == ["blocks.0.proj_in", "blocks.0.proj_out", "blocks.1.proj_in", "blocks.1.proj_out",
                                          "head"]
    with pytest.raises(TargetError, match="Presets that match this model: all-linear"):
        resolve(net, "qv")


def test_portable_targets_reproduce_the_selection(tiny):
    for preset in ("qv", "attention", "all-linear"):
        chosen = resolve(tiny, preset)
        assert resolve(tiny, portable_targets(tiny, chosen)) == chosen
    partial = resolve(tiny, "all-linear")[:3]
    assert resolve(tiny, portable_targets(tiny, partial)) == partial


def test_report_matches_the_seed_worked_example():
    # The seed: r=16 on one 4096x4096 projection -> 131,072 trainable parameters, 0.78%.
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(4096, 4096, bias=False, device="meta")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Layer()])

    net = Net()
    with torch.device("meta"):
        lk.inject(net, lk.LoraConfig(r=16, targets=["q_proj"]))
    report = lk.trainable_report(net)
    assert report.trainable == 131_072 and report.matched_modules == 1
    assert f"{report.percent:.2f}" == "0.78"
    assert report.by_kind == {"q_proj": {"modules": 1, "params": 131_072}}
    assert "131,072" in str(report)
