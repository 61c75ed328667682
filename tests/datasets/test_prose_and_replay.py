import lorakit as lk
from lorakit.datasets.replay import REPLAY_PROMPTS, _whole_sentences, replay_rows
from lorakit.evaluate.prose import docstring_prose
from lorakit.evaluate.regression import GENERAL_PROMPTS, general_text
from lorakit.models import tiny_tokenizer


def test_docstring_prose_is_deterministic_prose_disjoint_from_the_regression_set():
    a, b = docstring_prose(40), docstring_prose(40)
    assert a == b and len(a) == 40
    assert all(sum(c.isalpha() or c == " " for c in p) >= 0.7 * len(p) for p in a)
    evaluation = general_text()
    assert not any(p in q or q in p for p in a for q in evaluation)


def test_rehearsal_prompts_are_not_the_regression_prompts():
    assert not set(REPLAY_PROMPTS) & set(GENERAL_PROMPTS) and len(set(REPLAY_PROMPTS)) == len(REPLAY_PROMPTS)


def test_replay_rows_are_the_base_models_own_answers():
    model = lk.tiny_model("llama")
    rows = replay_rows(model, tiny_tokenizer(), n=3, max_new_tokens=6, progress=False)
    for row in rows:
        user, assistant = row["messages"]
        assert user["role"] == "user" and user["content"] in REPLAY_PROMPTS[:3] and assistant["content"]


def test_whole_sentences_drops_a_cut_fragment():
    assert _whole_sentences("Paris is the capital. It is also") == "Paris is the capital."
    assert _whole_sentences("no sentence end") == "no sentence end"
