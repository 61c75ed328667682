import json
import subprocess
import sys

import pytest
import torch
import transformers

import lorakit as lk
from lorakit.cli import main
from tests.helpers import inputs, logits, randomize


def test_inspect_json_tiny(capsys):
    assert main(["inspect", "tiny-llama", "--targets", "qv", "--r", "8", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "llama" and info["layers"] == 2
    assert info["linear_modules"]["self_attn.k_proj"] == {"count": 2, "d_in": 32, "d_out": 16}
    assert info["presets"]["qv"] == {"self_attn.q_proj": 2, "self_attn.v_proj": 2}
    assert info["presets"]["all-linear"]["mlp.down_proj"] == 2 and "lm_head" not in info["presets"]["all-linear"]
    # r=8 on q (32->32) and v (32->16), two layers: 2 * 8 * ((32+32) + (32+16))
    assert info["report"]["trainable"] == 2 * 8 * (64 + 48)


def test_inspect_human_output(capsys):
    assert main(["inspect", "tiny-gpt2", "--targets", "c_attn,c_fc"]) == 0
    out = capsys.readouterr().out
    assert "Linear modules by kind" in out and "attn.c_attn" in out and "trainable" in out


def test_inspect_bad_targets_is_a_clean_error(capsys):
    assert main(["inspect", "tiny-gpt2", "--targets", "q_proj"]) == 2
    err = capsys.readouterr().err
    assert "lorakit inspect: error" in err and "Presets that match this model" in err


def test_merge_writes_a_plain_transformers_folder(tmp_path, capsys):
    model = lk.tiny_model("llama")
    lk.inject(model, lk.LoraConfig(r=4, targets="all-linear"))
    randomize(model)
    x = inputs(model)
    expected = logits(model, x)
    lk.save_adapter(model, tmp_path / "adapter")
    assert main(["merge", "--model", "tiny-llama", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(plain, x), expected, atol=1e-5, rtol=0)
    assert main(["merge", "--model", "tiny-llama", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_console_script_and_module_entry_points():
    out = subprocess.run([sys.executable, "-m", "lorakit", "--help"], capture_output=True, text=True, check=True).stdout
    assert "inspect" in out and "merge" in out and "demo" in out


@pytest.mark.embedded
def test_inspect_embedded(embedded_folder, capsys):
    assert main(["inspect", "smollm2-135m-instruct", "--targets", "qv", "--r", "16", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == 30 and info["hidden_size"] == 576
    assert sum(info["presets"]["all-linear"].values()) == 210
    # q: 576->576, v: 576->192 (3 kv heads x 64); r=16 -> 30 * 16 * ((576+576) + (576+192))
    assert info["report"]["trainable"] == 30 * 16 * (1152 + 768) == 921_600


@pytest.mark.embedded
def test_demo_pipeline_on_embedded(embedded_folder, tmp_path, capsys):
    # the whole main job on the real model, shortened (make demo runs the full-size version)
    code = main(["demo", "--out", str(tmp_path / "demo"), "--steps", "4", "--n-train", "32", "--n-heldout", "6"])
    out = capsys.readouterr().out
    assert code in (0, 1) and "held-out routing accuracy" in out and "verdict:" in out
    run = tmp_path / "demo" / "run"
    report = json.loads((run / "eval_report.json").read_text())
    assert report["regression"]["ppl_off"] > 1 and report["task"]["after"]["n"] == 6
    for name in ("adapter/adapter_model.safetensors", "eval_report.md", "loss.png", "metrics.jsonl", "summary.json"):
        assert (run / name).is_file(), name
    # it ends by serving the base and the adapter over HTTP, one request to each
    assert "POST /v1/chat/completions" in out and "carrier-policy" in out and "smollm2-135m-instruct" in out


@pytest.mark.parametrize("command", ["train", "plan", "eval", "inspect", "merge", "serve", "sweep", "demo"])
def test_every_command_has_working_help(capsys, command):
    from lorakit.cli import main
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0 and "usage" in capsys.readouterr().out
