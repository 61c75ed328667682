import json

import pytest

from lorakit.evaluate import Thresholds, verdict, write_report
from lorakit.evaluate.regression import RegressionResult
from lorakit.evaluate.task import TaskResult, wilson_interval

T = Thresholds(min_task_gain=0.10, max_ppl_increase=0.05, warn_ppl_increase=0.10, min_agreement=0.5)


def task(correct_flags, got=None):
    k, n = sum(correct_flags), len(correct_flags)
    records = [{"prompt": f"ticket {i}", "expected": f"CODE-{i}", "got": (got or "g") + str(i), "correct": c}
               for i, c in enumerate(correct_flags)]
    return TaskResult(k / n, *wilson_interval(k, n), n, k, records)


def regression(ppl_change=0.0, agreement=1.0):
    """Four prompts, a fraction `agreement` of them kept (similarity 0.6 >= similar_at), the rest not (0.2)."""
    kept = round(4 * agreement)
    prompts = [{"prompt": "What is 7 times 8?", "reference": "56", "adapted": "56" if i < kept else "fifty-six",
                "same": False, "similarity": 0.6 if i < kept else 0.2} for i in range(4)]
    return RegressionResult(10.0, 10.0 * (1 + ppl_change), ppl_change, prompts, 0.0, 0.5)


BEFORE = task([False] * 8 + [True] * 2)          # 20%
AFTER = task([True] * 9 + [False])               # 90%


@pytest.mark.parametrize("field, value", [
    ("min_task_gain", 1.5), ("min_task_gain", float("nan")), ("max_ppl_increase", -0.1),
    ("warn_ppl_increase", 0.01), ("min_agreement", 1.2), ("min_agreement", "high"), ("similar_at", 0.0),
])
def test_thresholds_are_validated_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        Thresholds(**{field: value})


@pytest.mark.parametrize("before, after, reg, expected, words", [
    (BEFORE, AFTER, regression(0.01, 1.0), "PASS", []),
    (BEFORE, AFTER, regression(0.05, 1.0), "PASS", []),                           # at max_ppl_increase: fine
    (BEFORE, AFTER, regression(0.07, 1.0), "WARN", ["max_ppl_increase", "+7.0%"]),
    (BEFORE, AFTER, regression(0.10, 1.0), "WARN", ["max_ppl_increase"]),         # at the FAIL line: still WARN
    (BEFORE, AFTER, regression(-0.2, 0.25), "WARN", ["min_agreement", "25%"]),
    (BEFORE, AFTER, regression(0.15, 1.0), "FAIL", ["warn_ppl_increase", "+15.0%"]),
    (BEFORE, AFTER, regression(float("inf"), 1.0), "FAIL", ["not finite"]),
    (AFTER, BEFORE, regression(0.0, 1.0), "FAIL", ["min_task_gain", "-70.0 points"]),
    (BEFORE, task([False] * 7 + [True] * 3), regression(0.0, 1.0), "PASS", []),   # 0.3 - 0.2 is a full 10 points
    (BEFORE, task([False] * 8 + [True] * 2), regression(0.0, 1.0), "FAIL", ["+0.0 points"]),
    (None, BEFORE, regression(0.0, 1.0), "PASS", []),                             # no before: no gain to check
])
def test_verdict_branches(before, after, reg, expected, words):
    v = verdict(before, after, reg, T)
    assert v["verdict"] == expected
    assert v["ppl_change"] == reg.ppl_change and v["agreement"] == sum(p["similarity"] >= 0.5 for p in reg.prompts) / 4
    assert v["task_gain"] == (None if before is None else pytest.approx(after.accuracy - before.accuracy))
    assert bool(v["reasons"]) == (expected != "PASS")
    for w in words:
        assert any(w in r for r in v["reasons"]), (w, v["reasons"])


def test_fail_and_warn_reasons_are_all_listed():
    v = verdict(AFTER, BEFORE, regression(0.2, 0.0), T)
    assert v["verdict"] == "FAIL" and len(v["reasons"]) == 3


def test_write_report(tmp_path):
    after = task([True] * 9 + [False], got="new")
    reg = regression(0.07, 1.0)
    md, js = write_report(tmp_path / "run", BEFORE, after, reg, T, {"model": "tiny-llama", "adapter": "a|b"})
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["eval_report.json", "eval_report.md"]  # no temp files
    data = json.loads(js.read_text())
    assert data["verdict"] == verdict(BEFORE, after, reg, T)
    assert data["task"]["before"]["accuracy"] == 0.2 and data["task"]["after"]["correct"] == 9
    assert data["regression"]["ppl_change"] == 0.07 and data["thresholds"]["min_task_gain"] == 0.10
    assert data["meta"]["model"] == "tiny-llama"
    text = md.read_text()
    assert text.startswith("# lorakit eval: **WARN**") and "max_ppl_increase" in text
    assert "20.0% [5.7%, 51.0%] (2/10)" in text and "90.0% [59.6%, 98.2%] (9/10)" in text   # Wilson 2/10, 9/10
    assert "+70.0 points" in text and "| 10.000 | 10.700 | +7.00% |" in text and "| 100% | identical text 0/4" in text
    assert "a\\|b" in text                                    # pipes are escaped inside tables
    # three examples, the ones the adapter fixed first (rows 0..6 were wrong before, right after)
    assert text.count("- expected:") == 3
    assert "`CODE-0`" in text and "`g0` (wrong)" in text and "`new0` (right)" in text


def test_base_only_report(tmp_path):
    md, js = write_report(tmp_path, BEFORE, None, None, Thresholds(), {})
    assert json.loads(js.read_text())["verdict"] is None
    text = md.read_text()
    assert "base model only" in text and "(2/10)" in text and "## Examples" not in text
    with pytest.raises(ValueError):
        write_report(tmp_path, None, None, None, Thresholds(), {})


def test_harness_drops_warn_then_fail_and_other_metrics_are_not_judged():
    from lorakit.evaluate.harness import HarnessScore
    t = Thresholds(min_task_gain=-1, max_harness_drop=0.02, fail_harness_drop=0.05)
    reg = regression(0.0)
    cases = [([HarnessScore("arc", "acc,none", 0.50, 0.49, True, 100)], "PASS"),          # 1 point: within
             ([HarnessScore("arc", "acc,none", 0.50, 0.47, True, 100)], "WARN"),          # 3 points
             ([HarnessScore("arc", "acc,none", 0.50, 0.40, True, 100)], "FAIL"),          # 10 points
             ([HarnessScore("wiki", "word_perplexity,none", 10.0, 30.0, False, 10)], "PASS"),   # not judged
             ([HarnessScore("arc", "acc,none", 0.50, 0.60, True, 100)], "PASS")]          # a gain
    for harness, want in cases:
        v = verdict(BEFORE, AFTER, reg, t, harness)
        assert v["verdict"] == want, (harness, v)
    v = verdict(BEFORE, AFTER, reg, t, cases[2][0])
    assert v["reasons"] == ["lm-eval arc acc,none changed -10.0 points (50.0% -> 40.0%), a drop above the FAIL line "
                            "fail_harness_drop = 5.0 points"]
    with pytest.raises(ValueError, match="max_harness_drop"):
        Thresholds(max_harness_drop=0.1, fail_harness_drop=0.05)
