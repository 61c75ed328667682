"""Every architecture a PEFT user brings, against peft itself: tiny random models of each.

For each case (`tests/zoo/architectures.py`): lorakit's `all-linear` is peft's module set; LoRA and
DoRA adapters move both ways through files with equal outputs (1e-5) and no missing or unexpected
tensor; merging equals the unmerged forward. MoE models: the linear layers match peft's, and the
fused experts peft adds through `target_parameters` are refused loudly, not silently.
"""
import warnings

import peft
import pytest
import torch

import lorakit as lk
from lorakit.inject import adapter_layers, configs
from lorakit.targets import resolve
from tests.zoo.architectures import CASES

MOE = {"mixtral", "qwen3_moe"}                        # peft's all-linear adds target_parameters on these
FUSED_EXPERTS = MOE | {"qwen2_moe"}                   # 3-D expert weights


def _run(case, model, ids):
    kw = {"decoder_input_ids": ids} if case.task == "SEQ_2_SEQ_LM" else {}
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def _ids(seed=0):
    return torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(seed))


def _peft_modules(pm) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
            if hasattr(m, "lora_A") and not n.endswith("base_layer") and len(m.lora_A)}


def _peft_config(case, dora, targets="all-linear"):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=dora, task_type=case.task)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_all_linear_is_peft_all_linear(case):
    """The same modules, and on MoE models the same target_parameters and rank/alpha patterns."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(case.build(), _peft_config(case, False))
        ours = lk.inject(case.build(), lk.LoraConfig(r=4, alpha=8, targets="all-linear"))
    assert {n for n, _ in adapter_layers(ours)} == _peft_modules(pm)
    theirs_cfg, ours_cfg = pm.peft_config["default"], configs(ours)["default"]
    assert set(theirs_cfg.target_parameters or []) == set(ours_cfg.target_parameters or [])
    if case.name in MOE:
        assert ours_cfg.rank_pattern == dict(theirs_cfg.rank_pattern)
        assert ours_cfg.alpha_pattern == dict(theirs_cfg.alpha_pattern)
    assert lk.trainable_report(ours).trainable == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    if case.name in FUSED_EXPERTS - MOE:    # fused experts that peft's all-linear leaves out: said loudly
        with pytest.warns(UserWarning, match="fused expert weights .* are not adapted"):
            lk.inject(case.build(), lk.LoraConfig(r=2, targets="all-linear"))


def _randomize_peft(pm, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_adapters_move_both_ways_with_peft(tmp_path, case, dora):
    if dora and case.name in MOE:      # DoRA on raw expert parameters: peft refuses, and so does lorakit
        with pytest.raises(ValueError, match="does not work with use_dora"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft.get_peft_model(case.build(), _peft_config(case, True))
        with pytest.raises(ValueError, match="target_parameters.*no DoRA"):
            lk.inject(case.build(), lk.LoraConfig(r=4, alpha=8, targets="all-linear", use_dora=True))
        return
    ids = _ids()
    # lorakit -> peft
    model = case.build()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets="all-linear", use_dora=dora))
    for p in model.parameters():
        if p.requires_grad:
            p.data.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    ours = _run(case, model, ids)
    lk.save_adapter(model, tmp_path / "ours")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(case.build(), tmp_path / "ours").eval()
    assert not [str(w.message) for w in caught if "missing" in str(w.message).lower()
                or "unexpected" in str(w.message).lower()]
    if case.name in MOE:
        assert theirs.peft_config["default"].target_parameters
    torch.testing.assert_close(_run(case, theirs, ids), ours, atol=1e-5, rtol=0)
    # merged equals unmerged
    lk.merge(model)
    torch.testing.assert_close(_run(case, model, ids), ours, atol=1e-5, rtol=0)
    # peft -> lorakit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(case.build(), _peft_config(case, dora))
    _randomize_peft(pm)
    expected = _run(case, pm.eval(), ids)
    pm.save_pretrained(tmp_path / "theirs")
    loaded = lk.load_adapter(case.build(), tmp_path / "theirs")
    torch.testing.assert_close(_run(case, loaded, ids), expected, atol=1e-5, rtol=0)


def test_a_classifier_head_adapted_but_not_saved_is_refused_at_save(tmp_path):
    model = lk.tiny_model("bert")
    lk.inject(model, lk.LoraConfig(r=2, targets=["query", "value", "classifier"]))   # LoRA on the head itself
    with pytest.raises(lk.AdapterFormatError, match=r"head \['classifier'\] is not in modules_to_save"):
        lk.save_adapter(model, tmp_path)
    assert not list(tmp_path.iterdir())                                             # nothing written


@pytest.mark.parametrize("name", ["bert-cls", "llama-cls"])
def test_a_classifier_saves_its_head_as_peft_does(tmp_path, name):
    from tests.zoo.architectures import BY_NAME
    case = BY_NAME[name]
    model = lk.inject(case.build(), lk.LoraConfig(r=2, targets="qv"))
    lk.save_adapter(model, tmp_path)
    cfg = __import__("json").loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier", "score"]


def test_auto_peft_model_finds_a_local_base_offline(tmp_path):
    base = tmp_path / "base"
    lk.tiny_model("llama").save_pretrained(base)
    model, _ = lk.load_base(base)
    lk.inject(model, lk.LoraConfig(r=2, targets="qv"))
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    lk.save_adapter(model, tmp_path / "adapter")
    cfg = __import__("json").loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base.resolve())
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    ids = _ids()
    torch.testing.assert_close(theirs(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_the_embedded_base_is_named_by_its_hub_id():
    from lorakit.models import EMBEDDED, base_reference, same_base
    model = lk.tiny_model("llama")
    model.config._name_or_path = EMBEDDED
    assert base_reference(model) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert same_base("HuggingFaceTB/SmolLM2-135M-Instruct", EMBEDDED) and not same_base("org/other", EMBEDDED)


def test_the_readme_table_is_the_generated_one():
    from pathlib import Path

    from tests.zoo.table import BEGIN, END, block
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert BEGIN in readme and END in readme, "README.md lacks the architecture table's markers"
    current = BEGIN + readme.split(BEGIN, 1)[1].split(END, 1)[0] + END
    assert current == block(), "README's architecture table is stale: run `python -m tests.zoo.table --write`"


def test_training_an_encoder_decoder_is_refused_with_what_to_do(tmp_path):
    from lorakit.models import tiny_tokenizer
    from lorakit.training.run import split_kwargs, train_model
    from tests.zoo.architectures import BY_NAME
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    cfg, method = split_kwargs({"data": str(data), "out": str(tmp_path / "o"), "steps": 1})
    with pytest.raises(ValueError, match="encoder-decoder model: lorakit's trainer builds decoder-only rows"):
        train_model(BY_NAME["t5"].build(), tiny_tokenizer(), cfg, method)


def _tiny_mixtral():
    from lorakit.models import TINY_VOCAB
    from tests.zoo.architectures import BY_NAME, Case
    c = BY_NAME["mixtral"]
    return Case(c.name, c.config, c.model, dict(c.values, vocab_size=TINY_VOCAB)).build()


def test_training_a_tiny_mixtral_moves_the_expert_adapters_and_nothing_else(tmp_path):
    from lorakit.models import tiny_tokenizer
    from lorakit.training.run import split_kwargs, train_model
    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"prompt": "q{i}", "completion": "answer {i}"}}\n' for i in range(8)))
    model = _tiny_mixtral()
    base = {id(p): (n, p.detach().clone()) for n, p in model.named_parameters()}     # the same objects after wrapping
    cfg, method = split_kwargs({"data": str(data), "out": str(tmp_path / "o"), "steps": 10, "batch_size": 4,
                                "lr": 1e-2, "warmup": 0, "r": 2, "targets": "all-linear"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = train_model(model, tiny_tokenizer(), cfg, method)
    assert summary["steps"] == 10
    params = list(model.parameters())
    moved = [base[id(p)][0] for p in params if id(p) in base and not torch.equal(p.detach(), base[id(p)][1])]
    assert not moved, moved                                    # no base weight moved
    assert len([p for p in params if id(p) not in base]) > 0   # the adapters are new parameters
    experts = {n: l for n, l in adapter_layers(model) if n.endswith("mlp.experts")}
    assert experts and all(l.adapters["default"][p].B.abs().sum() > 0 for l in experts.values() for p in l.params())
    loaded = lk.load_adapter(_tiny_mixtral(), tmp_path / "o" / "adapter")
    ids = torch.randint(1, 100, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_the_planner_counts_expert_adapters_exactly():
    from lorakit.plan import plan_model
    model = _tiny_mixtral()
    config = model.config
    config.architectures = [type(model).__name__]
    planned = plan_model("tiny-mixtral", lk.LoraConfig(r=4, targets="all-linear"), config=config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(_tiny_mixtral(), peft.LoraConfig(r=4, target_modules="all-linear"))
    real = lk.trainable_report(lk.inject(_tiny_mixtral(), lk.LoraConfig(r=4, targets="all-linear"))).trainable
    assert planned["parameters"]["trainable"] == real == sum(p.numel() for p in pm.parameters() if p.requires_grad)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_preset_takes_exactly_the_roles_it_names(case):
    from lorakit.targets import PRESET_ROLES, TargetError, linear_names, role
    model = case.build()
    for preset, roles in PRESET_ROLES.items():
        want = [n for n in linear_names(model) if role(n) in roles]
        if want:
            assert resolve(model, preset) == want, preset
        else:
            with pytest.raises(TargetError, match=f"targets '{preset}' matched no linear module"):
                resolve(model, preset)
    attention = [n for n in linear_names(model) if role(n) in PRESET_ROLES["attention"]]
    assert attention, "every architecture here has attention projections with known roles"
