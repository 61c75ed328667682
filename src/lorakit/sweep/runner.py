"""Run a sweep's configurations through the trainer and the evaluator, resumably, one record per run.

Layout of a sweep folder:
  runs/<id>/                 one `lorakit train` run folder each (adapter/, checkpoints/, metrics.jsonl,
                             summary.json, loss.png) plus record.json (and the report's eval_report.*)
  baselines/<key>.json       the base's held-out score and its answers to the general prompts, computed
                             once per base setting (dtype, quantization) and shared by every run on it

A run's id is stable: readable settings plus a hash of its configuration, the model, the contents of
both data files and the evaluation settings (`grid.run_id`). `record.json` is written atomically and
last, so a run that has one is finished and is never repeated; a run without one is restarted, or
resumed from its last complete checkpoint (`fixed: {save_every: N}` makes those). A run whose loss
turns non-finite is finished too: its record says so, and it is never selected.

The records hold raw numbers, not verdicts: thresholds and the selection rule are applied when the
report is written (`report.py`), so a sweep can be re-judged without training again. This module
knows nothing about plots or tables.
"""
from __future__ import annotations

import gc
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..evaluate.regression import GENERAL_PROMPTS, general_text, regression_eval
from ..evaluate.report import Thresholds
from ..evaluate.task import TaskResult, task_eval
from ..inject import disabled, trainable_report
from ..atomic import write_text
from ..models import load_base, resolve_device
from ..training import checkpoint
from ..training.data import read_rows
from ..training.rows import files_of
from ..training.memory import PeakMemory, trim_heap
from ..training.run import split_kwargs, train_model
from ..training.trainer import NonFiniteLoss
from . import grid, report
from .grid import run_id

RECORD = "record.json"


@dataclass
class EvalSettings:
    """How every run is scored (the same for all runs of a sweep, so their numbers compare)."""

    max_new_tokens: int = 16               # tokens generated per held-out answer
    answer_regex: str | None = None        # extracts the answer before exact match (see lorakit eval)
    batch_size: int = 16                   # prompts per generation batch
    texts: list[str] | None = None         # regression prose (default: the Python language reference)
    prompts: list[str] | None = None       # general prompts (default: evaluate.regression.GENERAL_PROMPTS)
    regression_tokens: int = 32            # tokens generated per general prompt

    def resolved(self) -> "EvalSettings":
        return EvalSettings(self.max_new_tokens, self.answer_regex, self.batch_size,
                            general_text() if self.texts is None else list(self.texts),
                            GENERAL_PROMPTS if self.prompts is None else list(self.prompts), self.regression_tokens)


@dataclass
class Sweep:
    """One sweep's fixed inputs: what every run trains on and is scored against."""

    model: str
    data: str
    eval_data: str
    out: str
    settings: EvalSettings = field(default_factory=EvalSettings)
    progress: bool = True

    def __post_init__(self):
        self.settings = self.settings.resolved()
        self.heldout, _ = read_rows(self.eval_data)
        s = self.settings
        self.context = {"model": self.model, "data": _digest(_data_bytes(self.data)),
                        "eval_data": _digest(_data_bytes(self.eval_data)),
                        "eval": {"max_new_tokens": s.max_new_tokens, "answer_regex": s.answer_regex,
                                 "regression_tokens": s.regression_tokens,
                                 "texts": _digest(json.dumps(s.texts).encode()),
                                 "prompts": _digest(json.dumps(s.prompts).encode())}}

    def run_dir(self, config: dict) -> Path:
        return Path(self.out) / "runs" / run_id(config, self.context)


def _data_bytes(spec: str) -> bytes:
    """What a --data value names, as bytes to hash: its files (or save_to_disk folders' files), in order."""
    if Path(spec).is_file():
        return Path(spec).read_bytes()              # one file: its bytes (run ids of earlier sweeps stand)
    out = []
    for path in files_of(spec):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        out += [str(f.relative_to(path) if path.is_dir() else f.name).encode() + f.read_bytes() for f in files]
    return b"\0".join(out)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def run_sweep(sweep: Sweep, configs: list[dict], load=load_base) -> list[dict]:
    """Train and score every configuration that has no record yet; return all records, in grid order.

    Each record gains "how": "done earlier" (skipped), "trained" or "resumed" (from a checkpoint).
    `load(name, dtype=...)` gives a fresh (model, tokenizer) per run: training changes the model.
    """
    records = []
    bar = tqdm(configs, desc="sweep", unit="run", disable=not sweep.progress, dynamic_ncols=True)
    for config in bar:
        folder = sweep.run_dir(config)
        bar.set_postfix_str(folder.name)
        if (folder / RECORD).is_file():
            record, how = json.loads((folder / RECORD).read_text()), "done earlier"
        else:
            record, how = _run_one(sweep, config, folder, load)
        records.append(dict(record, how=how))
    bar.close()
    return records


