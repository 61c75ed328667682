from lorakit.sweep.report import select


def _row(id, acc, verdict="PASS", ppl=0.01, params=100, reasons=()):
    return {"id": id, "heldout_accuracy": acc, "verdict": verdict, "ppl_change": ppl, "trainable_params": params,
            "reasons": list(reasons)}


def test_best_pass_and_a_reason_for_every_other_run():
    rows = [_row("a", 0.9), _row("b", 1.0, "FAIL", 3.0, reasons=["perplexity rose +300%"]), _row("c", 0.95),
            _row("d", 0.97, "WARN", 0.07, reasons=["perplexity rose +7%"])]
    chosen, why = select(rows)
    assert chosen == "c"
    assert set(why) == {"a", "b", "d"}
    assert "FAIL" in why["b"] and "+300%" in why["b"] and "WARN" in why["d"] and "95.0%" in why["a"]
    assert select(rows, "best-pass-or-warn")[0] == "d"


def test_ties_go_to_smaller_perplexity_change_then_fewer_parameters_then_id():
    chosen, why = select([_row("a", 0.9, ppl=0.02), _row("b", 0.9, ppl=0.01)])
    assert chosen == "b" and "tied on held-out accuracy" in why["a"]
    chosen, why = select([_row("a", 0.9, params=200), _row("b", 0.9, params=100)])
    assert chosen == "b" and "more trainable parameters" in why["a"]
    assert select([_row("b", 0.9), _row("a", 0.9)])[0] == "a"


def test_nothing_selected_when_no_run_passes():
    chosen, why = select([_row("a", 1.0, "FAIL", reasons=["x"]), _row("b", 0.5, "WARN", reasons=["y"])])
    assert chosen is None and set(why) == {"a", "b"}
