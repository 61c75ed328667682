"""`lorakit sweep` on the demo task: r in {4, 16} x targets in {qv, all-linear} on SmolLM2-135M-Instruct.

Writes the demo's data (600 training tickets, 120 held-out tickets, seed 0) and its guards (the
base's own answers to general prompts as rehearsal rows, 100 docstring-prose rows for the KL
penalty), exactly as `lorakit demo` does, then runs

    lorakit sweep --model smollm2-135m-instruct --data OUT/data/train_with_guards.jsonl
                  --eval-data OUT/data/heldout.jsonl --grid bench/sweep_carrier.yaml --out OUT
                  --max-new-tokens 8 --min-task-gain 0.10 --max-ppl-increase 0.05

(the demo's evaluation and thresholds) and copies results.md, results.csv and the plots to
bench/results/sweep_carrier/. About 25 minutes on 2 CPU cores; run again to continue if stopped.

    .venv/bin/python bench/sweep_carrier.py [--out runs/sweep-carrier]
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import torch

from lorakit.cli import main
from lorakit.datasets import carrier
from lorakit.datasets.replay import replay_rows
from lorakit.evaluate.prose import docstring_prose
from lorakit.atomic import write_text
from lorakit.models import EMBEDDED, load_base

HERE = Path(__file__).parent


def guarded_data(out: Path, model_name: str, seed: int = 0) -> dict[str, Path]:
    """The demo's files: tickets, plus rehearsal rows and prose `text` rows, shuffled as the demo does."""
    paths = carrier.write(out / "data", n_train=600, n_heldout=120, seed=seed)
    guarded = paths["train"].parent / "train_with_guards.jsonl"
    if not guarded.is_file():
        torch.manual_seed(seed)
        model, tokenizer = load_base(model_name)
        rehearsal = replay_rows(model, tokenizer) + [{"text": p} for p in docstring_prose(100)]
        rows = paths["train"].read_text().splitlines() + [json.dumps(r) for r in rehearsal]
        random.Random(seed).shuffle(rows)
        write_text(guarded, "\n".join(rows) + "\n")
    return {"train": guarded, "heldout": paths["heldout"]}


def run(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/sweep-carrier")
    p.add_argument("--model", default=EMBEDDED)
    args = p.parse_args(argv)
    out = Path(args.out)
    paths = guarded_data(out, args.model)
    code = main(["sweep", "--model", args.model, "--data", str(paths["train"]), "--eval-data", str(paths["heldout"]),
                 "--grid", str(HERE / "sweep_carrier.yaml"), "--out", str(out), "--max-new-tokens", "8",
                 "--min-task-gain", "0.10", "--max-ppl-increase", "0.05"])
    results = HERE / "results" / "sweep_carrier"
    results.mkdir(parents=True, exist_ok=True)
    for name in ("results.md", "results.csv", "score_vs_params.png", "score_by_rank.png", "loss_curves.png"):
        shutil.copyfile(out / name, results / name)
    return code


if __name__ == "__main__":
    raise SystemExit(run())
