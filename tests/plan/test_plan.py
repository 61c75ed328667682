"""Every worked number of the seed, out of `lorakit plan`."""
import json

import pytest

import lorakit as lk
from lorakit.cli import main
from lorakit.models import tiny_model
from lorakit.config import FullConfig
from lorakit.plan import PlanConfig, plan_model
from lorakit.targets import PRESETS


def plan(capsys, *argv):
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_70b_and_65b_model_states(capsys):
    h = plan(capsys, "--params", "70B")["headline"]
    assert (h["full_12-byte_gb"], h["full_16-byte_gb"], h["lora_fp16_floor_gb"]) == (840, 1120, 140)
    h = plan(capsys, "--params", "65B")["headline"]
    assert (h["full_12-byte_gb"], h["lora_fp16_floor_gb"], h["nf4_payload_gb"]) == (780, 130, 32.5)
    assert f"{h['nf4_with_constants_gb']:.1f}" == "33.5" and f"{h['quant_constant_bits']:.3f}" == "0.127"
    plain = plan(capsys, "--params", "65B", "--no-double-quant")["headline"]
    assert plain["quant_constant_bits"] == 0.5


@pytest.mark.parametrize("r, params, percent, size", [(16, 131_072, "0.78", None), (8, 65_536, "0.39", "131 KB"),
                                                      (64, 524_288, "3.1", "1.0 MB")])
def test_one_projection(capsys, r, params, percent, size):
    m = plan(capsys, "--matrix", "4096x4096", "--rank", str(r))["matrix"]
    assert m["lora_params"] == params and f"{m['percent_of_full']:.{len(percent.split('.')[1])}f}" == percent
    assert m["full_params"] == 16_777_216
    if size == "131 KB":
        assert round(m["lora_bytes"] / 1e3) == 131
    if size == "1.0 MB":
        assert f"{m['lora_bytes'] / 1e6:.1f}" == "1.0"


def test_dora_magnitude(capsys):
    m = plan(capsys, "--matrix", "4096x4096", "--rank", "16", "--method", "dora")["matrix"]
    assert m["dora_magnitude_params"] == 4096 and f"{m['dora_extra_vs_lora_percent']:.2f}" == "3.12"


@pytest.fixture
def toy_block(tmp_path):
    """The seed's toy block: q, k, v, o 4096x4096; gate, up 4096x11008; down 11008x4096 (one layer)."""
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
           "intermediate_size": 11008, "num_hidden_layers": 1, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_toy_block_targets_and_rank_tables(capsys, toy_block):
    p = plan(capsys, str(toy_block), "--rank", "16")["model"]
    assert p["targets_table"]["qv"] == 262_144 and p["targets_table"]["all-linear"] == 1_249_280
    assert f"{p['targets_table']['all_linear_vs_qv']:.2f}" == "4.77"
    assert [r["params"] for r in p["rank_table"]] == [312_320, 624_640, 1_249_280, 4_997_120, 19_988_480]
    assert p["parameters"]["trainable"] == 1_249_280
    assert p["parameters"]["by_kind"]["mlp.down_proj"] == {"modules": 1, "d_in": 11008, "d_out": 4096,
                                                           "lora_params_per_module": 241_664, "params": 241_664}


def test_tenants(capsys):
    s = plan(capsys, "--tenants", "50", "--base-gb", "14", "--adapter-mb", "128")["tenants"]
    assert s["merged_full_models_gb"] == 700 and s["shared_base_plus_adapters_gb"] == 20.25
    assert f"{s['reduction_x']:.1f}" == "34.6"


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "bert"])
def test_planned_trainable_equals_the_real_injected_model(family):
    for preset in PRESETS:
        planned = plan_model(f"tiny-{family}", lk.LoraConfig(r=4, targets=preset))["parameters"]["trainable"]
        real = lk.inject(tiny_model(family), lk.LoraConfig(r=4, targets=preset))
        assert planned == lk.trainable_report(real).trainable, (family, preset)


def test_qlora_and_full_memory_lines(capsys, toy_block):
    q = plan(capsys, str(toy_block), "--method", "qlora")["model"]["memory"]["components"]
    names = [c["component"] for c in q]
    assert names[:3] == ["frozen weights (NF4 payload)", "quantization constants", "frozen weights (not quantized)"]
    linear = 4 * 4096 * 4096 + 3 * 4096 * 11008
    assert q[0]["bytes"] == linear / 2
    f = plan(capsys, str(toy_block), "--method", "full", "--recipe", "16-byte")["model"]["memory"]["components"]
    assert [c["component"] for c in f][:4] == ["weights", "gradients", "optimizer", "master"]


