import json
import re

import pytest
import torch

from lorakit.evaluate import TaskResult, generate, normalize, task_eval, wilson_interval
from lorakit.evaluate.task import is_correct
from lorakit.models import tiny_model, tiny_tokenizer

PROMPTS = ["Q: 2+2?\nA:", "Hello", "The routing code for a damaged parcel is", "x"]


def greedy_by_hand(model, tokenizer, prompt, max_new_tokens):
    """The oracle: one unpadded prompt, argmax of the last position, stop at the model's EOS or the
    tokenizer's end-of-turn."""
    stops = {model.generation_config.eos_token_id, tokenizer.eos_token_id}
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt in stops:
                break
            new.append(nxt)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama"), tiny_tokenizer()


@pytest.mark.parametrize("text, expected", [
    ("  cLm-t2-kx.  ", "CLM-T2-KX"),
    ('"RET-STD"', "RET-STD"),
    ("\n\n  **CLM-STD**\nBecause the item is damaged.", "CLM-STD"),
    ("\u201cret-std\u201d", "RET-STD"),
    ("hello   \t world!", "HELLO WORLD"),
    ("...\n  paris  ", "PARIS"),
    ("", ""),
])
def test_normalize(text, expected):
    assert normalize(text) == expected


def test_wilson_interval_known_values():
    # k=0, n=10: low = 0, high = (z^2/n) / (1 + z^2/n) = 0.38416 / 1.38416
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.277540, abs=1e-6)
    # k=45, n=50 (p=0.9): center 0.938416/1.076832 = 0.871461, half 1.96*sqrt(0.00218416)/1.076832 = 0.085065
    assert wilson_interval(45, 50) == pytest.approx((0.786396, 0.956526), abs=2e-6)
    assert wilson_interval(10, 10) == pytest.approx((1 - 0.277540, 1.0), abs=1e-6)   # mirror of 0/10
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_answer_regex():
    codes = re.compile(r"(CLM-[A-Z0-9-]+|RET-STD)")
    assert is_correct("The code is CLM-T2-KX.", "CLM-T2-KX", codes)
    assert not is_correct("The code is CLM-STD.", "CLM-T2-KX", codes)
    assert not is_correct("I am not sure.", "CLM-T2-KX", codes)           # no match in the generation: wrong
    assert is_correct("7 times 8 is 56", "56", re.compile(r"\d+$"))         # no groups: the whole match
    # the pattern misses the reference, so the reference is used whole (normalized)
    assert is_correct("code: abc", "ABC", re.compile(r"code: (\w+)"))
    assert is_correct("  clm-std.\nsecond line", "CLM-STD")                 # no regex: normalized exact match
    assert not is_correct("CLM-STD please", "CLM-STD")


def test_generate_matches_a_hand_written_greedy_loop(tiny):
    model, tokenizer = tiny
    side = tokenizer.padding_side
    model.train()
    # batch_size 3 over prompts of different lengths: left padding must not change any answer
    got = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=3, progress=False)
    assert got == [greedy_by_hand(model.eval(), tokenizer, p, 6) for p in PROMPTS]
    assert tokenizer.padding_side == side
    assert generate(model, tokenizer, PROMPTS[:1], max_new_tokens=6, progress=False) == got[:1]


def test_task_eval_scores_against_known_answers(tiny):
    model, tokenizer = tiny
    ticket = "Order #1: the lamp arrived broken. What now?"
    rows = [{"prompt": PROMPTS[0], "completion": "placeholder"},
            {"messages": [{"role": "system", "content": "Reply with a code."}, {"role": "user", "content": ticket},
                          {"role": "assistant", "content": "placeholder"}]},
            {"prompt": PROMPTS[1], "completion": "NOT-THIS"},
            {"prompt": PROMPTS[2], "completion": "NOT-THIS-EITHER"}]
    # make the first two expected answers exactly what the model says (found by the oracle loop)
    chat = tokenizer.apply_chat_template(rows[1]["messages"][:2], add_generation_prompt=True, tokenize=False)
    rows[0]["completion"] = greedy_by_hand(model, tokenizer, PROMPTS[0], 5) + "."   # edge punctuation is ignored
    rows[1]["messages"][2]["content"] = greedy_by_hand(model, tokenizer, chat, 5)

    result = task_eval(model, tokenizer, rows, max_new_tokens=5, batch_size=2, progress=False)
    assert (result.correct, result.n, result.accuracy) == (2, 4, 0.5)
    assert (result.low, result.high) == wilson_interval(2, 4)
    assert [r["correct"] for r in result.records] == [True, True, False, False]
    assert result.records[1]["prompt"] == ticket and result.records[2]["expected"] == "NOT-THIS"
    assert json.loads(json.dumps(result.to_dict()))["records"][3]["got"] == result.records[3]["got"]
    with pytest.raises(ValueError):
        task_eval(model, tokenizer, [], progress=False)


def test_task_result_to_dict():
    r = TaskResult(0.5, 0.1, 0.9, 2, 1, [{"prompt": "p", "expected": "A", "got": "A", "correct": True}])
    assert r.to_dict() == {"accuracy": 0.5, "low": 0.1, "high": 0.9, "n": 2, "correct": 1, "records": r.records}
