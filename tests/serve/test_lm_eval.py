"""lm-eval-harness scores a served adapter exactly as it scores the same adapter in-process.

Two tiny local tasks (JSONL files, no hub): a `multiple_choice` one (loglikelihoods: the request
lm-eval sends is the prompt as token ids with `echo`, `logprobs: 1`, `max_tokens: 1`) and a
`generate_until` one. `lm_eval --model local-completions` against `lorakit serve` must give the same
per-item loglikelihoods (1e-4), the same is_greedy flags and the same scores as lm-eval's own `hf`
backend on the same base with the same adapter through peft, for the base and for the adapter.
"""
import json
import logging
import shutil

import pytest
import torch

import lorakit as lk
from lorakit.models import tiny_tokenizer
from lorakit.serve.api import create_app, serve_in_background
from lorakit.serve.server import ServeConfig, build
from tests.helpers import write_harness_tasks as write_tasks

lm_eval = pytest.importorskip("lm_eval")          # a dev dependency: installed by make test

@pytest.fixture(scope="module")
def setup(tmp_path_factory, adapter_root):
    root = tmp_path_factory.mktemp("lm-eval")
    adapters = root / "adapters"
    shutil.copytree(adapter_root / "llama" / "lora4", adapters / "lora4")
    tiny_tokenizer().save_pretrained(root / "tokenizer")
    return root, write_tasks(root), adapters


def evaluate(model, model_args, tasks_dir):
    from lm_eval.tasks import TaskManager
    logging.getLogger("lm-eval").setLevel(logging.ERROR)
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["lk_mc", "lk_gen"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(tasks_dir)), batch_size=1,
                                  random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    per_item = [s["resps"] for s in sorted(out["samples"]["lk_mc"], key=lambda s: s["doc_id"])]
    answers = [s["resps"] for s in sorted(out["samples"]["lk_gen"], key=lambda s: s["doc_id"])]
    return per_item, answers, out["results"]["lk_mc"]["acc,none"], out["results"]["lk_gen"]["exact_match,none"]


@pytest.mark.parametrize("adapter", [None, "lora4"], ids=["base", "adapter"])
def test_local_completions_against_the_server_equals_the_hf_backend(setup, adapter):
    from lm_eval.models.huggingface import HFLM
    import peft
    root, tasks, adapters = setup
    served = build(ServeConfig(model="tiny-llama", adapters=str(adapters), max_model_len=128, max_tokens=16,
                               max_lora_rank=8, request_timeout=60))
    with serve_in_background(create_app(served)) as url:
        args = {"model": adapter or served.name, "base_url": f"{url}/v1/completions", "tokenizer_backend": "huggingface",
                "tokenizer": str(root / "tokenizer"), "tokenized_requests": True, "num_concurrent": 1,
                "max_retries": 1, "max_length": 128}
        remote = evaluate("local-completions", args, tasks)
    model = lk.tiny_model("llama")
    if adapter:
        model = peft.PeftModel.from_pretrained(model, str(adapters / adapter))
    local = evaluate(HFLM(pretrained=model.eval(), tokenizer=tiny_tokenizer(), batch_size=1, max_length=128),
                     None, tasks)
    for got, want in zip(remote[0], local[0]):             # per item, per choice: (loglikelihood, is_greedy)
        for (ll, greedy), (ll_ref, greedy_ref) in zip((r[0] for r in got), (r[0] for r in want)):
            assert ll == pytest.approx(ll_ref, abs=1e-4) and greedy == greedy_ref
    assert remote[1] == local[1] and remote[2:] == local[2:]          # generations and both scores
    with torch.no_grad():                                  # the adapter changes what is scored (the test can fail)
        assert adapter is None or remote[0] != evaluate(
            HFLM(pretrained=lk.tiny_model("llama").eval(), tokenizer=tiny_tokenizer(), batch_size=1,
                 max_length=128), None, tasks)[0]
