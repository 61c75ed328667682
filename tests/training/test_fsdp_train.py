"""`lorakit train --fsdp` under torchrun (gloo, 2 ranks) against one process on the same global batch.

Oracles: the single-process run of the same job (weights to 1e-5, the issue's tolerance), an
uninterrupted run for a run killed mid-checkpoint and resumed on another number of ranks (1e-6),
and the planner's per-rank prediction for the traced peak of each rank (15%).
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import lorakit as lk
from lorakit.models import TINY_VOCAB, tiny_tokenizer
from lorakit.training import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).parent / "torchrun"
needs_torchrun = pytest.mark.skipif(shutil.which(str(TORCHRUN)) is None, reason="torchrun missing")
METHOD_FLAGS = {"lora": ["--rank", "4", "--targets", "all-linear"], "dora": ["--method", "dora", "--rank", "4",
                "--targets", "all-linear"], "full": ["--method", "full"]}


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")


def _train(out, data, ranks=0, *flags, script=None, env=None, check=True):
    """`lorakit train` in one plain process (ranks=0) or under torchrun on `ranks` processes."""
    args = ["--data", str(data), "--out", str(out), "--batch-size", "4", "--lr", "5e-3", "--no-progress", *flags]
    if "--bf16" not in flags:                # exactness across rank counts is an fp32 property
        args.append("--no-bf16")
    if "--model" not in flags:
        args = ["--model", "tiny-llama", *args]
    entry = [str(script)] if script else ["-m", "lorakit", "train"]
    launch = [str(TORCHRUN), "--standalone", f"--nproc_per_node={ranks}"] if ranks else [sys.executable]
    proc = subprocess.run([*launch, *entry, *args], env=env or _env(), capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _weights(out) -> dict[str, torch.Tensor]:
    folder = Path(out) / ("adapter" if (Path(out) / "adapter").is_dir() else "model")
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def _max_diff(a, b) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


METHODS = {"lora": {"r": 4, "targets": "all-linear"}, "dora": {"method": "dora", "r": 4, "targets": "all-linear"},
           "full": {"method": "full"}}


def _sharded_jobs(tmp_path, jobs: dict[str, dict]) -> None:
    """Every job under one 2-rank torchrun launch (the launch and imports cost more than the jobs)."""
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps([dict(job, out=str(tmp_path / name / "fsdp")) for name, job in jobs.items()]))
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(Path(__file__).with_name(
        "fsdp_train_worker.py")), str(spec)], env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]


@needs_torchrun
def test_two_sharded_ranks_train_what_one_process_trains(tmp_path, carrier):
    """LoRA, DoRA and full fine-tuning, plain and with accumulation + activation checkpointing; a rank
    with no row in a short last batch; bf16 mixed precision with the KL guard and held-out loss."""
    from lorakit.datasets import write
    nine = write(tmp_path / "nine", n_train=9, n_heldout=2, seed=3)["train"]   # last batch: 1 row, rank 1 none
    common = {"model": "tiny-llama", "batch_size": 4, "lr": 5e-3}
    jobs = {f"{m}-{v}": dict(common, data=str(carrier["train"]), steps=2, **METHODS[m],
                             **({"grad_accum": 2, "grad_checkpointing": True} if v == "accum" else {}))
            for m in METHODS for v in ("plain", "accum")}
    jobs["short-batch"] = dict(common, data=str(nine), epochs=1, **METHODS["lora"])
    jobs["bf16"] = dict(common, data=str(carrier["train"]), steps=3, bf16=True, kl_base=0.5,
                        eval_data=str(carrier["heldout"]), **METHODS["lora"])
    _sharded_jobs(tmp_path, jobs)
    for name, job in jobs.items():
        one = lk.train(**dict(job, out=str(tmp_path / name / "one"), grad_checkpointing=False), progress=False)
        two = json.loads((tmp_path / name / "fsdp" / "summary.json").read_text())
        assert two["world_size"] == 2 and two["planned_memory"]["shard"] == "full" and two["steps"] == one["steps"]
        if name == "bf16":       # bf16 weights all-gathered vs autocast in one process: bf16's precision
            assert abs(one["final_loss"] - two["final_loss"]) <= 1e-3 * one["final_loss"]
            assert abs(one["eval_loss"] - two["eval_loss"]) <= 1e-3 * one["eval_loss"]
            continue
        assert _max_diff(_weights(tmp_path / name / "one"), _weights(tmp_path / name / "fsdp")) <= 1e-5, name
        folder, config = Path(one["weights"]), "config.json" if name.startswith("full") else "adapter_config.json"
        assert json.loads((folder / config).read_text()) == \
            json.loads((tmp_path / name / "fsdp" / folder.name / config).read_text())


KILLER = textwrap.dedent("""
    import os, signal, sys
    from lorakit.training import checkpoint
    real, calls = checkpoint.commit_folder, {"n": 0}
    def dying_commit(tmp, path):
        calls["n"] += 1                   # every rank's shard is on disk, the folder not yet renamed
        if calls["n"] == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
        real(tmp, path)
    checkpoint.commit_folder = dying_commit
    from lorakit.cli import main
    sys.exit(main(["train"] + sys.argv[1:]))
