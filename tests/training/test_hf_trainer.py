"""A lorakit model inside transformers' Trainer: it trains, saves as a PEFT folder, and resumes."""
import json
import warnings

import peft
import pytest
import torch
import transformers

import lorakit as lk
from lorakit.models import TINY_VOCAB


class Rows(torch.utils.data.Dataset):
    def __init__(self, n=16, length=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, TINY_VOCAB, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(model, out, steps, **kw):
    args = transformers.TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4,
                                          learning_rate=1e-2, lr_scheduler_type="constant", save_steps=2,
                                          logging_steps=1, report_to=[], seed=0, data_seed=0, use_cpu=True,
                                          **kw)
    return transformers.Trainer(model=model, args=args, train_dataset=Rows())


def _model():
    return lk.inject(lk.tiny_model("llama"), lk.LoraConfig(r=4, alpha=8, targets="all-linear"))


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_trainer_saves_a_peft_folder_that_everyone_loads(tmp_path):
    model = _model()
    _trainer(model, tmp_path / "run", 3).train()
    trainer_out = tmp_path / "saved"
    _trainer(model, tmp_path / "run", 3).save_model(str(trainer_out))
    names = sorted(p.name for p in trainer_out.iterdir())
    assert "adapter_config.json" in names and "adapter_model.safetensors" in names and "config.json" not in names
    assert json.loads((trainer_out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    ids = torch.randint(1, 200, (2, 7))
    expected = _logits(model, ids)
    assert (expected - _logits(lk.tiny_model("llama"), ids)).abs().max() > 1e-3      # it really trained
    theirs = peft.PeftModel.from_pretrained(lk.tiny_model("llama"), trainer_out)
    torch.testing.assert_close(_logits(theirs, ids), expected, atol=1e-5, rtol=0)
    ours = lk.load_adapter(lk.tiny_model("llama"), trainer_out)
    torch.testing.assert_close(_logits(ours, ids), expected, atol=1e-5, rtol=0)


def test_trainer_checkpoint_resumes_to_the_uninterrupted_adapter(tmp_path):
    straight = _model()
    _trainer(straight, tmp_path / "a", 4).train()
    first = _model()
    _trainer(first, tmp_path / "b", 2).train()                       # writes checkpoint-2
    resumed = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(resumed, tmp_path / "b", 4).train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    a = {n: p for n, p in straight.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys() and a
    for n in a:
        torch.testing.assert_close(b[n], a[n], atol=1e-6, rtol=0, msg=n)


def test_transformers_never_loads_the_folder_silently_wrong(tmp_path):
    model = _model()
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    base = tmp_path / "base"
    lk.tiny_model("llama").save_pretrained(base)                        # a plain model saves as one
    assert (base / "config.json").is_file()
    model.config._name_or_path = str(base)
    model.save_pretrained(tmp_path / "adapter")
    auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "adapter")   # through its PEFT integration
    ids = torch.randint(1, 200, (2, 7))
    torch.testing.assert_close(_logits(auto, ids), _logits(model, ids), atol=1e-5, rtol=0)
    merged = lk.merge_and_unload(model)
    merged.save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").is_file() and not (tmp_path / "merged" / "adapter_config.json").exists()


def test_trl_sft_trainer_trains_and_saves_a_peft_folder(tmp_path):
    import datasets
    import trl
    from lorakit.models import tiny_tokenizer

    tok = tiny_tokenizer()
    rows = datasets.Dataset.from_list([{"prompt": f"question {i}?", "completion": f" answer {i}."} for i in range(16)])
    model = _model()
    args = trl.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                         learning_rate=1e-2, report_to=[], use_cpu=True, save_steps=10, logging_steps=1,
                         bf16=False, dataset_num_proc=None)     # bf16 would leave forward wrapped in autocast
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tok)
        trainer.train()
        trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "adapter_config.json").is_file() and not (tmp_path / "saved" / "config.json").exists()
    ids = torch.randint(1, 200, (2, 7))
    expected = _logits(model, ids)
    assert (expected - _logits(lk.tiny_model("llama"), ids)).abs().max() > 1e-3
    theirs = peft.PeftModel.from_pretrained(lk.tiny_model("llama"), tmp_path / "saved")
    torch.testing.assert_close(_logits(theirs, ids), expected, atol=1e-5, rtol=0)
    ours = lk.load_adapter(lk.tiny_model("llama"), tmp_path / "saved")
    torch.testing.assert_close(_logits(ours, ids), expected, atol=1e-5, rtol=0)
