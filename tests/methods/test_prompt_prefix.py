"""Prompt tuning and prefix tuning: exact against peft both ways, generation, masks, training."""
import json

import peft
import pytest
import torch

import lorakit as lk
from lorakit.models import tiny_tokenizer
from tests.helpers import inputs, randomize

N = 5
CONFIGS = {
    "prompt": lambda: lk.PromptTuningConfig(num_virtual_tokens=N),
    "prefix": lambda: lk.PrefixTuningConfig(num_virtual_tokens=N),
    "prefix-mlp": lambda: lk.PrefixTuningConfig(num_virtual_tokens=N, projection=16),
}
FAMILIES = ["llama", "gpt2"]


def _model(family, method):
    torch.manual_seed(0)
    model = lk.tiny_model(family).eval()
    lk.inject(model, CONFIGS[method]())
    return randomize(model, scale=1.0)


def _logits(model, x, mask=None):
    with torch.no_grad():
        return model(input_ids=x, attention_mask=mask).logits


def _peft_logits(model, x, mask=None):
    out = _logits(model, x, mask)
    return out[:, -x.shape[1]:]          # peft returns the virtual positions too (prompt tuning)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(CONFIGS))
def test_lorakit_to_peft_and_back(tmp_path, family, method):
    model = _model(family, method)
    x = inputs(model)
    mask = torch.ones_like(x)
    mask[0, :3] = 0                                      # a left-padded row
    ours = _logits(model, x, mask)
    lk.save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == ("PROMPT_TUNING" if method == "prompt" else "PREFIX_TUNING")
    theirs = peft.PeftModel.from_pretrained(lk.tiny_model(family), tmp_path / "ours").eval()
    torch.testing.assert_close(_peft_logits(theirs, x, mask), ours, atol=1e-5, rtol=0)

    theirs.save_pretrained(tmp_path / "theirs")           # and peft's own files load here
    back = lk.load_adapter(lk.tiny_model(family).eval(), tmp_path / "theirs")
    torch.testing.assert_close(_logits(back, x, mask), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(CONFIGS))
