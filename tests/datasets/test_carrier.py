"""The carrier-policy data set: deterministic, correctly labelled, balanced, held-out phrasing unseen."""
import json
import random
import re
import string
from collections import Counter

import pytest

from lorakit.datasets import (
    CODE_DAMAGED, CODE_RETURN, CODE_TIER2, POLICY_CARRIER, SYSTEM_PROMPT, generate, pools, route, write,
)
from lorakit.datasets import carrier

CODES = {CODE_TIER2, CODE_DAMAGED, CODE_RETURN}
TARGETS = {CODE_TIER2: 0.4, CODE_DAMAGED: 0.3, CODE_RETURN: 0.3}


@pytest.fixture(scope="module")
def data():
    return generate(seed=0)


def _tickets(rows):
    return [r["messages"][1]["content"] for r in rows]


def _mentions(text, phrase):
    # Word boundaries, so a held-out name like "Bell" is not found inside "Isabel".
    return re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text) is not None


def _template_phrases(template):
    """The fixed text of a template, in pieces of three words or more: what makes its phrasing recognisable."""
    pieces = (literal.strip() for literal, *_ in string.Formatter().parse(template))
    return [p for p in pieces if len(p.split()) >= 3]


def test_constants():
    assert (CODE_TIER2, CODE_DAMAGED, CODE_RETURN) == ("CLM-T2-KX", "CLM-STD", "RET-STD")
    assert POLICY_CARRIER == "Kestrel Express"


def test_system_prompt_states_only_the_standard_flow():
    assert "kestrel" not in SYSTEM_PROMPT.lower()
    assert CODE_TIER2 not in SYSTEM_PROMPT
    assert CODE_DAMAGED in SYSTEM_PROMPT and CODE_RETURN in SYSTEM_PROMPT
    assert len(SYSTEM_PROMPT.split()) <= 40


def test_same_seed_same_rows_whatever_the_global_random_state():
    random.seed(1)
    a = generate(seed=7)
    random.seed(2)
    assert generate(seed=7) == a


def test_different_seeds_differ(data):
    other = generate(seed=1)
    assert other[0] != data[0] and other[1] != data[1]


@pytest.mark.parametrize("n_train,n_heldout", [(600, 120), (50, 30), (0, 0), (1, 7)])
def test_sizes(n_train, n_heldout):
    train, heldout = generate(n_train, n_heldout)
    assert (len(train), len(heldout)) == (n_train, n_heldout)


@pytest.mark.parametrize("bad", [-1, 2.5, "10"])
def test_bad_sizes_are_rejected(bad):
    with pytest.raises(ValueError, match="n_train"):
        generate(n_train=bad)


def test_row_shape(data):
    for split, rows in zip(("train", "heldout"), data):
        for row in rows:
            assert set(row) == {"messages", "meta"}
            assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
            assert row["messages"][0]["content"] == SYSTEM_PROMPT
            assert row["messages"][2]["content"] in CODES
            assert set(row["meta"]) == {"carrier", "damaged", "product", "customer", "split"}
            assert isinstance(row["meta"]["damaged"], bool)
            assert row["meta"]["split"] == split


@pytest.mark.parametrize("carrier_name,damaged,code", [
    (POLICY_CARRIER, True, CODE_TIER2),
    (POLICY_CARRIER, False, CODE_RETURN),
    ("BluePost", True, CODE_DAMAGED),
    ("BluePost", False, CODE_RETURN),
])
def test_route(carrier_name, damaged, code):
    assert route(carrier_name, damaged) == code


