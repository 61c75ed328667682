"""The verdict on an adapter (PASS / WARN / FAIL against thresholds) and the report files.

`verdict` is a pure function of result objects and `Thresholds`; `write_report` renders the same
numbers as `eval_report.md` for people and `eval_report.json` for programs. Neither runs a model.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..atomic import write_text
from .harness import HarnessScore
from .regression import RegressionResult
from .task import TaskResult

MD_NAME, JSON_NAME = "eval_report.md", "eval_report.json"
_EXAMPLES = 3


@dataclass
class Thresholds:
    """What an adapter must achieve on its task, and how much general ability it may cost."""

    min_task_gain: float = field(default=0.0, metadata={
        "help": "FAIL below this task accuracy gain over the base, in accuracy points (0.10 = 10 points)"})
    max_ppl_increase: float = field(default=0.05, metadata={
        "help": "WARN above this relative perplexity increase on general text (0.05 means +5 percent)"})
    warn_ppl_increase: float = field(default=0.10, metadata={
        "help": "FAIL above this relative perplexity increase on general text"})
    min_agreement: float = field(default=0.5, metadata={
        "help": "WARN when fewer general prompts than this fraction keep the base model's answer"})
    similar_at: float = field(default=0.5, metadata={
        "help": "a general-prompt answer is kept when its similarity to the base answer (difflib ratio, "
                "1.0 = identical text) is at least this"})
    max_harness_drop: float = field(default=0.02, metadata={
        "help": "WARN when an lm-eval-harness score (accuracy, exact match) drops more than this with the "
                "adapter on, in points (0.02 = 2 points)"})
    fail_harness_drop: float = field(default=0.05, metadata={
        "help": "FAIL when an lm-eval-harness score drops more than this, in points"})

    def __post_init__(self):
        for name in ("min_task_gain", "max_ppl_increase", "warn_ppl_increase", "min_agreement", "similar_at",
                     "max_harness_drop", "fail_harness_drop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not -1 <= self.min_task_gain <= 1:
            raise ValueError(f"min_task_gain must be in [-1, 1] (accuracy points), got {self.min_task_gain}")
        if self.max_ppl_increase < 0:
            raise ValueError(f"max_ppl_increase must be >= 0, got {self.max_ppl_increase}")
        if self.warn_ppl_increase < self.max_ppl_increase:
            raise ValueError(f"warn_ppl_increase ({self.warn_ppl_increase}) must be >= max_ppl_increase "
                             f"({self.max_ppl_increase}): it is the FAIL line above the WARN line")
        if not 0 <= self.min_agreement <= 1:
            raise ValueError(f"min_agreement must be a fraction in [0, 1], got {self.min_agreement}")
        if not 0 < self.similar_at <= 1:
            raise ValueError(f"similar_at must be in (0, 1], got {self.similar_at}")
        if not 0 <= self.max_harness_drop <= self.fail_harness_drop:
            raise ValueError(f"need 0 <= max_harness_drop ({self.max_harness_drop}) <= fail_harness_drop "
                             f"({self.fail_harness_drop}): the WARN line, then the FAIL line")


def kept(regression: RegressionResult, thresholds: Thresholds) -> float:
    """Fraction of general prompts whose adapted answer stays close to the base answer.

    Greedy answers may change wording without losing anything (\"is made up of 7 days\" for
    \"is approximately 7 days\"); a broken model answers with nothing or with task output.
    """
    if not regression.prompts:
        return 1.0
    return sum(p["similarity"] >= thresholds.similar_at for p in regression.prompts) / len(regression.prompts)


def harness_reasons(harness: list[HarnessScore], t: Thresholds) -> tuple[list[str], list[str]]:
    """(FAIL reasons, WARN reasons) of the higher-is-better harness scores that dropped too far."""
    fails, warns = [], []
    for h in harness:
        if h.change is None or h.higher_is_better is not True:
            continue
        drop = -h.change
        what = f"lm-eval {h.task} {h.metric} changed {100 * h.change:+.1f} points ({h.off:.1%} -> {h.on:.1%})"
        if drop > t.fail_harness_drop + 1e-9:
            fails.append(f"{what}, a drop above the FAIL line fail_harness_drop = {100 * t.fail_harness_drop:.1f} points")
        elif drop > t.max_harness_drop + 1e-9:
            warns.append(f"{what}, a drop above max_harness_drop = {100 * t.max_harness_drop:.1f} points")
    return fails, warns


def verdict(task_before: TaskResult | None, task_after: TaskResult, regression: RegressionResult,
            thresholds: Thresholds, harness: list[HarnessScore] | None = None) -> dict:
    """PASS, WARN or FAIL, and one sentence per threshold that was crossed (with the numbers)."""
    t = thresholds
    gain = None if task_before is None else task_after.accuracy - task_before.accuracy
    ppl = regression.ppl_change
    fails, warns = [], []
    if not math.isfinite(ppl):
        fails.append(f"perplexity on general text is not finite with the adapter on (ppl {regression.ppl_on})")
    elif ppl > t.warn_ppl_increase:
        fails.append(f"perplexity on general text rose {ppl:+.1%}, above the FAIL line warn_ppl_increase "
                     f"= {t.warn_ppl_increase:.1%}")
    elif ppl > t.max_ppl_increase:
        warns.append(f"perplexity on general text rose {ppl:+.1%}, above max_ppl_increase = {t.max_ppl_increase:.1%} "
                     f"(FAIL above {t.warn_ppl_increase:.1%})")
    # accuracies are ratios of counts: 0.3 - 0.2 must count as a full 10-point gain, not 9.999...
    if gain is not None and gain < t.min_task_gain - 1e-9:
        fails.append(f"task accuracy changed {100 * gain:+.1f} points ({task_before.accuracy:.1%} -> "
                     f"{task_after.accuracy:.1%}), below min_task_gain = {100 * t.min_task_gain:+.1f} points")
    agreement = kept(regression, t)
    if agreement < t.min_agreement:
        warns.append(f"only {agreement:.0%} of general prompts kept the base model's answer (similarity >= "
                     f"{t.similar_at:.2f}), below min_agreement = {t.min_agreement:.0%}")
    harness_fails, harness_warns = harness_reasons(harness or [], t)
    fails, warns = fails + harness_fails, warns + harness_warns
    return {"verdict": "FAIL" if fails else "WARN" if warns else "PASS", "task_gain": gain, "ppl_change": ppl,
            "agreement": agreement, "reasons": fails + warns}


# ---------------------------------------------------------------------------------------------
# rendering
def _cell(text, limit: int = 120) -> str:
    """Markdown-table-safe text: one line, no bare pipes, at most `limit` characters."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def _score(r: TaskResult | None) -> str:
    if r is None:
        return "-"
    return f"{r.accuracy:.1%} [{r.low:.1%}, {r.high:.1%}] ({r.correct}/{r.n})"


def _examples(before: TaskResult, after: TaskResult, k: int = _EXAMPLES) -> list[int]:
    """Up to k row indices, most telling first: answers the adapter fixed, then broke, then the rest."""
    pairs = list(enumerate(zip(before.records, after.records)))
    fixed = [i for i, (b, a) in pairs if a["correct"] and not b["correct"]]
    broke = [i for i, (b, a) in pairs if b["correct"] and not a["correct"]]
    rest = [i for i, _ in pairs if i not in fixed and i not in broke]
    return (fixed + broke + rest)[:k]


def render_markdown(before: TaskResult | None, after: TaskResult | None, regression: RegressionResult | None,
                    decision: dict | None, thresholds: Thresholds, meta: dict) -> str:
    lines = []
    if decision is None:
        base = before or after
        lines += ["# lorakit eval: base model only", "",
                  f"Task accuracy {_score(base)}; no adapter given, so no regression check and no verdict.", ""]
    else:
        lines += [f"# lorakit eval: **{decision['verdict']}**", ""]
        lines += [f"- {r}" for r in decision["reasons"]] or ["- every threshold met"]
        lines.append("")
    if meta:
        lines += ["| | |", "|---|---|", *[f"| {_cell(k)} | {_cell(v)} |" for k, v in meta.items()], ""]

    lines += ["## Task accuracy (exact match, 95% Wilson interval)", "",
              "| adapter off (base) | adapter on | change |", "|---|---|---|"]
    change = "-" if before is None or after is None else f"{100 * (after.accuracy - before.accuracy):+.1f} points"
    lines += [f"| {_score(before)} | {_score(after)} | {change} |", ""]

    if regression is not None:
        r = regression
        same = sum(p["same"] for p in r.prompts)
        lines += ["## General ability", "",
                  "| | adapter off | adapter on | change |", "|---|---|---|---|",
                  f"| perplexity on general text | {r.ppl_off:.3f} | {r.ppl_on:.3f} | {r.ppl_change:+.2%} |",
                  f"| general prompts kept (similarity >= {thresholds.similar_at:.2f}) | | "
                  f"{kept(r, thresholds):.0%} | identical text {same}/{len(r.prompts)}, "
                  f"mean similarity {r.mean_similarity:.2f} |", ""]
        if r.prompts:
            lines += ["| prompt | base answer | adapted answer | same |", "|---|---|---|---|"]
            lines += [f"| {_cell(p['prompt'], 60)} | {_cell(p['reference'], 80)} | {_cell(p['adapted'], 80)} | "
                      f"{'yes' if p['same'] else 'no'} |" for p in r.prompts]
            lines.append("")

    if before is not None and after is not None:
        lines += ["## Examples", ""]
        for n, i in enumerate(_examples(before, after), start=1):
            b, a = before.records[i], after.records[i]
            mark = {True: "right", False: "wrong"}
            lines += [f"**{n}.** {_cell(a['prompt'], 400)}", "",
                      f"- expected: `{_cell(a['expected'], 80)}`",
                      f"- before: `{_cell(b['got'], 80)}` ({mark[b['correct']]})",
                      f"- after: `{_cell(a['got'], 80)}` ({mark[a['correct']]})", ""]
    lines += ["Thresholds: " + ", ".join(f"{k} = {v}" for k, v in asdict(thresholds).items())]
    return "\n".join(lines) + "\n"


def harness_lines(harness: list[HarnessScore]) -> list[str]:
    """The lm-eval-harness section of the markdown report."""
    if not harness:
        return []
    lines = ["## lm-eval-harness", "", "| task | metric | adapter off | adapter on | change | judged |",
             "|---|---|---|---|---|---|"]
    for h in harness:
        on = "-" if h.on is None else f"{h.on:.4g}"
        change = "-" if h.change is None else f"{h.change:+.4g}"
        judged = "yes" if h.higher_is_better is True else "no (not higher-is-better)"
        lines.append(f"| {_cell(h.task)} | {_cell(h.metric)} | {h.off:.4g} | {on} | {change} | {judged} |")
    return lines + [f"Items per task: {', '.join(sorted({f'{h.task} {h.n}' for h in harness}))}.", ""]


def report_dict(before, after, regression, decision, thresholds, meta, harness=None) -> dict:
    return {"verdict": decision, "thresholds": asdict(thresholds), "meta": meta,
            "task": {"before": before.to_dict() if before else None, "after": after.to_dict() if after else None},
            "regression": regression.to_dict() if regression else None,
            "harness": [h.to_dict() for h in harness] if harness else None}


def write_report(out_dir, before: TaskResult | None, after: TaskResult | None, regression: RegressionResult | None,
                 thresholds: Thresholds, meta: dict, harness: list[HarnessScore] | None = None) -> tuple[Path, Path]:
    """Write eval_report.md and eval_report.json into `out_dir` (each atomically); return their paths.

    `before`/`after`: task results with the adapter off/on. With no adapter pass only `before`
    (and no regression): the report then shows the base score and gives no verdict.
    """
    if before is None and after is None:
        raise ValueError("write_report needs at least one task result")
    decision = (verdict(before, after, regression, thresholds, harness)
                if after is not None and regression is not None else None)
    out_dir = Path(out_dir)
    md_path, json_path = out_dir / MD_NAME, out_dir / JSON_NAME
    markdown = render_markdown(before, after, regression, decision, thresholds, meta)
    if harness:                                    # before the thresholds line, which ends the report
        body, last = markdown.rstrip("\n").rsplit("\n", 1)
        markdown = body + "\n" + "\n".join(harness_lines(harness)) + "\n" + last + "\n"
    write_text(md_path, markdown)
    write_text(json_path, json.dumps(report_dict(before, after, regression, decision, thresholds, meta, harness),
                                     indent=2) + "\n")
    return md_path, json_path
