"""Sampling filters against a hand-computed case; incremental text with stop strings and split characters."""
import pytest
import torch

from lorakit.models import tiny_tokenizer
from lorakit.serve.sampling import BadParam, SamplingParams, filter_logits, sample
from lorakit.serve.text import TextStream


def test_top_k_and_top_p_keep_the_right_tokens():
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    logits = probs.log()
    kept = lambda lp: (lp > float("-inf")).nonzero().flatten().tolist()       # noqa: E731
    assert kept(filter_logits(logits, 1.0, 0, 0.7)) == [0, 1]                 # 0.5 < 0.7 <= 0.5 + 0.2
    assert kept(filter_logits(logits, 1.0, 0, 0.71)) == [0, 1, 2]
    assert kept(filter_logits(logits, 1.0, 0, 0.3)) == [0]                    # the top token always stays
    assert kept(filter_logits(logits, 1.0, 3, 1.0)) == [0, 1, 2]
    lp = filter_logits(logits, 1.0, 0, 0.71)
    torch.testing.assert_close(lp.exp()[:3].float(), probs[:3] / 0.85)       # renormalised over what is kept
    hot = filter_logits(logits, 2.0, 0, 1.0).exp().float()
    torch.testing.assert_close(hot, probs.sqrt() / probs.sqrt().sum())       # temperature 2 = sqrt of probs


def test_sampling_follows_its_generator_and_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]] * 2)
    p = SamplingParams(temperature=1.0, seed=3)
    draws = [sample(logits, [p, p.replace(temperature=0)], [torch.Generator().manual_seed(s)] * 2) for s in range(2000)]
    assert all(d[1] == 3 for d in draws)                                      # the greedy row
    freq = torch.bincount(torch.tensor([d[0] for d in draws]), minlength=4) / 2000
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.03, rtol=0)


@pytest.mark.parametrize("field, value", [("max_tokens", 0), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5),
                                          ("top_k", -1), ("stop_token_ids", (-2,))])
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(BadParam, match=field) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field


def test_text_stream_holds_back_half_characters_and_stop_strings():
    tok = tiny_tokenizer()                  # one token per byte: "é" is two tokens
    ids = tok.encode("café, then stop here", add_special_tokens=False)
    stream = TextStream(tok, ["stop", "zz"])
    out, stopped = [], False
    for t in ids:
        piece, stopped = stream.add(t)
        assert "\ufffd" not in piece
        out.append(piece)
        if stopped:
            break
    assert stopped and "".join(out) == "café, then "
    plain = TextStream(tok)
    text = "".join(plain.add(t)[0] for t in ids) + plain.flush()
    assert text == "café, then stop here"
