"""Score an adapter on held-out rows (adapter off vs on) and check it kept the base's general ability.

Example: `lorakit eval --model smollm2-135m-instruct --data heldout.jsonl --adapter runs/x/adapter
--min-task-gain 0.10`. Writes eval_report.md and eval_report.json into --out (default: the adapter
folder's parent) and prints the markdown (or the JSON with --json). Exit status 1 on a FAIL verdict.
Without --adapter it reports the base model's task score only. `--harness TASK_YAML` (repeatable)
adds lm-eval-harness tasks, scored adapter off vs on, to the report and the verdict.
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import __version__
from ..evaluate.harness import harness_eval, task_names
from ..evaluate.regression import regression_eval
from ..evaluate.report import Thresholds, write_report
from ..evaluate.task import task_eval
from ..inject import disabled
from ..io.peft_format import load_adapter
from ..models import load_base
from ..training.data import read_rows
from .args import add_config_args, config_values


def register(p):
    p.add_argument("--model", required=True, help="the base model: smollm2-135m-instruct, a .gguf, a folder, or tiny-llama")
    p.add_argument("--data", required=True, help="held-out JSONL rows in the training format")
    p.add_argument("--adapter", help="a PEFT-format adapter folder; without it only the base task score is reported")
    p.add_argument("--answer-regex", help="regex that extracts the answer (group 1 if it has groups) from "
                                          "generations and references before exact match")
    p.add_argument("--out", help="report folder (default: the adapter folder's parent, or ./eval)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per task answer (default: 16)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default: 16)")
    p.add_argument("--harness", action="append", metavar="TASK_YAML", default=[],
                   help="an lm-eval-harness task file (local data) scored adapter off vs on; its scores join the "
                        "verdict (repeatable)")
    p.add_argument("--harness-limit", type=int, help="score only the first N items of each harness task")
    add_config_args(p, Thresholds)
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of markdown")


def run(args) -> int:
    thresholds = Thresholds(**config_values(Thresholds, args))      # bad thresholds fail before any loading
    task_names(args.harness)                                         # and bad task files
    rows, _ = read_rows(args.data)
    model, tokenizer = load_base(args.model)
    if tokenizer is None:
        raise ValueError(f"model {args.model!r} has no tokenizer; evaluation needs one")
    task = dict(answer_regex=args.answer_regex, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    meta = {"lorakit": __version__, "model": args.model, "adapter": args.adapter, "data": args.data, "rows": len(rows),
            "answer_regex": args.answer_regex, "max_new_tokens": args.max_new_tokens,
            **({"harness": ", ".join(args.harness)} if args.harness else {})}
    after = regression = None
    if args.adapter:
        load_adapter(model, args.adapter)
        with disabled(model):
            before = task_eval(model, tokenizer, rows, **task)
        after = task_eval(model, tokenizer, rows, **task)
        regression = regression_eval(model, tokenizer)
    else:
        before = task_eval(model, tokenizer, rows, **task)
    harness = (harness_eval(model, tokenizer, args.harness, adapter=bool(args.adapter), limit=args.harness_limit,
                            batch_size=args.batch_size) if args.harness else None)
    out = Path(args.out) if args.out else Path(args.adapter).resolve().parent if args.adapter else Path("eval")
    md_path, json_path = write_report(out, before, after, regression, thresholds, meta, harness)
    print((json_path if args.json else md_path).read_text(), end="")
    decision = json.loads(json_path.read_text())["verdict"]
    return 1 if decision and decision["verdict"] == "FAIL" else 0
