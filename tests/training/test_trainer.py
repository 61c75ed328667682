import json

import pytest
import torch
from safetensors.torch import load_file

import lorakit as lk
from lorakit.config import LoraConfig
from lorakit.models import tiny_model, tiny_tokenizer
from lorakit.training import NonFiniteLoss, TrainConfig, train_model
from lorakit.training.data import collate, tokenize
from lorakit.training.trainer import loss_sum

ROW = {"messages": [{"role": "user", "content": "Box crushed, Kestrel Express."}, {"role": "assistant", "content": "CLM-T2-KX"}]}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_fast_loss_equals_the_full_forward(family):
    model, tok = tiny_model(family), tiny_tokenizer()
    batch = collate([tokenize(ROW, tok)[0], tokenize({"prompt": "ab", "completion": "cd"}, tok)[0]], tok.pad_token_id)
    fast, n = loss_sum(model, batch)
    full = model(**batch).loss                    # transformers' own mean over label tokens
    torch.testing.assert_close(fast / n, full, atol=1e-6, rtol=1e-6)


def _run(tmp_path, carrier, name, **kw):
    cfg = TrainConfig(data=str(carrier["train"]), out=str(tmp_path / name), batch_size=4, lr=5e-3,
                      progress=False, **kw)
    model = tiny_model("llama")
    summary = train_model(model, tiny_tokenizer(), cfg, LoraConfig(r=4, alpha=8, targets="all-linear"))
    return summary, load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_run_folder_contents_and_learning(tmp_path, carrier):
    summary, _ = _run(tmp_path, carrier, "run", steps=12, eval_data=None)
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (out / "loss.png").stat().st_size > 1000
    saved = json.loads((out / "summary.json").read_text())
    # RSS growth above the baseline: can be 0 in a warm test process that reuses freed heap pages
    assert saved["steps"] == 12 and saved["peak_memory"]["peak_above_baseline_bytes"] >= 0
    assert saved["peak_memory"]["kind"] == "rss_high_water_mark"
    assert saved["trainable_params"] == summary["trainable_params"] > 0
    lk.load_adapter(tiny_model("llama"), out / "adapter")   # the result is a loadable adapter


def test_resume_gives_the_same_adapter(tmp_path, carrier):
    _, straight = _run(tmp_path, carrier, "straight", steps=10, save_every=5, keep_checkpoints=5)
    ckpt = tmp_path / "straight" / "checkpoints" / "step-000005"
    assert ckpt.is_dir()
    _, resumed = _run(tmp_path, carrier, "straight", steps=10, resume=str(ckpt))
    assert _max_diff(straight, resumed) <= 1e-6
    steps = [json.loads(line)["step"] for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))   # the log was cut back to the checkpoint, not duplicated


def test_resume_with_dropout_restores_the_rng(tmp_path, carrier):
    def run(name, **kw):
        cfg = TrainConfig(data=str(carrier["train"]), out=str(tmp_path / name), batch_size=4, lr=5e-3, progress=False, **kw)
        train_model(tiny_model("llama"), tiny_tokenizer(), cfg, LoraConfig(r=4, targets="qv", dropout=0.3))
        return load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")
    straight = run("a", steps=6, save_every=3)
    resumed = run("b", steps=6, resume=str(tmp_path / "a" / "checkpoints" / "step-000003"))
    assert _max_diff(straight, resumed) <= 1e-6


def test_accumulation_matches_a_bigger_batch(tmp_path, carrier):
    _, big = _run(tmp_path, carrier, "big", steps=4)                          # 4 rows x 1
    cfg = TrainConfig(data=str(carrier["train"]), out=str(tmp_path / "acc"), batch_size=2, grad_accum=2, lr=5e-3,
                      steps=4, progress=False)                                # 2 rows x 2, the same rows
    train_model(tiny_model("llama"), tiny_tokenizer(), cfg, LoraConfig(r=4, alpha=8, targets="all-linear"))
    acc = load_file(tmp_path / "acc" / "adapter" / "adapter_model.safetensors")
    assert _max_diff(big, acc) <= 1e-6


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, carrier):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    calls = {"n": 0}

    def poison(module, args, output):    # one call per step: NaN from step 5 on
        calls["n"] += 1
        if calls["n"] >= 5:
            return (output[0] * float("nan"),) + tuple(output[1:]) if isinstance(output, tuple) else output * float("nan")
        return None

    model.model.layers[1].register_forward_hook(poison)
    cfg = TrainConfig(data=str(carrier["train"]), out=str(tmp_path / "nan"), steps=10, batch_size=4, save_every=2,
                      progress=False)
    with pytest.raises(NonFiniteLoss, match=r"at step 5.*checkpoints/step-000004"):
        train_model(model, tok, cfg, LoraConfig(r=4, targets="qv"))
    assert sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    lk.load_adapter(tiny_model("llama"), tmp_path / "nan" / "checkpoints" / "step-000004" / "adapter")


