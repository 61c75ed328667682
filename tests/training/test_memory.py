"""Measured memory: the tensor tracer against known allocations, and the planner against the tracer."""
import pytest
import torch
import transformers

from lorakit.config import FullConfig, LoraConfig
from lorakit.models import TINY_VOCAB, tiny_tokenizer
from lorakit.training import TrainConfig, train_model
from lorakit.training.memory import TensorPeak, model_tensors


def test_tensor_peak_counts_storages_once_and_sees_frees():
    with TensorPeak() as tp:
        a = torch.empty(1000, 250)                   # 1 MB
        b = a.view(-1)[:10]                          # a view: same storage, not counted again
        c = a @ a.T                                  # 1000 x 1000 fp32 = 4 MB
        assert tp.bytes == 1_000_000 + 4_000_000
        del c
        assert tp.bytes == 1_000_000 and tp.peak == 5_000_000
        d = torch.empty(10, dtype=torch.bfloat16)    # 20 B
        assert tp.bytes == 1_000_020
        tp.reset_peak()
        assert tp.peak == 1_000_020
    del a, b, d
    assert tp.bytes == 0


def test_tensor_peak_sees_backward_and_optimizer_state():
    w = torch.nn.Linear(100, 100, bias=False)
    opt = torch.optim.AdamW(w.parameters())
    tp = TensorPeak().seed(model_tensors(w, opt))
    assert tp.bytes == 40_000                        # the weight
    with tp:
        w(torch.ones(8, 100)).sum().backward()
        opt.step()
    live = tp.bytes
    assert live == 40_000 * 4 + 4                    # weight, grad, two moments, the step counter (fp32 scalar)
    opt.zero_grad(set_to_none=True)
    assert tp.bytes == live - 40_000


def _small_llama():
    """Small enough for the suite, shaped like a real decoder (h=256, i=683, GQA 8/4) so the per-layer
    census dominates, as it does at any real size."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=256, intermediate_size=683,
                                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                                      max_position_embeddings=512)
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("method, method_cfg", [("lora", LoraConfig(r=8, alpha=16)), ("full", FullConfig())])
@pytest.mark.parametrize("extra", [{}, {"grad_accum": 2}])
def test_planned_peak_is_within_20_percent_of_the_traced_peak(tmp_path, carrier, method, method_cfg, extra):
    cfg = TrainConfig(data=str(carrier["train"]), out=str(tmp_path / "run"), batch_size=4, lr=1e-3, steps=3,
                      method=method, trace_memory=True, progress=False, **extra)
    summary = train_model(_small_llama(), tiny_tokenizer(), cfg, method_cfg)
    planned, measured = summary["planned_memory"], summary["peak_memory"]
    assert planned["measured"] == "tensor_peak_bytes"
    assert measured["tensor_peak_bytes"] > 0.5 * planned["total_bytes"]          # the tracer saw the step
    assert 0.8 <= planned["measured_over_planned"] <= 1.2, (planned["measured_over_planned"], planned["components"])


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_optimizer_state_bytes_agree_with_the_planner(tmp_path, carrier, optimizer):
    cfg = TrainConfig(data=str(carrier["train"]), out=str(tmp_path / optimizer), batch_size=2, lr=1e-3, steps=1,
                      optimizer=optimizer, quantize="nf4", progress=False)
    summary = train_model(_small_llama(), tiny_tokenizer(), cfg, LoraConfig(r=16, alpha=32))
    measured, planned = summary["optimizer"]["state_bytes"], summary["planned_memory"]["optimizer_bytes"]
    trainable = summary["trainable_params"]
    assert abs(measured - planned) <= 0.01 * planned
    # fp32 moments: 8 B/param; 8-bit: 2 B/param except tensors under 4,096 elements (here k/v's B)
    assert measured < (0.35 if optimizer == "adamw8bit" else 1.01) * 8 * trainable
    assert summary["planned_memory"]["components"][0]["component"] == "frozen weights (NF4 payload)"
