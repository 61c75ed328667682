"""Out-of-process checks: SIGKILL in the middle of a checkpoint write, and torchrun data parallelism."""
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")


def _train_args(data, out, steps=8, batch=4, **extra):
    # --rank, not --r: torchrun's own parser rejects --r as an ambiguous prefix of its flags
    args = ["--model", "tiny-llama", "--data", str(data), "--out", str(out), "--steps", str(steps),
            "--batch-size", str(batch), "--lr", "5e-3", "--rank", "4", "--targets", "all-linear", "--no-progress",
            "--no-bf16"]   # exactness across rank counts is an fp32 property; bf16 matmuls depend on shapes
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def _adapter(out):
    return load_file(Path(out) / "adapter" / "adapter_model.safetensors")


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


KILLER = textwrap.dedent("""
    import os, signal, sys
    import safetensors.torch as st
    from lorakit.training import checkpoint
    real, calls = checkpoint.save_file, {"n": 0}
    def dying_save(tensors, path, *a, **k):
        real(tensors, path, *a, **k)          # the optimizer file is on disk, the folder not yet renamed
        calls["n"] += 1
        if calls["n"] == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.save_file = dying_save
    from lorakit.cli import main
    sys.exit(main(["train"] + sys.argv[1:]))
""")


def test_sigkill_during_checkpoint_resumes_from_the_last_complete_one(tmp_path, carrier):
    straight = tmp_path / "straight"
    subprocess.run([sys.executable, "-m", "lorakit", "train", *_train_args(carrier["train"], straight, save_every=2)],
                   env=_env(), check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLER, *_train_args(carrier["train"], killed, save_every=2)],
                          env=dict(_env(), KILL_AT="3"), capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    ckpts = killed / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-000002", "step-000004"]
    assert list(ckpts.glob(".step-000006.*.tmp"))          # the half-written one was never committed
    subprocess.run([sys.executable, "-m", "lorakit", "train",
                    *_train_args(carrier["train"], killed, save_every=2, resume=killed)],
                   env=_env(), check=True, capture_output=True)
    assert not list(ckpts.glob(".*.tmp"))
    assert _max_diff(_adapter(straight), _adapter(killed)) <= 1e-6


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="torchrun missing")
def test_torchrun_two_processes_match_one(tmp_path, carrier):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    subprocess.run([sys.executable, "-m", "lorakit", "train", *_train_args(carrier["train"], single, steps=4)],
                   env=_env(), check=True, capture_output=True)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "lorakit", "train",
                           *_train_args(carrier["train"], ddp, steps=4)], env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _max_diff(_adapter(single), _adapter(ddp)) <= 1e-5
    summary = (ddp / "summary.json").read_text()
    assert '"world_size": 2' in summary
