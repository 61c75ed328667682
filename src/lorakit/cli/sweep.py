"""Sweep a grid of adapter configurations; select the best held-out score whose verdict is PASS.

Example: `lorakit sweep --model smollm2-135m-instruct --data train.jsonl --eval-data heldout.jsonl
--grid grid.yaml --out runs/sweep`. The grid file (YAML) has `grid:` (axes r, alpha, alpha_ratio, lr,
targets, dropout, method, quantize, num_virtual_tokens, seed: their cross product), and/or `runs:`
(a list of explicit configurations), `fixed:` (any `lorakit train` flag, shared by every run) and
`alpha_policy:`. Each run trains, is scored on --eval-data (adapter off vs on) and checked for
regression (general-prose perplexity, general prompts), and is judged by the --min-task-gain /
--max-ppl-increase / ... thresholds. Writes OUT/results.csv, OUT/results.md, three PNG plots and
OUT/runs/<id>/. Run the same command again to continue a sweep that was stopped: finished runs are
never repeated; with other thresholds or --select it re-judges without training.
"""
from __future__ import annotations

from ..evaluate.report import Thresholds
from ..sweep import POLICIES, RULES, EvalSettings, sweep
from .args import add_config_args, config_values


def register(p):
    p.add_argument("--model", required=True, help="base model: smollm2-135m-instruct, a .gguf, a folder, or tiny-llama")
    p.add_argument("--data", required=True, help="training JSONL (every run trains on it)")
    p.add_argument("--eval-data", required=True, help="held-out JSONL: each run's task score (and held-out loss)")
    p.add_argument("--grid", required=True, help="the grid file (YAML or JSON), see above")
    p.add_argument("--out", default="runs/sweep", help="sweep folder (default: runs/sweep)")
    p.add_argument("--alpha-policy", choices=POLICIES,
                   help="fixed-alpha: alpha as given (scale alpha/r falls with r); fixed-ratio: alpha = alpha_ratio*r "
                        "(default ratio 2); rslora: scale alpha/sqrt(r). Default: the grid file's, else fixed-alpha")
    p.add_argument("--select", default="best-pass", choices=list(RULES),
                   help="best-pass: the best held-out accuracy among PASS runs (default); best-pass-or-warn: "
                        "among PASS and WARN runs")
    p.add_argument("--answer-regex", help="regex that extracts the answer before exact match (see lorakit eval)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per held-out answer (default: 16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_args(p, Thresholds)


def run(args) -> int:
    thresholds = Thresholds(**config_values(Thresholds, args))          # bad thresholds fail before any training
    settings = EvalSettings(max_new_tokens=args.max_new_tokens, answer_regex=args.answer_regex)
    result = sweep(args.grid, model=args.model, data=args.data, eval_data=args.eval_data, out=args.out,
                   alpha_policy=args.alpha_policy, thresholds=thresholds, select=args.select, settings=settings,
                   progress=not args.no_progress)
    ran = sum(r["how"] != "done earlier" for r in result["records"])
    print(f"{len(result['records'])} runs ({ran} trained now, {len(result['records']) - ran} finished earlier); "
          f"results: {args.out}/results.md, results.csv, {', '.join(p.rsplit('/', 1)[-1] for p in result['plots'])}")
    if result["selected"] is None:
        print(f"selected: none (no run meets --select {args.select}; see results.md for why)")
        return 1
    print(f"selected: {result['selected']} ({args.out}/runs/{result['selected']}/adapter)")
    return 0
