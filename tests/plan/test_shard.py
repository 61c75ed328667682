"""The seed's sharding arithmetic: model states spread over N ranks (ZeRO-1/2/3, FSDP), per rank.

The oracle is the seed's own numbers (70B under the 16-byte recipe: 1,120 GB in all, 140 GB per rank
at N = 8) and plain division: what a strategy shards is divided by N, what it does not is not.
"""
import pytest

import lorakit as lk
from lorakit.cli import main
from lorakit.plan.report import fsdp_units
from lorakit.plan import memory as mem
from tests.plan.test_plan import plan


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_70b_and_65b_per_rank_under_full_sharding(capsys, n):
    h = plan(capsys, "--params", "70B", "--world-size", str(n), "--shard", "full")["headline"]
    assert h["full_16-byte_gb"] == 1120 and h["per_rank"]["full_16-byte_gb"] == pytest.approx(1120 / n)
    assert h["per_rank"]["full_12-byte_gb"] == pytest.approx(840 / n)
    assert h["per_rank"]["lora_fp16_floor_gb"] == pytest.approx(140 / n)       # FSDP shards frozen weights too
    h = plan(capsys, "--params", "65B", "--world-size", str(n), "--shard", "full")["headline"]["per_rank"]
    assert h["full_12-byte_gb"] == pytest.approx(780 / n) and h["nf4_with_constants_gb"] == pytest.approx(33.53 / n,
                                                                                                           rel=1e-3)


def test_the_seed_example_140_gb_per_rank_at_8():
    assert main(["plan", "--params", "70B", "--world-size", "8", "--shard", "full"]) == 0


@pytest.mark.parametrize("strategy, per_rank", [
    ("none", 2 + 2 + 8 + 4),                # DDP: every rank holds all 16 bytes
    ("opt", 2 + 2 + (8 + 4) / 4),           # ZeRO-1: optimizer state and master copy split
    ("grad-opt", 2 + (2 + 8 + 4) / 4),      # ZeRO-2: gradients too
    ("full", 16 / 4),                       # ZeRO-3 / FSDP: the weights too
])
def test_each_strategy_splits_what_it_names(strategy, per_rank):
    states = mem.model_states(1000, 0, "full", "16-byte")
    assert mem.shard(states, 4, strategy).total == pytest.approx(1000 * per_rank)
    assert mem.shard(states, 1, strategy).total == states.total               # one rank: nothing to split


def test_full_sharding_pays_for_the_largest_unit_and_never_splits_activations():
    states = mem.model_states(1000, 0, "full", "12-byte")
    states.add("activations", 500, "x", "activations")
    per_rank = mem.shard(states, 4, "full", largest_unit=100, largest_unit_gradients=50, root_unit=30,
                         root_unit_gradients=7)
    lines = {c: b for c, b, _, _ in per_rank.lines}
    # two blocks gathered (running, prefetched) + the root, which FSDP2 keeps gathered through backward
    assert lines["activations"] == 500 and lines["all-gathered weights"] == 2 * 100 + 30
    assert lines["unsharded gradients"] == 2 * 50 + 7        # a block's gradient and its reduce-scatter copy
    assert lines["weights"] == 500 and lines["optimizer"] == 2000


def test_a_model_plan_per_rank(capsys):
    """A small Llama: per-rank states are the total's over N, plus the root unit (embeddings, head) and two
    blocks gathered at once, and their gradients before the reduce-scatter."""
    one = plan(capsys, "tiny-llama", "--method", "full", "--recipe", "fp32", "--dtype", "float32")["model"]
    two = plan(capsys, "tiny-llama", "--method", "full", "--recipe", "fp32", "--dtype", "float32",
               "--world-size", "2", "--shard", "full")["model"]
    assert two["world_size"] == 2 and two["shard"] == "full" and "memory_per_rank" not in one
    states = {c["component"]: c["bytes"] for c in one["memory"]["components"]}
    ranked = {c["component"]: c["bytes"] for c in two["memory_per_rank"]["components"]}
    for part in ("weights", "gradients", "optimizer"):
        assert ranked[part] == states[part] / 2
    assert ranked["activations"] == states["activations"]
    units = [sum(p.numel() for p in u) * 4 for u in fsdp_units(lk.tiny_model("llama"))]   # 2 blocks, then the root
    assert ranked["all-gathered weights"] == units[-1] + 2 * max(units[:-1])   # here: the whole model's weights
    assert ranked["unsharded gradients"] == units[-1] + 2 * max(units[:-1])
    lora = plan(capsys, "tiny-llama", "--world-size", "2", "--shard", "grad-opt")["model"]
    assert "all-gathered weights" not in {c["component"] for c in lora["memory_per_rank"]["components"]}


def test_bad_sharding_flags_are_named(capsys):
    assert main(["plan", "--params", "7B", "--shard", "zero9"]) == 2
    assert "shard" in capsys.readouterr().err
    assert main(["plan", "--params", "7B", "--world-size", "0"]) == 2
    assert "world_size" in capsys.readouterr().err