def _run_one(sweep: Sweep, config: dict, folder: Path, load) -> tuple[dict, str]:
    last = checkpoint.latest(folder) if (folder / "checkpoints").is_dir() else None
    start_step = json.loads((last / checkpoint.STATE_JSON).read_text())["step"] if last else 0
    cfg, method_cfg = split_kwargs({"progress": sweep.progress, **config, "model": sweep.model, "data": sweep.data,
                                    "eval_data": sweep.eval_data, "out": str(folder),
                                    "resume": str(last) if last else None})
    gc.collect()
    trim_heap()                               # what earlier runs freed leaves RSS before this one's baseline
    device = resolve_device(cfg.device)
    memory = PeakMemory(device).start()
    model, tokenizer = load(cfg.model, dtype=cfg.dtype)
    model.to(device)
    record = {"id": folder.name, "config": config, "status": "ok", "error": None}
    try:
        summary = train_model(model, tokenizer, cfg, method_cfg, memory)
    except NonFiniteLoss as e:               # a result, not a crash: this setting diverges
        report = trainable_report(model)
        record.update(status="diverged", error=str(e), trainable_params=report.trainable,
                      total_params=report.total)
    else:
        trained = summary["steps"] - start_step
        record.update(
            trainable_params=summary["trainable_params"], total_params=summary["total_params"],
            planned_peak_bytes=summary["planned_memory"].get("total_bytes"),
            measured_peak_bytes=summary["peak_memory"]["peak_above_baseline_bytes"],
            peak_kind=summary["peak_memory"]["kind"], steps=summary["steps"], resumed_at_step=start_step,
            train_seconds=summary["seconds"], s_per_step=_step_seconds(folder, start_step, summary["seconds"], trained),
            final_loss=summary["final_loss"], eval_loss=summary["eval_loss"],
            adapter_bytes=sum(f.stat().st_size for f in Path(summary["weights"]).iterdir() if f.is_file()))
        record.update(_evaluate(sweep, model, tokenizer, cfg))
    write_text(folder / RECORD, json.dumps(record, indent=1) + "\n")      # the commit point of a run
    del model
    gc.collect()
    return record, "resumed" if last else "trained"


def _step_seconds(folder: Path, start_step: int, seconds: float, trained: int) -> float | None:
    """Seconds per optimizer step of this session's training loop.

    The trainer logs cumulative tokens/s at every step, so sum(tokens) / (tokens/s at the last step)
    is the loop's own time, without the final held-out loss and checkpoint write that `seconds`
    includes; when not every step was logged, `seconds` is what there is.
    """
    if not trained:
        return None
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["step"] > start_step]
    if len(rows) != trained or not rows[-1].get("tokens_per_s"):
        return seconds / trained
    return sum(r["tokens"] for r in rows) / rows[-1]["tokens_per_s"] / trained


def _evaluate(sweep: Sweep, model, tokenizer, cfg) -> dict:
    s, start = sweep.settings, time.perf_counter()
    task = dict(answer_regex=s.answer_regex, max_new_tokens=s.max_new_tokens, batch_size=s.batch_size,
                progress=sweep.progress)
    after = task_eval(model, tokenizer, sweep.heldout, **task)
    key = _digest(json.dumps({"context": sweep.context, "dtype": cfg.dtype, "quantize": cfg.quantize},
                             sort_keys=True).encode())
    path = Path(sweep.out) / "baselines" / f"{key}.json"
    if path.is_file():
        base = json.loads(path.read_text())
        before = TaskResult(**base["task"])
        regression = regression_eval(model, tokenizer, s.texts, s.prompts, references=base["references"],
                                     max_new_tokens=s.regression_tokens, progress=sweep.progress)
    else:                                     # the first run on this base: score the base, adapter off
        with disabled(model):
            before = task_eval(model, tokenizer, sweep.heldout, **task)
        regression = regression_eval(model, tokenizer, s.texts, s.prompts, max_new_tokens=s.regression_tokens,
                                     progress=sweep.progress)
        write_text(path, json.dumps({"model": cfg.model, "dtype": cfg.dtype, "quantize": cfg.quantize,
                                     "task": before.to_dict(),
                                     "references": [p["reference"] for p in regression.prompts]}) + "\n")
    return {"task": after.to_dict(), "base_task": before.to_dict(), "regression": regression.to_dict(),
            "eval_seconds": time.perf_counter() - start}


def sweep(grid_spec, *, model: str, data: str, eval_data: str, out: str, alpha_policy: str | None = None,
          thresholds: Thresholds | None = None, select: str = "best-pass", settings: EvalSettings | None = None,
          progress: bool = True, load=load_base) -> dict:
    """The whole sweep: a grid file (or its dict) -> runs -> results.csv, results.md, plots, selection.

    Everything is validated (grid, rule, data files) before the first run trains. Returns the
    selection (`report.write`) with the records under "records".
    """
    spec = grid.load(grid_spec) if isinstance(grid_spec, (str, Path)) else grid_spec
    configs = grid.expand(spec, alpha_policy)
    if select not in report.RULES:
        raise ValueError(f"select: {select!r} is not one of {', '.join(report.RULES)}")
    thresholds = thresholds or Thresholds()
    s = Sweep(model, data, eval_data, out, settings or EvalSettings(), progress)
    write_text(Path(out) / "sweep.json", json.dumps(
        {"model": model, "data": data, "eval_data": eval_data, "grid": spec, "alpha_policy": alpha_policy,
         "runs": [{"id": s.run_dir(c).name, "config": c} for c in configs], "context": s.context},
        indent=1, default=str) + "\n")
    records = run_sweep(s, configs, load)
    meta = {"model": model, "data": data, "eval_data": eval_data, "held-out rows": len(s.heldout)}
    return dict(report.write(out, records, thresholds, select, meta), records=records)