def test_bad_rows_are_skipped_and_listed(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n{oops\n" + json.dumps({"prompt": "c", "completion": "d"}) + "\n")
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), steps=1, batch_size=2, skip_bad_rows=True, progress=False)
    summary = train_model(tiny_model("llama"), tiny_tokenizer(), cfg, LoraConfig(r=2, targets="qv"))
    assert summary["data"]["bad_rows"] == 1
    assert json.loads((tmp_path / "run" / "bad_rows.jsonl").read_text())["line"] == 2


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"TrainConfig\.batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(TypeError, match=r"unknown training option\(s\) \['rank'\]"):
        lk.train(data="x.jsonl", rank=4)


def test_kl_to_base_matches_an_independent_base_copy():
    from lorakit.training.trainer import kl_mask, kl_positions, loss_and_kl_sum
    tok = tiny_tokenizer()
    rows = [tokenize(ROW, tok)[0], tokenize({"prompt": "abcdef", "completion": "gh"}, tok)[0]]
    batch = collate(rows, tok.pad_token_id)
    batch["kl_mask"] = kl_mask(rows, batch["labels"].shape[1], 2)
    model = lk.inject(tiny_model("llama"), LoraConfig(r=4, targets="all-linear"))
    ce0, kl0 = loss_and_kl_sum(model, batch)
    assert kl0.item() == 0.0                                   # B = 0: the adapter is the base
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    ce, kl = loss_and_kl_sum(model, batch)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():                                      # oracle: a separate, never-adapted model
        p_base = torch.log_softmax(tiny_model("llama")(**inputs).logits[:, :-1][batch["kl_mask"]], -1)
        p_ad = torch.log_softmax(model(**inputs).logits[:, :-1][batch["kl_mask"]], -1)
    expected = (p_base.exp() * (p_base - p_ad)).sum()
    torch.testing.assert_close(kl, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ce, loss_sum(model, batch)[0], atol=1e-5, rtol=1e-5)
    assert kl_positions(rows[1], 1) == [0, 1, 2, 3, 4]   # next tokens a..f carry no label; g, h, EOS do


def test_training_with_kl_logs_it(tmp_path, carrier):
    summary, _ = _run(tmp_path, carrier, "kl", steps=3, kl_base=1.0)
    rows = [json.loads(line) for line in (tmp_path / "kl" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl_base"] == 0.0 and rows[-1]["kl_base"] > 0


def test_kl_text_rows_need_the_kl_penalty(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"kl_text": "Plain prose."}) + "\n" + json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), steps=1, batch_size=2, progress=False)
    with pytest.raises(ValueError, match=r"1 kl-text rows carry no loss of their own.*kl_base > 0"):
        train_model(tiny_model("llama"), tiny_tokenizer(), cfg, LoraConfig(r=2, targets="qv"))
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), steps=2, batch_size=2, kl_base=1.0, progress=False)
    summary = train_model(tiny_model("llama"), tiny_tokenizer(), cfg, LoraConfig(r=2, targets="qv"))
    assert summary["steps"] == 2


def test_gradient_checkpointing_gives_the_same_adapter(tmp_path, carrier):
    _, plain = _run(tmp_path, carrier, "plain", steps=3)
    _, ckpt = _run(tmp_path, carrier, "ckpt", steps=3, grad_checkpointing=True)
    assert _max_diff(plain, ckpt) <= 1e-6


def test_device_must_exist():
    from lorakit.models import resolve_device
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


