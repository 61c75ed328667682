import math

import pytest
import torch

import lorakit as lk
from lorakit.evaluate import GENERAL_PROMPTS, general_text, perplexity, regression_eval, render_chat
from lorakit.evaluate.regression import compare_answers
from lorakit.models import tiny_model, tiny_tokenizer

PROMPTS = GENERAL_PROMPTS[:3]


def letters_ratio(text):
    return sum(c.isalpha() or c.isspace() for c in text) / len(text)


def test_general_text_is_deterministic_prose():
    texts = general_text()
    assert texts == general_text() and len(texts) == 24 and len(set(texts)) == 24
    for t in texts:
        assert 200 <= len(t) <= 1200, t
        assert letters_ratio(t) > 0.75, t
        assert t.endswith((".", "!", "?")) and ">>>" not in t and "::=" not in t
        assert "Kestrel" not in t and "CLM-" not in t and "RET-STD" not in t   # nothing of the carrier task
    short = general_text(n_passages=5, chars=200)
    assert len(short) == 5 and all(len(t) <= 400 for t in short)


def per_text_perplexity(model, tokenizer, texts, max_len):
    """The oracle: one text at a time, transformers' own mean loss, weighted by predicted tokens."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tokenizer(t)["input_ids"][:max_len]])
            n = ids.shape[1] - 1
            nll += model(input_ids=ids, labels=ids).loss.item() * n
            count += n
    return math.exp(nll / count)


def test_perplexity_matches_a_per_text_loop():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    texts = ["The cat sat on the mat.", "A much longer sentence about rivers, hills and the sea " * 3, "Hi there!"]
    got = perplexity(model, tokenizer, texts, max_len=40, batch_size=2, progress=False)
    assert got == pytest.approx(per_text_perplexity(model, tokenizer, texts, 40), rel=1e-4)
    with pytest.raises(ValueError):
        perplexity(model, tokenizer, ["a"], progress=False)   # one token predicts nothing


def test_render_chat_is_one_user_turn():
    assert render_chat(tiny_tokenizer(), "Hi?") == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"


def test_compare_answers():
    rows = compare_answers(["p", "q"], ["abc", " same "], ["abd", "same"])
    assert [r["same"] for r in rows] == [False, True]
    assert rows[0]["similarity"] == pytest.approx(2 * 2 / 6)   # 2 matching chars of 3 + 3
    assert rows[1]["similarity"] == 1.0


@pytest.fixture
def adapted():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    lk.inject(model, lk.LoraConfig(r=4, targets="all-linear"))
    return model, tokenizer


def test_an_adapter_at_init_changes_nothing(adapted):
    model, tokenizer = adapted
    r = regression_eval(model, tokenizer, texts=general_text(4, 200), prompts=PROMPTS, max_new_tokens=6,
                        progress=False)
    assert r.ppl_change == 0.0 and r.ppl_off == r.ppl_on
    assert r.agreement == 1.0 and r.mean_similarity == 1.0 and all(p["same"] for p in r.prompts)
    assert [p["prompt"] for p in r.prompts] == PROMPTS


def test_a_random_adapter_moves_perplexity_and_off_is_the_base(adapted):
    model, tokenizer = adapted
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.copy_(torch.randn(p.shape, generator=g))
    texts = general_text(4, 200)
    r = regression_eval(model, tokenizer, texts=texts, prompts=PROMPTS, references=["a", "b", "c"],
                        max_new_tokens=6, progress=False)
    base = perplexity(tiny_model("llama"), tokenizer, texts, progress=False)
    assert r.ppl_off == pytest.approx(base, rel=1e-5)
    assert r.ppl_on == pytest.approx(perplexity(model, tokenizer, texts, progress=False), rel=1e-6)
    assert r.ppl_change != 0 and r.ppl_change == pytest.approx((r.ppl_on - r.ppl_off) / r.ppl_off)
    assert [p["reference"] for p in r.prompts] == ["a", "b", "c"]               # given references are used
    assert r.agreement == sum(p["same"] for p in r.prompts) / 3
    assert r.to_dict()["prompts"] == r.prompts
    with pytest.raises(ValueError, match="references"):
        regression_eval(model, tokenizer, texts=texts, prompts=PROMPTS, references=["a"], progress=False)
