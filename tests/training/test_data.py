import json

import pytest
import torch

from lorakit.models import tiny_model, tiny_tokenizer
from lorakit.training.data import IGNORE, DataError, collate, collate_packed, load_dataset, pack, read_rows, tokenize
from tests.helpers import loss_spans


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _loss_text(ex, tok):
    return tok.decode([t for t in ex.labels if t != IGNORE])


def test_prompt_completion_masks_all_but_the_completion(tok):
    ex, cut = tokenize({"prompt": "Route: parcel crushed. Code:", "completion": " CLM-STD"}, tok)
    assert not cut
    assert _loss_text(ex, tok) == " CLM-STD<|im_end|>"          # completion + EOS, nothing else
    n_prompt = len(tok("Route: parcel crushed. Code:")["input_ids"])
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]


def test_messages_mask_everything_but_assistant_turns(tok):
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Code?"},
                        {"role": "assistant", "content": "RET-STD"}]}
    ex, _ = tokenize(row, tok)
    full = tok.apply_chat_template(row["messages"], tokenize=False)
    assert tok.decode(ex.input_ids) == full                      # the ids are the rendered conversation
    assert loss_spans(ex, tok) == ["Hello!<|im_end|>\n", "RET-STD<|im_end|>\n"]


def _write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"prompt": "a", "completion": "b"})
BAD = {
    "invalid json": ('{"prompt": "a", ', r"data\.jsonl:2: invalid JSON"),
    "missing key": (json.dumps({"prompt": "a"}), r"data\.jsonl:2: missing key 'completion'"),
    "empty completion": (json.dumps({"prompt": "a", "completion": "  "}), r"data\.jsonl:2: empty completion"),
    "unknown role": (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), r"data\.jsonl:2: messages\[0\] has unknown role 'bot'"),
    "no assistant": (json.dumps({"messages": [{"role": "user", "content": "x"}]}), r"data\.jsonl:2: 'messages' has no assistant turn"),
    "empty reply": (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}),
                    r"data\.jsonl:2: messages\[1\] is an empty assistant reply"),
    "not an object": ("[1, 2]", r"data\.jsonl:2: expected a JSON object, found list"),
    "wrong type": (json.dumps({"prompt": 3, "completion": "b"}), r"data\.jsonl:2: 'prompt' and 'completion' must both be strings or both be message lists"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_rows_name_file_and_line(tmp_path, case):
    line, pattern = BAD[case]
    path = _write(tmp_path, [GOOD, line, GOOD])
    with pytest.raises(DataError, match=pattern):
        read_rows(path)
    rows, bad = read_rows(path, skip_bad_rows=True)
    assert len(rows) == 2 and bad[0]["line"] == 2 and bad[0]["error"]


def test_truncation_is_counted_and_rows_without_labels_dropped(tmp_path, tok):
    path = _write(tmp_path, [json.dumps({"prompt": "x" * 50, "completion": "yy"}),
                             json.dumps({"prompt": "x" * 5, "completion": "y" * 40})])
    ds = load_dataset(path, tok, max_len=20)
    assert ds.truncated == 2 and ds.dropped == 1 and len(ds) == 1 and len(ds.examples[0].input_ids) == 20


def test_padding_batch(tok):
    a, _ = tokenize({"prompt": "ab", "completion": "c"}, tok)
    b, _ = tokenize({"prompt": "abcdef", "completion": "gh"}, tok)
    batch = collate([a, b], tok.pad_token_id)
    assert batch["input_ids"].shape == (2, len(b.input_ids))
    assert batch["attention_mask"][0].tolist() == [1] * len(a.input_ids) + [0] * (len(b.input_ids) - len(a.input_ids))
    assert (batch["labels"][0, len(a.input_ids):] == IGNORE).all()


def test_packed_examples_do_not_see_each_other(tok):
    model = tiny_model("llama")
    exs = [tokenize({"prompt": p, "completion": c}, tok)[0] for p, c in [("hello", " a"), ("abc", " bb"), ("xyzzy!", " c")]]
    packed = pack(exs, max_len=64)
    assert len(packed) == 1 and sorted(packed[0].position_ids).count(0) == 3
    batch = collate_packed(packed, tok.pad_token_id)
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        offset = 0
        for e in sorted(exs, key=lambda e: -len(e.input_ids)):     # pack() orders longest first
            alone = model(input_ids=torch.tensor([e.input_ids])).logits[0]
            torch.testing.assert_close(together[offset:offset + len(e.input_ids)], alone, atol=1e-5, rtol=0)
            offset += len(e.input_ids)


def test_kl_text_rows_carry_no_loss_and_are_kept(tmp_path, tok):
    ex, _ = tokenize({"kl_text": "General prose."}, tok)
    assert ex.n_labels == 0 and tok.decode(ex.input_ids) == "General prose."
    path = _write(tmp_path, [json.dumps({"kl_text": "Some prose."}), GOOD])
    ds = load_dataset(path, tok)
    assert len(ds) == 2 and ds.kl_rows == 1 and ds.dropped == 0
    with pytest.raises(DataError, match=r"data\.jsonl:1: empty 'kl_text'"):
        read_rows(_write(tmp_path, [json.dumps({"kl_text": " "})]))


def test_kl_data_file_adds_context_rows_after_the_training_rows(tmp_path, tok):
    train = _write(tmp_path, [GOOD])
    kl = tmp_path / "prose.jsonl"
    kl.write_text(json.dumps({"text": "Some prose."}) + "\n")
    ds = load_dataset(train, tok, kl_data=kl)
    assert len(ds) == 2 and ds.kl_rows == 1 and ds.examples[1].n_labels == 0
    kl.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    with pytest.raises(DataError, match=r"prose\.jsonl:1: --kl-data .* takes text or kl_text rows, found a prompt-completion row"):
        load_dataset(train, tok, kl_data=kl)


ROWS = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}, {"prompt": "p3", "completion": ""}]


