"""The CPU runtime switch: what a process runs on, said at start-up; the tuned one preloaded by re-exec."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit import runtime

ROOT = Path(__file__).resolve().parents[1]


def test_describe_names_threads_openmp_and_allocator():
    line = runtime.describe()
    assert f"{torch.get_num_threads()} threads" in line and "OpenMP" in line and "malloc" in line


def test_an_unknown_mode_is_named():
    with pytest.raises(ValueError, match="LORAKIT_RUNTIME / --runtime = 'fast'"):
        runtime.apply("fast", [])


def test_tuned_environment_preloads_intel_openmp_and_keeps_what_the_user_set(monkeypatch, tmp_path):
    fake = tmp_path / "libiomp5.so"
    monkeypatch.setattr(runtime, "iomp_library", lambda: fake)
    monkeypatch.setattr(runtime, "tcmalloc_library", lambda: None)
    env = runtime.tuned_environment({"LD_PRELOAD": "/x/libfoo.so", "KMP_BLOCKTIME": "200"})
    assert env["LD_PRELOAD"] == f"{fake}:/x/libfoo.so" and env["KMP_BLOCKTIME"] == "200"   # the user's value wins
    assert env[runtime.CHILD] == "1" and env["LORAKIT_RUNTIME"] == "tuned"
    monkeypatch.setattr(runtime, "iomp_library", lambda: None)
    with pytest.raises(RuntimeError, match="pip install intel-openmp"):
        runtime.tuned_environment({})


@pytest.mark.skipif(runtime.iomp_library() is None, reason="intel-openmp is not installed")
def test_tuned_runs_the_command_again_under_intel_openmp(tmp_path, carrier):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    env.pop(runtime.CHILD, None)
    args = ["-m", "lorakit", "--runtime", "tuned", "train", "--model", "tiny-llama", "--data", str(carrier["train"]),
            "--steps", "1", "--batch-size", "2", "--no-progress", "--out", str(tmp_path / "run")]
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "runtime: tuned, " in proc.stderr and "Intel OpenMP" in proc.stderr
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