""")


@needs_torchrun
@pytest.mark.parametrize("method, first, then", [("lora", 2, 1), ("full", 1, 2)], ids=["lora-2to1", "full-1to2"])
def test_run_killed_mid_checkpoint_resumes_on_another_rank_count(tmp_path, carrier, method, first, then):
    flags = [*METHOD_FLAGS[method], "--steps", "6", "--save-every", "2", "--fsdp"]
    _train(tmp_path / "straight", carrier["train"], first, *flags)
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    killed = tmp_path / "killed"
    launch = first if first > 1 else 0
    proc = _train(killed, carrier["train"], launch, *flags, script=killer, env=dict(_env(), KILL_AT="2"), check=False)
    assert proc.returncode != 0
    ckpts = killed / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-000002"]     # step 4 never committed
    assert list(ckpts.glob(".step-000004.*.tmp"))
    _train(killed, carrier["train"], then if then > 1 else 0, *flags, "--resume", str(killed))
    assert not list(ckpts.glob(".*.tmp"))
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step-000002") and summary["world_size"] == then
    assert _max_diff(_weights(tmp_path / "straight"), _weights(killed)) <= 1e-6


def _small_llama_folder(path: Path) -> Path:
    """h=256, GQA 8/4, 4 layers (as tests/training/test_memory.py), written as a model folder."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=256, intermediate_size=683,
                                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                                      max_position_embeddings=512)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@needs_torchrun
def test_each_ranks_traced_peak_is_the_per_rank_plan(tmp_path, carrier):
    model = _small_llama_folder(tmp_path / "h256")
    common = {"model": str(model), "data": str(carrier["train"]), "steps": 2, "batch_size": 4, "lr": 5e-3,
              "trace_memory": True}
    jobs = {"lora": dict(common, r=4), "full": dict(common, method="full")}
    _sharded_jobs(tmp_path, jobs)
    one = lk.train(**jobs["full"], out=str(tmp_path / "full-1"), progress=False)
    for method in jobs:
        summary = json.loads((tmp_path / method / "fsdp" / "summary.json").read_text())
        planned = summary["planned_memory"]
        assert planned["per_rank"] and planned["measured"] == "tensor_peak_bytes"
        components = {c["component"] for c in planned["components"]}
        assert {"all-gathered weights", "unsharded gradients"} <= components
        for rank in summary["per_rank"]:               # every rank, not only rank 0
            ratio = rank["peak_memory"]["tensor_peak_bytes"] / planned["total_bytes"]
            assert 0.85 <= ratio <= 1.15, (method, ratio, planned["components"])
    sharded = [r["model_state_bytes"] for r in summary["per_rank"]]    # full fine-tuning, 2 ranks
    assert all(0.45 <= s / one["model_state_bytes"] <= 0.55 for s in sharded), (sharded, one["model_state_bytes"])


def test_sharded_checkpoint_resumes_only_the_same_adapter(tmp_path, carrier):
    """One process with fsdp: nothing to shard, but the checkpoint is in the sharded format."""
    run = tmp_path / "run"
    lk.train(model="tiny-llama", data=str(carrier["train"]), out=str(run), steps=2, batch_size=4, r=4, fsdp=True,
             progress=False)
    assert (run / "checkpoints" / "step-000002" / "dcp" / ".metadata").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    with pytest.raises(ValueError, match=r"r=4 there, 8 here"):
        lk.train(model="tiny-llama", data=str(carrier["train"]), out=str(run), steps=3, batch_size=4, r=8, fsdp=True,
                 resume=str(run), progress=False)


@pytest.mark.parametrize("kwargs, match", [
    ({"quantize": "nf4"}, "buffers, which FSDP2 replicates"),
    ({"optimizer": "adamw8bit"}, "use optimizer='adamw'"),
])
def test_what_fsdp_does_not_do_is_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(data="x.jsonl", fsdp=True, **kwargs)


def test_prefix_with_grad_checkpointing_is_refused(carrier, tmp_path):
    with pytest.raises(ValueError, match="cache=None"):
        lk.train(model="tiny-llama", data=str(carrier["train"]), out=str(tmp_path), method="prefix",
                 grad_checkpointing=True, steps=1, progress=False)