def test_every_label_matches_its_meta_and_ticket(data):
    for row in data[0] + data[1]:
        meta, ticket, code = row["meta"], row["messages"][1]["content"], row["messages"][2]["content"]
        expected = CODE_RETURN if not meta["damaged"] else (
            CODE_TIER2 if meta["carrier"] == "Kestrel Express" else CODE_DAMAGED)
        assert code == expected
        # The ticket itself carries what the label depends on.
        for field in ("carrier", "product", "customer"):
            assert meta[field] in ticket
        issues = carrier.DAMAGES if meta["damaged"] else carrier.REASONS
        assert sum(issue in ticket for issue in issues) == 1
        assert re.search(r"\d{5}", ticket)


def test_tickets_are_short(data):
    for ticket in _tickets(data[0] + data[1]):
        assert 20 <= len(ticket.split()) <= 45, ticket


def test_pools_split_every_pool_without_overlap():
    train, heldout = pools("train"), pools("heldout")
    for full, a, b in zip((carrier.PRODUCTS, carrier.CUSTOMERS, carrier.TEMPLATES, carrier.DAMAGES,
                           carrier.REASONS), train, heldout):
        assert len(set(full)) == len(full)
        assert set(a) | set(b) == set(full) and not set(a) & set(b)
        assert b, "every pool holds something out"
    with pytest.raises(ValueError, match="split"):
        pools("test")


def test_heldout_strings_never_appear_in_training(data):
    train, heldout = data
    held = pools("heldout")
    assert {r["meta"]["product"] for r in heldout} <= set(held.products)
    assert {r["meta"]["customer"] for r in heldout} <= set(held.customers)
    assert not {r["meta"]["product"] for r in train} & set(held.products)
    assert not {r["meta"]["customer"] for r in train} & set(held.customers)

    names = [part for name in held.customers for part in (name, *name.split())]
    phrases = [*held.products, *names, *held.damages, *held.reasons,
               *(p for t in held.templates for p in _template_phrases(t))]
    assert all(_template_phrases(t) for t in held.templates)
    for ticket in _tickets(train):
        leaked = [p for p in phrases if _mentions(ticket, p)]
        assert not leaked, (ticket, leaked)


def test_heldout_uses_heldout_phrasing(data):
    held = pools("heldout")
    for ticket in _tickets(data[1]):
        assert any(all(p in ticket for p in _template_phrases(t)) for t in held.templates), ticket
        assert any(issue in ticket for issue in held.damages + held.reasons), ticket


@pytest.mark.parametrize("sizes", [(600, 120), (50, 30)])
def test_class_balance(sizes):
    for rows in generate(*sizes):
        counts = Counter(r["messages"][2]["content"] for r in rows)
        for code, target in TARGETS.items():
            assert abs(counts[code] / len(rows) - target) <= 0.10, (code, counts)


def test_undamaged_kestrel_returns_keep_the_standard_flow(data):
    for rows in data:
        kx_returns = [r for r in rows if r["meta"]["carrier"] == POLICY_CARRIER and not r["meta"]["damaged"]]
        assert kx_returns and all(r["messages"][2]["content"] == CODE_RETURN for r in kx_returns)


def test_carriers_appear_in_both_splits(data):
    train, heldout = ({r["meta"]["carrier"] for r in rows} for rows in data)
    assert POLICY_CARRIER in train and POLICY_CARRIER in heldout
    assert len(train) >= 4 and len(heldout) >= 4


def test_write_round_trips_and_leaves_no_temp_files(tmp_path, data):
    out = tmp_path / "nested" / "carrier"
    paths = write(out, seed=0)
    assert paths == {"train": out / "train.jsonl", "heldout": out / "heldout.jsonl"}
    assert sorted(p.name for p in out.iterdir()) == ["heldout.jsonl", "train.jsonl"]
    for split, rows in zip(("train", "heldout"), data):
        lines = paths[split].read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == rows
    # Rewriting over existing files replaces them, still without leftovers.
    write(out, n_train=3, n_heldout=2, seed=5)
    assert sorted(p.name for p in out.iterdir()) == ["heldout.jsonl", "train.jsonl"]
    assert len(paths["train"].read_text(encoding="utf-8").splitlines()) == 3
