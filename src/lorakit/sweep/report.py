"""A sweep's results: each run judged, one selected by a rule, written as CSV, markdown and plots.

The verdict per run is `lorakit eval`'s (`evaluate.report.verdict`: task gain, perplexity on general
text, general prompts kept), applied here to the raw numbers the runner recorded, so new thresholds
or another rule re-judge a sweep without training again. Selection (`select`) never looks at
training loss: it takes the best held-out accuracy among the runs the rule admits and says, for
every other run, why it was not chosen. This module runs no model.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from ..config import LoraConfig, PromptTuningConfig
from ..evaluate.regression import RegressionResult
from ..evaluate.report import Thresholds, verdict, write_report
from ..evaluate.task import TaskResult
from ..atomic import write_text
from ..training.trainer import TrainConfig
from .plots import PLOTS, plot_all  # noqa: F401  (PLOTS re-exported: report.PLOTS names the plot files)

# rule -> the verdicts it admits
RULES = {"best-pass": ("PASS",), "best-pass-or-warn": ("PASS", "WARN")}
RULE_TEXT = ("the highest held-out accuracy among runs whose verdict is {admitted}; ties go to the smaller "
             "perplexity change on general text, then to fewer trainable parameters, then to the run id. "
             "Training loss is never a criterion.")
COLUMNS = ["id", "method", "r", "alpha", "scale", "lr", "targets", "dropout", "quantize", "num_virtual_tokens",
           "seed", "steps", "trainable_params", "planned_peak_bytes", "measured_peak_bytes", "s_per_step",
           "final_loss", "eval_loss", "heldout_accuracy", "heldout_low", "heldout_high", "base_accuracy",
           "task_gain", "ppl_off", "ppl_on", "ppl_change", "prompts_kept", "verdict", "adapter_bytes", "status",
           "selected", "why_not"]
LORA_METHODS = ("lora", "dora")


def task_results(record: dict) -> tuple[TaskResult, TaskResult, RegressionResult]:
    """(base, adapted, regression) as the evaluator's result objects, for `evaluate.report.verdict`."""
    return (TaskResult(**record["base_task"]), TaskResult(**record["task"]), RegressionResult(**record["regression"]))


def judge(record: dict, thresholds: Thresholds) -> dict:
    """The verdict dict (`verdict`, `reasons`, `agreement`, ...) for one run's record."""
    if record["status"] != "ok":
        return {"verdict": "FAIL", "reasons": [f"training stopped: {record['error']}"], "task_gain": None,
                "ppl_change": None, "agreement": None}
    return verdict(*task_results(record), thresholds)


def row(record: dict, decision: dict) -> dict:
    """One flat row of results.csv (selection columns filled in by `write`)."""
    c = record["config"]
    method = c.get("method", "lora")
    lora = method in LORA_METHODS
    r, alpha = c.get("r", LoraConfig.r), c.get("alpha", LoraConfig.alpha)
    task, reg = record.get("task"), record.get("regression")
    return {
        "id": record["id"], "method": method, "r": r if lora else None, "alpha": alpha if lora else None,
        "scale": (alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r) if lora else None,
        "lr": c.get("lr", TrainConfig.lr), "targets": _targets(c.get("targets", LoraConfig.targets)) if lora else None,
        "dropout": c.get("dropout", LoraConfig.dropout) if lora else None, "quantize": c.get("quantize"),
        "num_virtual_tokens": None if lora else c.get("num_virtual_tokens", PromptTuningConfig.num_virtual_tokens),
        "seed": c.get("seed", TrainConfig.seed), "steps": record.get("steps"),
        "trainable_params": record.get("trainable_params"), "planned_peak_bytes": record.get("planned_peak_bytes"),
        "measured_peak_bytes": record.get("measured_peak_bytes"), "s_per_step": record.get("s_per_step"),
        "final_loss": record.get("final_loss"), "eval_loss": record.get("eval_loss"),
        "heldout_accuracy": task and task["accuracy"], "heldout_low": task and task["low"],
        "heldout_high": task and task["high"], "base_accuracy": task and record["base_task"]["accuracy"],
        "task_gain": decision["task_gain"], "ppl_off": reg and reg["ppl_off"], "ppl_on": reg and reg["ppl_on"],
        "ppl_change": decision["ppl_change"], "prompts_kept": decision["agreement"], "verdict": decision["verdict"],
        "adapter_bytes": record.get("adapter_bytes"), "status": record["status"], "selected": False, "why_not": "",
        "reasons": decision["reasons"],
    }


def _targets(t) -> str:
    return t if isinstance(t, str) else ",".join(t)


def _key(r: dict):
    acc = r["heldout_accuracy"] if r["heldout_accuracy"] is not None else -1.0
    ppl = r["ppl_change"] if r["ppl_change"] is not None and math.isfinite(r["ppl_change"]) else math.inf
    return (-acc, ppl, r["trainable_params"] or 0, r["id"])