def test_only_the_adapter_trains_and_disabled_is_the_base(family, method):
    model = _model(family, method)
    base = lk.tiny_model(family).eval()
    x = inputs(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("lorakit_inputs.") for n in trainable)
    report = lk.trainable_report(model)
    expected = {"prompt": N * 32, "prefix": N * 2 * 2 * 16 if family == "llama" else N * 2 * 2 * 32}
    if method in expected:
        assert report.trainable == expected[method]
    assert not torch.allclose(_logits(model, x), _logits(base, x))       # it changes outputs by construction
    with lk.disabled(model):
        torch.testing.assert_close(_logits(model, x), _logits(base, x), atol=0, rtol=0)
    model(input_ids=x).logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in trainable)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_right_padding_does_not_change_a_row(family, method):
    """The virtual tokens' mask entries are added, the pads' stay masked: a padded row's real
    positions give the logits of the unpadded row. (Left padding shifts positions, as in peft,
    which derives positions from the cache length.)"""
    model = _model(family, method)
    x = inputs(model, length=9)
    alone = _logits(model, x[1:, :6])
    padded = x.clone()
    padded[1, 6:] = 0
    mask = torch.ones_like(padded)
    mask[1, 6:] = 0
    torch.testing.assert_close(_logits(model, padded, mask)[1, :6], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_left_padding_with_position_ids_does_not_change_a_row(family, method):
    """What generate does with a left-padded batch: positions from the mask, shifted past the virtual tokens."""
    model = _model(family, method)
    x = inputs(model, length=9)
    alone = _logits(model, x[1:, 3:])
    padded, mask = x.clone(), torch.ones_like(x)
    padded[1, :3], mask[1, :3] = 0, 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=padded, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(out[1, 3:], alone[0], atol=1e-5, rtol=1e-5)
    batch = model.generate(input_ids=padded, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    single = model.generate(input_ids=x[1:, 3:], attention_mask=torch.ones_like(x[1:, 3:]), max_new_tokens=4,
                            do_sample=False, pad_token_id=0)
    assert batch[1, -4:].tolist() == single[0, -4:].tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(CONFIGS))
def test_generate_equals_a_manual_greedy_decode(family, method):
    model = _model(family, method)
    x = inputs(model, batch=1)
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                         pad_token_id=0)
    manual = x
    for _ in range(6):
        nxt = _logits(model, manual)[:, -1].argmax(-1, keepdim=True)
        manual = torch.cat([manual, nxt], dim=1)
    assert out.tolist() == manual.tolist()


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_trains_on_the_tiny_model(tmp_path, method):
    """Every step sees the same row, so the loss must fall as the virtual tokens learn it."""
    from lorakit.training import train
    row = {"prompt": "Box crushed, Kestrel Express. Route:", "completion": " CLM-T2-KX"}
    data = tmp_path / "one.jsonl"
    data.write_text((json.dumps(row) + "\n") * 8)
    summary = train(model="tiny-llama", data=str(data), out=str(tmp_path / method), method=method,
                    batch_size=4, lr=0.3, warmup=0, steps=20, progress=False, num_virtual_tokens=8)
    losses = [json.loads(line)["loss"] for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    # a random tiny model predicts near-uniformly (ln 288 = 5.66) and a prompt can only move it a little
    assert losses[-1] < losses[0] - (0.02 if method == "prompt" else 0.1)
    assert summary["trainable_params"] == (8 * 32 if method == "prompt" else 8 * 2 * 2 * 16)


def test_prompt_init_from_text():
    model = lk.tiny_model("llama")
    tok = tiny_tokenizer()
    lk.inject(model, lk.PromptTuningConfig(num_virtual_tokens=6, prompt_init="text", init_text="ab"), tokenizer=tok)
    ids = tok("ab", add_special_tokens=False).input_ids
    emb = model.get_input_embeddings().weight
    prompt = dict(model.named_parameters())["lorakit_inputs.default.embeddings"]
    torch.testing.assert_close(prompt, emb[(ids * 3)[:6]])


def test_prefix_for_another_layout_is_refused(tmp_path):
    model = _model("llama", "prefix")
    lk.save_adapter(model, tmp_path)
    other = lk.tiny_model("gpt2")
    with pytest.raises(ValueError, match=r"\(2, 2, 8\).*\(2, 4, 8\)|\(2, 4, 8\).*\(2, 2, 8\)"):
        lk.load_adapter(other, tmp_path)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_input_adapters_cannot_be_merged(method):
    model = _model("llama", method)
    with pytest.raises(lk.MergeError, match="cannot be merged"):
        lk.merge(model)
    with pytest.raises(lk.MergeError, match="cannot be merged"):
        lk.merge_and_unload(model)
    lk.delete_adapter(model, "default")                   # and deleting one removes its hooks
    x = inputs(model)
    torch.testing.assert_close(_logits(model, x), _logits(lk.tiny_model("llama").eval(), x), atol=0, rtol=0)
    assert not hasattr(model, "lorakit_inputs")


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_from_text_reads_like_the_text(family):
    """A prefix initialised from a text's keys and values gives the logits of the text followed by the input."""
    tok = tiny_tokenizer()
    text_ids = tok("route it", add_special_tokens=False).input_ids
    model = lk.tiny_model(family).eval()
    lk.inject(model, lk.PrefixTuningConfig(num_virtual_tokens=len(text_ids), prefix_init="text", prefix_text="route it"),
              tokenizer=tok)
    x = inputs(model, batch=1)
    both = torch.cat([torch.tensor([text_ids]), x], dim=1)
    plain = lk.tiny_model(family).eval()
    torch.testing.assert_close(_logits(model, x), _logits(plain, both)[:, len(text_ids):], atol=1e-5, rtol=1e-5)