def test_human_output(capsys, toy_block):
    assert main(["plan", str(toy_block), "--params", "70B", "--matrix", "4096x4096"]) == 0
    out = capsys.readouterr().out
    assert "840.0" in out and "131,072" in out and "Memory (12-byte recipe)" in out


@pytest.mark.parametrize("argv, message", [
    (["tiny-llama", "--targets", "everything"], "matched no linear module"),
    (["--matrix", "4096x4096", "--rank", "0"], "--rank 0"),
    (["--params", "lots"], "--params 'lots'"),
    (["--matrix", "4096"], "--matrix '4096'"),
    ([], "give a MODEL"),
])
def test_bad_input(capsys, argv, message):
    assert main(["plan", *argv]) == 2
    assert message in capsys.readouterr().err


def test_config_without_dimensions(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    assert main(["plan", str(tmp_path)]) == 2
    assert "config.json: not a usable model config" in capsys.readouterr().err


@pytest.mark.embedded
def test_embedded_plan_matches_trainable_report(embedded_folder):
    model, _ = lk.load_base("smollm2-135m-instruct")
    for preset in PRESETS:
        planned = plan_model("smollm2-135m-instruct", lk.LoraConfig(r=16, targets=preset))["parameters"]["trainable"]
        lk.inject(model, lk.LoraConfig(r=16, targets=preset), name=preset.replace("-", "_"))
        lk.set_active(model, preset.replace("-", "_"))
        assert planned == lk.trainable_report(model).trainable, preset


def _lines(plan):
    return {c["component"]: c["bytes"] for c in plan["memory"]["components"]}


def test_peak_overlaps_gradients_with_activations():
    """One micro-batch: backward frees activations as it writes gradients, the head's first."""
    kw = dict(recipe="fp32", dtype="float32", seq_len=128, micro_batch=4)       # fp32 weights and activations
    one = plan_model("tiny-llama", FullConfig(), PlanConfig(**kw))
    c, head = _lines(one), one["memory"]["head_gradient_bytes"]
    total = one["parameters"]["total"]
    assert head == 288 * 32 * 4                         # vocab x hidden x fp32 (tiny llama's head is untied)
    assert c["activations"] == 2 * 512 * (9 * 32 + 4 * 16 + 4 * 64) * 4
    assert one["memory"]["total_bytes"] == 4 * total + 8 * total + max(4 * total, c["activations"] + head)
    assert one["memory"]["sum_bytes"] == 16 * total + c["activations"]
    acc = plan_model("tiny-llama", FullConfig(), PlanConfig(**kw, grad_accum=2))   # earlier micro-batches' gradients live on
    assert acc["memory"]["total_bytes"] == acc["memory"]["sum_bytes"] == 16 * total + c["activations"]
    lora = plan_model("tiny-llama", lk.LoraConfig(), PlanConfig(**kw))
    cl = _lines(lora)
    assert lora["memory"]["head_gradient_bytes"] == 0 and cl["activations"] == 2 * 512 * (7 * 32 + 4 * 16 + 4 * 64) * 4
    assert lora["memory"]["total_bytes"] == cl["frozen weights"] + cl["adapter weights"] + cl["adapter optimizer"] \
        + max(cl["adapter gradients"], cl["activations"])


def test_checkpointing_keeps_layer_inputs_and_one_recomputed_layer():
    kw = dict(recipe="fp32", dtype="float32", seq_len=128, micro_batch=4)
    ck = _lines(plan_model("tiny-llama", lk.LoraConfig(), PlanConfig(**kw, grad_checkpointing=True)))
    assert ck["activations"] == 2 * 512 * 32 * 4 + 512 * (7 * 32 + 4 * 16 + 4 * 64) * 4



@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method, config", [("prompt", lambda: lk.PromptTuningConfig(num_virtual_tokens=7)),
                                            ("prefix", lambda: lk.PrefixTuningConfig(num_virtual_tokens=7)),
                                            ("prefix-mlp", lambda: lk.PrefixTuningConfig(num_virtual_tokens=7,
                                                                                         projection=12))])
def test_planned_input_adapter_counts_equal_the_real_injected_model(family, method, config):
    planned = plan_model(f"tiny-{family}", config())["parameters"]["trainable"]
    real = lk.inject(tiny_model(family), config())
    assert planned == lk.trainable_report(real).trainable > 0
