"""FSDP2 on CPU (gloo), two ranks: the sharded step equals the single-process step.

The oracle is the same model stepped in one process on the whole global batch; the sharded one
sees each rank's rows only, with every parameter (frozen ones too) sharded across the ranks.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.mark.skipif(shutil.which(str(TORCHRUN)) is None, reason="torchrun missing")
@pytest.mark.parametrize("method", ["lora", "dora", "full"])
def test_two_sharded_ranks_equal_one_process(method):
    worker = Path(__file__).with_name("fsdp_worker.py")
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(worker), method],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["sharded"] and out["keys"] == out["ref_keys"] > 0
    assert out["grad_err"] < 1e-5 and out["weight_err"] < 1e-5, out          # the tolerance
