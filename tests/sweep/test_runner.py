"""A 2x2 sweep on tiny-llama, end to end: interrupted mid-run, resumed, judged, selected, reported.

The task is learnable in a few steps (every answer is "ok"); the tiny random model's output head
bounds its logits, so the head trains in full beside the adapter (`modules_to_save`). At lr 1e-1
the loss falls lowest, and the model says "k" to everything: perplexity on the regression texts
rises several-fold, a real FAIL, so the lowest-loss run must not be the one selected.
"""
import csv
import json
import random

import pytest

from lorakit.cli import main
from lorakit.evaluate.report import Thresholds
from lorakit.sweep import EvalSettings, sweep
from lorakit.sweep import runner
from lorakit.training.trainer import NonFiniteLoss, Trainer

GRID = {"grid": {"lr": [1e-3, 1e-1], "r": [2, 8]},
        "fixed": {"steps": 12, "batch_size": 4, "warmup": 0, "save_every": 6, "modules_to_save": ["lm_head"]}}
THRESHOLDS = Thresholds(min_task_gain=-1, max_ppl_increase=0.05, warn_ppl_increase=0.10, min_agreement=0)
SETTINGS = EvalSettings(max_new_tokens=4, texts=["The quick brown fox jumps over the lazy dog. " * 3,
                                                 "It was the best of times, it was the worst of times. " * 2],
                        prompts=["hello", "what is 2+2"], regression_tokens=8)
WORDS = "box parcel order lamp chair refund late broken blue red courier ticket".split()


def _write(path, n, seed):
    rng = random.Random(seed)
    rows = [{"prompt": " ".join(rng.choice(WORDS) for _ in range(4)) + " ->", "completion": "ok"} for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-data")
    return {"data": _write(root / "train.jsonl", 32, 0), "eval_data": _write(root / "heldout.jsonl", 8, 1)}


def _sweep(out, data, **kw):
    return sweep(GRID, model="tiny-llama", out=str(out), thresholds=THRESHOLDS, settings=SETTINGS, progress=False,
                 **data, **kw)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, data):
    """The sweep killed in its third run's training (after the step-6 checkpoint), then run again."""
    out = tmp_path_factory.mktemp("sweep")
    save, calls = Trainer.save_checkpoint, []

    def dying_save(self):
        path = save(self)
        calls.append(self.step)
        if calls.count(6) == 3:                     # the third run, halfway
            raise KeyboardInterrupt("killed")
        return path

    mp = pytest.MonkeyPatch()
    mp.setattr(Trainer, "save_checkpoint", dying_save)
    with pytest.raises(KeyboardInterrupt):
        _sweep(out, data)
    mp.undo()
    records = sorted(out.glob("runs/*/record.json"))
    first = {p.parent.name: p.stat().st_mtime_ns for p in records}
    result = _sweep(out, data)
    return out, result, first


def test_a_resumed_sweep_skips_finished_runs_and_resumes_the_unfinished(swept, data):
    out, result, first = swept
    assert len(first) == 2
    assert [r["how"] for r in result["records"]] == ["done earlier", "done earlier", "resumed", "trained"]
    assert [r["resumed_at_step"] for r in result["records"][2:]] == [6, 0]
    assert {p.parent.name: p.stat().st_mtime_ns for p in out.glob("runs/*/record.json") if p.parent.name in first} == first
    again = _sweep(out, data)
    assert [r["how"] for r in again["records"]] == ["done earlier"] * 4


def test_results_csv_and_plots(swept):
    out, result, _ = swept
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4
    for column in ("trainable_params", "planned_peak_bytes", "measured_peak_bytes", "s_per_step", "final_loss",
                   "heldout_accuracy", "heldout_low", "heldout_high", "ppl_change", "verdict", "adapter_bytes"):
        assert all(r[column] != "" for r in rows), column
    assert {r["r"] for r in rows} == {"2", "8"} and {float(r["lr"]) for r in rows} == {1e-3, 1e-1}
    assert int(rows[0]["trainable_params"]) > 0 and int(rows[0]["adapter_bytes"]) > 0
    for name in ("score_vs_params.png", "loss_curves.png", "score_by_rank.png"):
        assert (out / name).stat().st_size > 1000
    assert (out / "runs" / result["selected"] / "eval_report.md").is_file()


def test_the_lowest_loss_run_fails_regression_and_is_not_selected(swept):
    out, result, _ = swept
    rows = {r["id"]: r for r in csv.DictReader((out / "results.csv").open())}
    lowest = min(rows.values(), key=lambda r: float(r["final_loss"]))
    assert float(lowest["lr"]) == 1e-1
    assert lowest["verdict"] == "FAIL" and float(lowest["ppl_change"]) > THRESHOLDS.warn_ppl_increase
    chosen = rows[result["selected"]]
    assert chosen["id"] != lowest["id"] and chosen["verdict"] == "PASS" and chosen["selected"] == "True"
    assert "FAIL" in result["why_not"][lowest["id"]] and "perplexity" in result["why_not"][lowest["id"]]
    assert set(result["why_not"]) == set(rows) - {chosen["id"]}
    md = (out / "results.md").read_text()
    assert "**selected**" in md and lowest["id"] in md.split("## Why not the others")[1]


def test_a_diverged_run_is_recorded_not_repeated_and_never_selected(tmp_path, data, monkeypatch):
    def diverge(*a, **k):
        raise NonFiniteLoss("non-finite loss (nan) at step 1")
    monkeypatch.setattr(runner, "train_model", diverge)
    grid = {"runs": [{"r": 2}], "fixed": {"steps": 2}}
    result = sweep(grid, model="tiny-llama", out=str(tmp_path), settings=SETTINGS, progress=False, **data)
    record = result["records"][0]
    assert record["status"] == "diverged" and record["how"] == "trained"
    assert result["selected"] is None and "FAIL" in result["why_not"][record["id"]]
    assert "non-finite loss" in result["why_not"][record["id"]]
    again = sweep(grid, model="tiny-llama", out=str(tmp_path), settings=SETTINGS, progress=False, **data)
    assert again["records"][0]["how"] == "done earlier"


def test_cli(tmp_path, data, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("runs:\n  - {r: 2, lr: 1e-3}\n  - {method: prompt, num_virtual_tokens: 4}\n"
                    "fixed: {steps: 2, batch_size: 4}\n")
    args = ["sweep", "--model", "tiny-llama", "--data", data["data"], "--eval-data", data["eval_data"], "--grid",
            str(grid), "--out", str(tmp_path / "out"), "--max-new-tokens", "4", "--no-progress", "--min-agreement", "0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "2 runs (2 trained now, 0 finished earlier)" in out and "selected: " in out
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert sorted((r["method"], r["r"], r["num_virtual_tokens"]) for r in rows) == [("lora", "2", ""),
                                                                                   ("prompt", "", "4")]
    grid.write_text("grid:\n  r: [2]\n  colour: [red]\n")
    assert main(args) == 2
    assert "grid.colour" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["sweep", "--help"])
    assert done.value.code == 0 and "--alpha-policy" in capsys.readouterr().out
    grid.write_text("grid: {}\n")
    assert main(args) == 2
    assert "the grid is empty" in capsys.readouterr().err
