import pytest

from lorakit import LoraConfig


@pytest.mark.parametrize("kwargs, field", [
    ({"r": 0}, "r"), ({"r": 2.5}, "r"), ({"alpha": 0}, "alpha"), ({"alpha": float("nan")}, "alpha"),
    ({"dropout": 1.0}, "dropout"), ({"dropout": -0.1}, "dropout"), ({"init": "pissa"}, "init"),
    ({"bias": "all"}, "bias"), ({"targets": []}, "targets"), ({"targets": "("}, "targets"),
    ({"modules_to_save": "lm_head"}, "modules_to_save"), ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
])
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"LoraConfig\.{field}"):
        LoraConfig(**kwargs)


def test_scaling_plain_and_rslora():
    assert LoraConfig(r=16, alpha=32).scale_for("x") == 2.0
    assert LoraConfig(r=16, alpha=32, use_rslora=True).scale_for("x") == 8.0   # 32 / sqrt(16)


def test_patterns_use_peft_suffix_rule():
    cfg = LoraConfig(r=8, alpha=16, rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 4})
    assert cfg.rank_for("model.layers.1.self_attn.q_proj") == 2
    assert cfg.rank_for("model.layers.11.self_attn.q_proj") == 8     # suffix must start at a dot
    assert cfg.alpha_for("model.layers.0.self_attn.v_proj") == 4
    assert cfg.scale_for("model.layers.1.self_attn.q_proj") == 8.0  # 16 / 2