def _write_table(kind, tmp_path, rows):
    import datasets
    table = datasets.Dataset.from_list(rows)
    if kind == "parquet":
        path = tmp_path / "rows.parquet"
        table.to_parquet(str(path))
    elif kind == "csv":
        path = tmp_path / "rows.csv"
        table.to_csv(str(path), index=False)
    elif kind == "save_to_disk":
        path = tmp_path / "rows"
        table.save_to_disk(str(path))
    else:
        path = tmp_path / "rows.json"
        path.write_text(json.dumps(rows))
    return path


@pytest.mark.parametrize("kind", ["parquet", "csv", "save_to_disk", "json"])
def test_columnar_files_read_through_datasets_and_name_a_bad_row(tmp_path, kind):
    path = _write_table(kind, tmp_path, ROWS[:2])
    rows, bad = read_rows(path)
    assert rows == ROWS[:2] and bad == []
    (tmp_path / "bad").mkdir()
    path = _write_table(kind, tmp_path / "bad", ROWS)
    empty = "empty completion"
    with pytest.raises(DataError, match=rf":row 3: {empty}"):
        read_rows(path)
    rows, bad = read_rows(path, skip_bad_rows=True)
    assert rows == ROWS[:2] and [b["row"] for b in bad] == [3] and bad[0]["error"].startswith(empty)


def test_files_that_are_not_data_get_a_message_not_a_traceback(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes('{"prompt": "caf\\u00e9", "completion": "ok"}\n'.encode() + "{\"prompt\": \"café\"}\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"rows.jsonl:2: not UTF-8 text"):
        read_rows(path)
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="is a folder with no data files .* and not a `datasets` save_to_disk folder"):
        read_rows(tmp_path / "folder")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(DataError, match="not a readable parquet file"):
        read_rows(broken)


def test_the_dataset_says_what_it_read(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"kl_text": "some prose"}\n'
                    '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    ds = load_dataset(path, tiny_tokenizer(), max_len=64)
    assert ds.formats == {"prompt-completion": 1, "kl-text": 1, "messages": 1}
    assert ds.tokens == sum(len(e.input_ids) for e in ds.examples) and 0 < ds.loss_tokens < ds.tokens
    line = ds.describe()
    assert "3 rows" in line and "prompt-completion x1, kl-text x1, messages x1" in line and f"{ds.loss_tokens:,} carry loss" in line


def test_a_parquet_file_trains_end_to_end(tmp_path):
    import lorakit as lk
    path = _write_table("parquet", tmp_path, [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(8)])
    summary = lk.train(model="tiny-llama", data=str(path), out=str(tmp_path / "run"), steps=2, batch_size=4, r=2)
    assert summary["steps"] == 2 and summary["data"]["rows"] == 8
