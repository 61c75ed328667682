"""lm-eval-harness tasks as part of the regression check: each task scored adapter off vs on.

The tasks are lm-eval task YAML files (local files; a task that fetches its data from a hub fails
on a machine without one, with lm-eval's own message). They run in-process through lm-eval's `hf`
backend (`HFLM`) on the model lorakit already loaded, once inside `disabled(model)` and once with
the adapter on, so the two scores differ by the adapter alone. The same scores come from
`lm_eval --model local-completions` against `lorakit serve` (tests/serve/test_lm_eval.py checks
that per item). Every metric lm-eval reports is kept; the verdict judges the higher-is-better ones
(accuracy, exact match) by how many points they lose, and lists the others unjudged.
What this does not do: choose tasks or thresholds (report.Thresholds), or fetch data.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from ..inject import disabled


@dataclass
class HarnessScore:
    task: str
    metric: str                    # lm-eval's key: "acc,none", "exact_match,none"
    off: float                     # adapter off (the base)
    on: float | None               # adapter on (None: no adapter given)
    higher_is_better: bool | None  # None: lm-eval does not say; the metric is reported, not judged
    n: int                         # items scored

    @property
    def change(self) -> float | None:
        return None if self.on is None else self.on - self.off

    def to_dict(self) -> dict:
        return asdict(self)


class _Loader(yaml.SafeLoader):
    """Reads a task YAML's own keys; lm-eval's tags (!function) are left to lm-eval."""


_Loader.add_multi_constructor("!", lambda loader, suffix, node: None)


def task_names(paths: list[str | Path]) -> tuple[list[str], list[str]]:
    """(task names, folders to include) of lm-eval task YAML files; a file that is not one is named."""
    names, folders = [], []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"--harness {path}: no such task file (a lm-eval task YAML)")
        try:
            spec = yaml.load(path.read_text(), Loader=_Loader)
        except yaml.YAMLError as e:
            raise ValueError(f"--harness {path}: not YAML: {e}") from None
        name = spec.get("task") if isinstance(spec, dict) else None
        if not isinstance(name, str):
            raise ValueError(f"--harness {path}: an lm-eval task file needs a 'task: <name>' key")
        names.append(name)
        if str(path.parent.resolve()) not in folders:
            folders.append(str(path.parent.resolve()))
    return names, folders


def _scores(model, tokenizer, names, folders, limit, batch_size, max_length) -> tuple[dict, dict, dict]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    lm = HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=folders),
                                  limit=limit, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                  fewshot_random_seed=0)
    return out["results"], out.get("higher_is_better", {}), out.get("n-samples", {})


def harness_eval(model, tokenizer, paths: list[str | Path], adapter: bool = True, limit: int | None = None,
                 batch_size: int = 8, max_length: int | None = None) -> list[HarnessScore]:
    """Every metric of every task, adapter off (and on, with `adapter`)."""
    names, folders = task_names(paths)
    max_length = max_length or getattr(model.config, "max_position_embeddings", None) or 2048
    with disabled(model):
        off, better, counts = _scores(model, tokenizer, names, folders, limit, batch_size, max_length)
    on = _scores(model, tokenizer, names, folders, limit, batch_size, max_length)[0] if adapter else None
    scores = []
    for task in names:
        for key, value in off.get(task, {}).items():
            metric = key.split(",")[0]
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue                           # "alias", "sample_len", the standard errors: not scores
            n = counts.get(task, {}).get("effective") or off[task].get("sample_len") or 0
            scores.append(HarnessScore(task, key, float(value), None if on is None else float(on[task][key]),
                                       better.get(task, {}).get(metric), int(n)))
    return scores
