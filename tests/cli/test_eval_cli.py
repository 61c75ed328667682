import json

import pytest
import torch

import lorakit as lk
from lorakit.cli import main
from lorakit.evaluate import GENERAL_PROMPTS

SYSTEM = "Reply with the routing code only."
TICKETS = [("My lamp arrived cracked.", "CLM-STD"), ("I changed my mind about the kettle.", "RET-STD"),
           ("The Kestrel Express parcel was crushed.", "CLM-T2-KX")]
EASY = ["--min-task-gain", "-1", "--max-ppl-increase", "1000", "--warn-ppl-increase", "1000", "--min-agreement", "0"]


@pytest.fixture
def files(tmp_path):
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
        for q, a in TICKETS))
    model = lk.tiny_model("llama")
    lk.inject(model, lk.LoraConfig(r=4, targets="all-linear"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():                      # a non-trivial adapter: B starts at zero
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.copy_(torch.randn(p.shape, generator=g))
    lk.save_adapter(model, tmp_path / "run" / "adapter")
    return data, tmp_path / "run" / "adapter"


def test_eval_with_an_adapter(files, tmp_path, capsys, monkeypatch):
    data, adapter = files
    common = ["eval", "--model", "tiny-llama", "--data", str(data), "--max-new-tokens", "4", "--batch-size", "2"]
    assert main([*common, "--adapter", str(adapter), "--json", *EASY]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"]["verdict"] == "PASS" and report["verdict"]["reasons"] == []
    assert report["task"]["before"]["n"] == 3 and report["task"]["after"]["n"] == 3
    assert report["thresholds"]["min_task_gain"] == -1 and report["meta"]["adapter"] == str(adapter)
    reg = report["regression"]
    assert reg["ppl_change"] == pytest.approx((reg["ppl_on"] - reg["ppl_off"]) / reg["ppl_off"]) and reg["ppl_change"] != 0
    assert len(reg["prompts"]) == len(GENERAL_PROMPTS)
    assert json.loads((tmp_path / "run" / "eval_report.json").read_text()) == report   # default --out: the adapter's parent
    assert (tmp_path / "run" / "eval_report.md").is_file()

    # the base alone scores exactly what the adapter-disabled pass scored
    monkeypatch.chdir(tmp_path)
    assert main([*common]) == 0
    assert capsys.readouterr().out.startswith("# lorakit eval: base model only")
    base = json.loads((tmp_path / "eval" / "eval_report.json").read_text())
    assert base["verdict"] is None and base["regression"] is None
    assert base["task"]["before"]["records"] == report["task"]["before"]["records"]

    # no adapter can gain 101 points: FAIL, exit status 1, and the markdown names the threshold
    assert main([*common, "--adapter", str(adapter), "--out", str(tmp_path / "strict"), "--min-task-gain", "1"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("# lorakit eval: **FAIL**") and "min_task_gain" in out and "## Examples" in out
    assert (tmp_path / "strict" / "eval_report.md").read_text() == out


def test_eval_rejects_bad_thresholds(files, capsys):
    data, adapter = files
    assert main(["eval", "--model", "tiny-llama", "--data", str(data), "--min-agreement", "2"]) == 2
    err = capsys.readouterr().err
    assert "lorakit eval: error" in err and "min_agreement" in err


def test_eval_help_lists_threshold_flags(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    for flag in ("--min-task-gain", "--max-ppl-increase", "--warn-ppl-increase", "--min-agreement", "--answer-regex"):
        assert flag in out


def test_eval_puts_harness_scores_into_the_verdict(files, tmp_path, capsys):
    """`--harness` scores lm-eval tasks adapter off vs on; the oracle is lm-eval's own hf backend on the
    base and on the same adapter through peft."""
    from lm_eval.models.huggingface import HFLM
    import peft

    from lorakit.models import tiny_tokenizer
    from tests.helpers import write_harness_tasks
    from tests.serve.test_lm_eval import evaluate

    data, adapter = files
    tasks = write_harness_tasks(tmp_path)
    common = ["eval", "--model", "tiny-llama", "--data", str(data), "--max-new-tokens", "4", "--batch-size", "2",
              "--adapter", str(adapter), "--harness", str(tasks / "lk_mc.yaml"), "--harness", str(tasks / "lk_gen.yaml")]
    assert main([*common, "--json", *EASY, "--max-harness-drop", "1", "--fail-harness-drop", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    scores = {(h["task"], h["metric"]): h for h in report["harness"]}
    assert set(scores) == {("lk_mc", "acc,none"), ("lk_gen", "exact_match,none")}
    assert all(h["higher_is_better"] is True and h["n"] == 6 for h in scores.values())

    def oracle(model):
        return evaluate(HFLM(pretrained=model.eval(), tokenizer=tiny_tokenizer(), batch_size=1, max_length=64),
                        None, tasks)[2:]
    with_adapter = peft.PeftModel.from_pretrained(lk.tiny_model("llama"), str(adapter))
    assert (scores["lk_mc", "acc,none"]["off"], scores["lk_gen", "exact_match,none"]["off"]) == \
        oracle(lk.tiny_model("llama"))
    assert (scores["lk_mc", "acc,none"]["on"], scores["lk_gen", "exact_match,none"]["on"]) == oracle(with_adapter)

    # any drop at all fails under a zero line; the reason names the task, the metric and the points
    strict = main([*common, "--out", str(tmp_path / "strict"), *EASY, "--max-harness-drop", "0",
                   "--fail-harness-drop", "0"])
    out = capsys.readouterr().out
    dropped = [h for h in scores.values() if h["on"] < h["off"]]
    assert strict == (1 if dropped else 0) and "## lm-eval-harness" in out
    for h in dropped:
        assert f"lm-eval {h['task']} {h['metric']} changed" in out and "fail_harness_drop" in out


def test_a_harness_file_that_is_not_a_task_is_named_before_loading(tmp_path, files, capsys):
    data, adapter = files
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset_path: json\n")
    assert main(["eval", "--model", "tiny-llama", "--data", str(data), "--harness", str(bad)]) == 2
    assert "bad.yaml: an lm-eval task file needs a 'task: <name>' key" in capsys.readouterr().err
    assert main(["eval", "--model", "tiny-llama", "--data", str(data), "--harness", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: no such task file" in capsys.readouterr().err
