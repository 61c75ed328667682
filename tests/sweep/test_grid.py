import pytest

from lorakit.sweep import GridError, expand, load
from lorakit.sweep.grid import run_id


def test_cross_product_in_file_order_with_fixed_settings():
    runs = expand({"grid": {"r": [4, 16], "targets": ["qv", "all-linear"]}, "fixed": {"steps": 5, "kl_base": 3}})
    assert [(c["r"], c["targets"]) for c in runs] == [(4, "qv"), (4, "all-linear"), (16, "qv"), (16, "all-linear")]
    assert all(c["steps"] == 5 and c["kl_base"] == 3 for c in runs)


def test_alpha_policies():
    grid = {"grid": {"r": [4, 16]}}
    assert [c["alpha"] for c in expand({**grid, "fixed": {"alpha": 32}})] == [32, 32]             # fixed-alpha
    assert [c["alpha"] for c in expand(grid, "fixed-ratio")] == [8, 32]                           # 2r by default
    assert [c["alpha"] for c in expand({**grid, "fixed": {"alpha_ratio": 1}}, "fixed-ratio")] == [4, 16]
    rs = expand({**grid, "alpha_policy": "rslora"})
    assert all(c["use_rslora"] for c in rs) and "alpha" not in rs[0]                              # LoraConfig's default
    assert [c["alpha"] for c in expand({"grid": {"r": [4], "alpha_ratio": [1, 4]}}, "fixed-ratio")] == [4, 16]


def test_yaml_numbers_and_explicit_runs(tmp_path):
    path = tmp_path / "grid.yaml"
    # YAML 1.1 reads 2e-3 as a string; the grid takes it as the number
    path.write_text("grid:\n  lr: [2e-3, 1.0e-4]\nruns:\n  - {method: dora, r: 8}\n"
                    "  - {targets: [q_proj, v_proj]}\nfixed:\n  steps: 3\n  warmup: 1e-1\n")
    runs = expand(load(path))
    assert [c.get("lr") for c in runs] == [2e-3, 1e-4, None, None]
    assert runs[2]["method"] == "dora" and runs[3]["targets"] == ["q_proj", "v_proj"]     # a run: one value per key
    assert [c["targets"] for c in expand({"grid": {"targets": [["q_proj", "v_proj"], "qv"]}})] == [
        ["q_proj", "v_proj"], "qv"]                                                          # an axis: a list of values
    assert all(c["warmup"] == 0.1 for c in runs)


def test_input_adapters_drop_lora_settings_and_duplicates():
    runs = expand({"grid": {"method": ["lora", "prompt"], "r": [4, 16], "num_virtual_tokens": [10]}})
    assert [(c["method"], c.get("r"), c.get("num_virtual_tokens")) for c in runs] == [
        ("lora", 4, None), ("lora", 16, None), ("prompt", None, 10)]


@pytest.mark.parametrize("spec, key", [
    ({"grid": {"rank": [4]}}, "rank"),                                      # unknown axis
    ({"grid": {"r": [4, "big"]}}, "grid.r[1]"),                             # bad value
    ({"grid": {"r": [0]}}, "grid.r[0]"),
    ({"grid": {"dropout": [1.5]}}, "grid.dropout[0]"),
    ({"grid": {"method": ["full"]}}, "grid.method[0]"),
    ({"grid": {"quantize": ["int3"]}}, "grid.quantize[0]"),
    ({"grid": {"targets": [""]}}, "grid.targets[0]"),
    ({"grid": {"lr": ["fast"]}}, "grid.lr[0]"),
    ({"grid": {"steps": [5]}}, "steps"),                                    # a flag, but not an axis
    ({"grid": {"r": []}}, "grid.r"),                                        # empty axis
    ({"grid": {}}, "empty"),                                                # empty grid
    ({}, "empty"),
    ({"grdi": {"r": [4]}}, "grdi"),                                         # unknown top-level key
    ({"grid": {"r": [4]}, "fixed": {"stpes": 3}}, "stpes"),
    ({"grid": {"r": [4]}, "fixed": {"data": "x.jsonl"}}, "data"),
    ({"grid": {"r": [4]}, "fixed": {"use_rslora": True}}, "use_rslora"),
    ({"grid": {"r": [4]}, "fixed": {"r": 8}}, "grid.r"),                    # in both places
    ({"runs": [{"r": 4, "colour": "red"}]}, "runs[0].colour"),
    ({"runs": [{"r": 4, "alpha": 8}], "alpha_policy": "fixed-ratio"}, "alpha"),
    ({"grid": {"r": [4]}, "alpha_policy": "sqrt"}, "alpha_policy"),
    ({"grid": {"r": [4]}, "fixed": {"batch_size": 0}}, "batch_size"),       # caught by the configs themselves
])
def test_bad_input_names_the_key(spec, key):
    with pytest.raises(GridError, match=key.replace("[", r"\[").replace("]", r"\]")):
        expand(spec)


def test_bad_file(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(GridError, match="expected a mapping"):
        load(path)


def test_run_ids_are_stable_and_distinct():
    a, b = expand({"grid": {"r": [4, 16]}})
    ctx = {"model": "tiny-llama", "data": "abc"}
    assert run_id(a, ctx) == run_id(dict(reversed(list(a.items()))), dict(ctx))
    assert run_id(a, ctx) != run_id(b, ctx) != run_id(b, {**ctx, "data": "abd"})
    assert run_id(a, ctx).startswith("lora-r4-all-linear-lr")