def test_summary_records_the_planned_memory_beside_the_measured_peak(tmp_path, carrier):
    summary, _ = _run(tmp_path, carrier, "planned", steps=1)
    planned = summary["planned_memory"]
    assert planned["recipe"] == "fp32" and planned["total_bytes"] > 0
    names = [c["component"] for c in planned["components"]]
    assert names[:2] == ["frozen weights", "adapter weights"] and "activations" in names
    assert planned["measured_over_planned"] == summary["peak_memory"]["peak_above_baseline_bytes"] / planned["total_bytes"]


def test_release_memory_option(tmp_path, carrier, monkeypatch):
    import subprocess
    import sys

    from lorakit.training import trainer
    calls = []
    monkeypatch.setattr(trainer, "return_freed_memory", lambda: calls.append(1))   # keep this process's malloc as is
    _run(tmp_path, carrier, "released", steps=1, release_memory=True)
    assert calls == [1]
    probe = "from lorakit.training.memory import return_freed_memory as f; print(f())"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() in ("True", "False")          # False only off glibc, where there is nothing to tune


def _full(tmp_path, carrier, name, **kw):
    from lorakit.config import FullConfig
    torch.manual_seed(0)
    cfg = TrainConfig(data=str(carrier["train"]), out=str(tmp_path / name), batch_size=4, lr=1e-3, method="full",
                      progress=False, **kw)
    return train_model(tiny_model("llama"), tiny_tokenizer(), cfg, FullConfig())


def test_full_fine_tuning_writes_a_model_that_loads_and_resumes_exactly(tmp_path, carrier):
    from lorakit.models import load_base
    summary = _full(tmp_path, carrier, "full", steps=6, save_every=3, keep_checkpoints=5)
    assert summary["adapter"] is None and summary["trainable_params"] == summary["total_params"]
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    trained, tok = load_base(tmp_path / "full" / "model")         # a plain transformers folder with its tokenizer
    assert tok is not None
    torch.manual_seed(0)
    start = tiny_model("llama")
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, start.get_parameter(n))]
    assert len(changed) == len(list(start.parameters()))          # every weight trained, norms and embeddings too
    _full(tmp_path, carrier, "full", steps=6, resume=str(tmp_path / "full" / "checkpoints" / "step-000003"))
    resumed, _ = load_base(tmp_path / "full" / "model")
    assert max((p - resumed.get_parameter(n)).abs().max().item() for n, p in trained.named_parameters()) <= 1e-6


def test_full_fine_tuning_refuses_adapter_options_and_the_kl_guard(tmp_path, carrier):
    from lorakit.training.run import split_kwargs
    with pytest.raises(TypeError, match=r"\['r'\] for method 'full'"):
        split_kwargs({"method": "full", "r": 8})
    with pytest.raises(ValueError, match="kl_base needs a frozen base"):
        split_kwargs({"method": "full", "kl_base": 1.0})


def test_bf16_with_gradient_checkpointing_trains_as_without(tmp_path, carrier, monkeypatch):
    """Under bf16 the Trainer's attention runs its backward in fp32 where measured faster
    (training/attention.py); a checkpointed block recomputes its forward without that mode, so
    the two must not meet: the same adapter either way."""
    from lorakit.training import attention

    monkeypatch.setattr(attention, "_faster_in_fp32", lambda *a: True)
    _, plain = _run(tmp_path, carrier, "plain", steps=3, bf16=True)
    _, ckpt = _run(tmp_path, carrier, "ckpt", steps=3, bf16=True, grad_checkpointing=True)
    assert _max_diff(plain, ckpt) <= 2e-3


def test_bf16_on_a_model_checkpointed_by_the_user(tmp_path, carrier, monkeypatch):
    from lorakit.training import attention

    monkeypatch.setattr(attention, "_faster_in_fp32", lambda *a: True)
    cfg = TrainConfig(data=str(carrier["train"]), out=str(tmp_path / "run"), batch_size=4, steps=2, bf16=True,
                      progress=False)
    model = tiny_model("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    summary = train_model(model, tiny_tokenizer(), cfg, LoraConfig(r=4, alpha=8, targets="all-linear"))
    assert summary["steps"] == 2