def select(rows: list[dict], rule: str = "best-pass") -> tuple[str | None, dict[str, str]]:
    """(the chosen run's id or None, {every other id: why it was not chosen})."""
    if rule not in RULES:
        raise ValueError(f"select rule {rule!r} is not one of {', '.join(RULES)}")
    admitted = RULES[rule]
    eligible = sorted((r for r in rows if r["verdict"] in admitted), key=_key)
    best = eligible[0] if eligible else None
    why = {}
    for r in rows:
        if best is not None and r["id"] == best["id"]:
            continue
        if r["verdict"] not in admitted:
            why[r["id"]] = f"verdict {r['verdict']} (the rule {rule} admits {'/'.join(admitted)}): " + \
                "; ".join(r["reasons"])
        elif r["heldout_accuracy"] < best["heldout_accuracy"]:
            why[r["id"]] = (f"held-out accuracy {r['heldout_accuracy']:.1%} is below the selected run's "
                            f"{best['heldout_accuracy']:.1%}")
        elif _key(r)[1] > _key(best)[1]:
            why[r["id"]] = (f"tied on held-out accuracy ({r['heldout_accuracy']:.1%}); general-text perplexity "
                            f"changed {r['ppl_change']:+.2%}, the selected run's {best['ppl_change']:+.2%}")
        elif _key(r)[2] > _key(best)[2]:
            why[r["id"]] = (f"tied on accuracy and perplexity change; more trainable parameters "
                            f"({r['trainable_params']:,} vs {best['trainable_params']:,})")
        else:
            why[r["id"]] = "tied with the selected run on every criterion; the run id decides"
    return (best["id"] if best else None), why


def write(out: str | Path, records: list[dict], thresholds: Thresholds | None = None,
          rule: str = "best-pass", meta: dict | None = None) -> dict:
    """results.csv, results.md, the plots and each run's eval_report.*; returns the selection."""
    out = Path(out)
    thresholds = thresholds or Thresholds()
    rows = [row(rec, judge(rec, thresholds)) for rec in records]
    chosen, why = select(rows, rule)
    for r in rows:
        r["selected"], r["why_not"] = r["id"] == chosen, why.get(r["id"], "")
    admitted = RULES[rule]
    order = sorted(rows, key=lambda r: (r["verdict"] not in admitted, _key(r)))
    for rec in records:                                    # per-run reports, judged by these thresholds
        if rec["status"] == "ok":
            before, after, regression = task_results(rec)
            write_report(out / "runs" / rec["id"], before, after, regression, thresholds, {"run": rec["id"]})

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(order)
    write_text(out / "results.csv", buf.getvalue())
    plots = plot_all(out, rows, chosen)
    lowest = min((r for r in rows if r["final_loss"] is not None), key=lambda r: r["final_loss"], default=None)
    selection = {"rule": rule, "selected": chosen, "why_not": why, "thresholds": thresholds.__dict__,
                 "lowest_final_loss": lowest and lowest["id"], "plots": [str(p) for p in plots]}
    write_text(out / "results.md", _markdown(order, selection, admitted, meta or {}))
    write_text(out / "selection.json", json.dumps(selection, indent=1) + "\n")
    return selection


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _markdown(rows: list[dict], sel: dict, admitted: tuple, meta: dict) -> str:
    chosen = sel["selected"]
    lines = [f"# lorakit sweep: {len(rows)} runs, selected: {chosen or 'none'}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += [f"- selection rule `{sel['rule']}`: " + RULE_TEXT.format(admitted=" or ".join(admitted)),
              "- thresholds: " + ", ".join(f"{k} = {v}" for k, v in sel["thresholds"].items()), ""]
    lines += ["| | run | method | r | alpha | targets | lr | trainable | s/step | peak MB planned / measured "
              "| final train loss | held-out loss | held-out accuracy [95% CI] | prose ppl change | prompts kept "
              "| verdict | adapter KB |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = "-" if r["heldout_accuracy"] is None else \
            f"{r['heldout_accuracy']:.1%} [{r['heldout_low']:.1%}, {r['heldout_high']:.1%}]"
        mb = lambda b: _num(None if b is None else b / 2**20, ",.0f")       # noqa: E731
        lines.append(" | ".join([
            "| **selected**" if r["selected"] else "|", r["id"], r["method"], _num(r["r"], "d"), _num(r["alpha"], "g"),
            r["targets"] or "-", _num(r["lr"], "g"), _num(r["trainable_params"], ",d"), _num(r["s_per_step"], ".2f"),
            f"{mb(r['planned_peak_bytes'])} / {mb(r['measured_peak_bytes'])}", _num(r["final_loss"], ".4f"),
            _num(r["eval_loss"], ".4f"), acc,
            _num(r["ppl_change"], "+.2%"), _num(r["prompts_kept"], ".0%"), r["verdict"],
            _num(None if r["adapter_bytes"] is None else r["adapter_bytes"] / 1024, ",.0f")]) + " |")
    lines += ["", "## Why not the others", ""]
    lines += [f"- `{r['id']}`: {r['why_not']}" for r in rows if not r["selected"]] or ["- (no other runs)"]
    if sel["lowest_final_loss"] and sel["lowest_final_loss"] != chosen:
        lines += ["", f"The lowest final training loss is `{sel['lowest_final_loss']}`'s; training loss does not "
                      "measure held-out accuracy or what the adapter cost elsewhere, so it does not select."]
    lines += ["", *[f"![{Path(p).stem}]({Path(p).name})" for p in sel["plots"]], ""]
    return "\n".join(lines)
