"""Helpers shared by the tests."""
import json

import torch


def inputs(model, seed=0, batch=2, length=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.config.vocab_size, (batch, length), generator=g)


def logits(model, x):
    with torch.no_grad():
        out = model(input_ids=x)
    return out.logits


def randomize(model, seed=1, scale=0.1):
    """Give every adapter (and modules_to_save copy) non-trivial values: B starts at zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale + (p if "copies" in name else 0))
    return model


def loss_spans(ex, tok) -> list[str]:
    """An example's loss-bearing tokens (labels equal to their ids), decoded run by run."""
    from lorakit.training.data import IGNORE
    spans, cur = [], []
    for i, t in zip(ex.input_ids, ex.labels):
        if t == IGNORE:
            if cur:
                spans.append(tok.decode(cur))
            cur = []
        else:
            assert t == i
            cur.append(t)
    return spans + ([tok.decode(cur)] if cur else [])


QUESTIONS = [("Where is parcel 7?", ["in the depot", "with the driver", "lost"], 1),
             ("Which code routes a crushed box?", ["CLM-DMG", "DLY-STD", "RET-EXC"], 0),
             ("Is the rate for EU zones 5 EUR?", ["yes", "no"], 0),
             ("Who signs for a parcel?", ["the neighbour", "the recipient", "nobody", "the carrier"], 1),
             ("When do parcels ship?", ["on weekdays", "on Sundays"], 0),
             ("What does DLY mean?", ["delay", "damage", "refund"], 0)]


def write_harness_tasks(folder):
    """Two tiny lm-eval tasks on local JSONL files: lk_mc (multiple_choice, acc) and lk_gen
    (generate_until, exact_match); returns the folder holding lk_mc.yaml and lk_gen.yaml."""
    rows = [{"question": q, "choices": c, "label": y} for q, c, y in QUESTIONS]
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "gen.jsonl").write_text("".join(json.dumps({"question": q, "answer": c[y]}) + "\n" for q, c, y in QUESTIONS))
    common = f"dataset_path: json\ndataset_name: null\ntest_split: train\n"
    (folder / "lk_mc.yaml").write_text(
        f"task: lk_mc\n{common}dataset_kwargs:\n  data_files: {folder / 'mc.jsonl'}\noutput_type: multiple_choice\n"
        "doc_to_text: \"Q: {{question}}\\nA:\"\ndoc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    (folder / "lk_gen.yaml").write_text(
        f"task: lk_gen\n{common}dataset_kwargs:\n  data_files: {folder / 'gen.jsonl'}\noutput_type: generate_until\n"
        "doc_to_text: \"Q: {{question}}\\nA:\"\ndoc_to_target: \" {{answer}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\n  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n")
    return folder
