"""Every row shape lorakit trains on, from every kind of file, with exactly which tokens carry loss.

Where TRL's SFTTrainer can build the masks itself (text, prompt-completion in both forms, and
messages / ShareGPT / tool turns with `assistant_only_loss` on a template carrying
`{% generation %}` marks), TRL's own tokenization of the same rows is the oracle.
"""
import json
import warnings

import pytest
import torch

import lorakit as lk
from lorakit.cli import main
from lorakit.models import CHATML, TURN, tiny_model, tiny_tokenizer
from lorakit.training.data import IGNORE, DataError, load_dataset
from lorakit.training.rows import read_rows
from tests.helpers import loss_spans

TOOLS = [{"type": "function", "function": {"name": "get_rate", "description": "Shipping rate for a zone",
                                           "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}}]
CALL = {"type": "function", "function": {"name": "get_rate", "arguments": {"zone": "EU"}}}
CALL_TEXT = '<tool_call>\n{"name": "get_rate", "arguments": {"zone": "EU"}}\n</tool_call><|im_end|>\n'


def _parts(text):
    return [{"type": "text", "text": text[:3]}, {"type": "text", "text": text[3:]}]


# shape -> (two rows, the loss-bearing text of the first row, span by span, and its label in Dataset.formats)
SHAPES = {
    "prompt-completion": ([{"prompt": "Route: parcel crushed. Code:", "completion": " CLM-STD"},
                           {"prompt": "Route: late. Code:", "completion": " DLY-STD"}],
                          [" CLM-STD<|im_end|>"], "prompt-completion"),
    "messages": ([{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Code?"},
                                {"role": "assistant", "content": "RET-STD"}]},
                  {"messages": [{"role": "user", "content": "Late?"}, {"role": "assistant", "content": "DLY-STD"}]}],
                 ["Hello!<|im_end|>\n", "RET-STD<|im_end|>\n"], "messages"),
    "text": ([{"text": "Parcels ship on weekdays."}, {"text": "Claims need a photo."}],
             ["Parcels ship on weekdays.<|im_end|>"], "text"),
    "alpaca": ([{"instruction": "Route this ticket", "input": "parcel crushed", "output": "CLM-STD"},
                {"instruction": "Route: parcel late", "output": "DLY-STD"}],
               ["CLM-STD<|im_end|>\n"], "alpaca"),
    "sharegpt": ([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
                  {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Code?"},
                                     {"from": "gpt", "value": "RET-STD"}]}],
                 ["Hello!<|im_end|>\n"], "sharegpt"),
    "conversational prompt-completion": (
        [{"prompt": [{"role": "user", "content": "Code?"}], "completion": [{"role": "assistant", "content": "RET-STD"}]},
         {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Late?"}],
          "completion": [{"role": "assistant", "content": "DLY-STD"}]}],
        ["RET-STD<|im_end|>\n"], "prompt-completion"),
    "content parts": ([{"messages": [{"role": "user", "content": _parts("Hello there")},
                                     {"role": "assistant", "content": _parts("Hello!")}]},
                       {"messages": [{"role": "user", "content": _parts("Code?")},
                                     {"role": "assistant", "content": _parts("RET-STD")}]}],
                      ["Hello!<|im_end|>\n"], "messages"),
    "tool turns": ([{"messages": [{"role": "user", "content": "Rate for EU?"},
                                  {"role": "assistant", "content": "", "tool_calls": [CALL]},
                                  {"role": "tool", "content": "5 EUR"},
                                  {"role": "assistant", "content": "The EU rate is 5 EUR."}], "tools": TOOLS},
                    {"messages": [{"role": "user", "content": "Rate?"},
                                  {"role": "assistant", "content": "", "tool_calls": [CALL]},
                                  {"role": "tool", "content": "5 EUR"},
                                  {"role": "assistant", "content": "5 EUR."}], "tools": TOOLS}],
                   [CALL_TEXT, "The EU rate is 5 EUR.<|im_end|>\n"], "messages"),
}
FLAT = ("prompt-completion", "text", "alpaca")          # string columns: CSV can hold them
KINDS = ("jsonl", "json", "parquet", "save_to_disk", "shards", "csv")
CASES = [(s, k) for s in SHAPES for k in KINDS if k != "csv" or s in FLAT]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write(kind, folder, rows):
    """`rows` as a file (or folder) of `kind`; returns what --data names."""
    import datasets
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "jsonl":
        path = folder / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path = folder / "rows.json"
        path.write_text(json.dumps(rows))
    elif kind == "shards":
        path = folder / "shards"
        path.mkdir()
        for i, row in enumerate(rows):                          # one row per shard, read in name order
            (path / f"part-{i:05d}.jsonl").write_text(json.dumps(row) + "\n")
    else:
        table = datasets.Dataset.from_list(rows)
        path = folder / {"parquet": "rows.parquet", "csv": "rows.csv", "save_to_disk": "rows"}[kind]
        {"parquet": table.to_parquet, "csv": lambda p: table.to_csv(p, index=False),
         "save_to_disk": table.save_to_disk}[kind](str(path))
    return path


@pytest.mark.parametrize("shape,kind", CASES, ids=[f"{s}-{k}" for s, k in CASES])
def test_each_shape_and_file_kind_puts_loss_on_exactly_these_tokens(tmp_path, tok, shape, kind):
    rows, spans, label = SHAPES[shape]
    ds = load_dataset(write(kind, tmp_path, rows), tok, max_len=512)
    assert ds.formats == {label: 2} and len(ds) == 2 and not ds.bad_rows
    assert loss_spans(ds.examples[0], tok) == spans
    reference = load_dataset(write("jsonl", tmp_path / "ref", rows), tok, max_len=512)
    assert [ds.examples[i] for i in range(2)] == [reference.examples[i] for i in range(2)]   # same tokens, any file


def load_dataset_rows(rows, tok, **kw):
    """`rows` through a JSONL file in a fresh temporary folder."""
    import tempfile
    from pathlib import Path
    return load_dataset(write("jsonl", Path(tempfile.mkdtemp()), rows), tok, **kw)


def test_text_rows_carry_loss_on_every_token(tok):
    ex = load_dataset_rows([{"text": "General prose."}], tok).examples[0]
    assert ex.labels == ex.input_ids and tok.decode(ex.input_ids) == "General prose.<|im_end|>"


def test_content_parts_train_like_the_same_text_as_strings(tok):
    parts = load_dataset_rows(SHAPES["content parts"][0], tok)
    plain = [{"messages": [m | {"content": "".join(p["text"] for p in m["content"])} for m in r["messages"]]}
             for r in SHAPES["content parts"][0]]
    assert list(parts.examples) == list(load_dataset_rows(plain, tok).examples)


def test_alpaca_without_a_chat_template_uses_the_alpaca_prompt(tok):
    bare = tiny_tokenizer()
    bare.chat_template = None
    ex = load_dataset_rows(SHAPES["alpaca"][0][:1], bare).examples[0]
    assert tok.decode(ex.input_ids).startswith("Below is an instruction that describes a task, paired with an input")
    assert "### Input:\nparcel crushed\n\n### Response:\n" in bare.decode(ex.input_ids)
    assert loss_spans(ex, bare) == ["CLM-STD<|im_end|>"]


# ---------------------------------------------------------------------------------------------
# TRL's own tokenization as the oracle
def marked_tokenizer():
    """The tiny tokenizer with {% generation %} marks around each assistant turn, which TRL's
    assistant_only_loss needs; it renders exactly the same text."""
    tok = tiny_tokenizer()
    turn = "<|im_start|>assistant\n" + TURN
    assert turn in CHATML
    tok.chat_template = CHATML.replace(turn, "<|im_start|>assistant\n{% generation %}" + TURN + "{% endgeneration %}")
    return tok


def trl_labels(rows, tok, assistant_only_loss):
    import datasets
    import trl
    args = trl.SFTConfig(output_dir="/tmp/lorakit-trl-oracle", report_to=[], use_cpu=True, bf16=False,
                         dataset_num_proc=None, assistant_only_loss=assistant_only_loss, max_length=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.SFTTrainer(model=tiny_model("llama"), args=args, processing_class=tok,
                                 train_dataset=datasets.Dataset.from_list(rows))
    return [(list(r["input_ids"]), list(r["labels"])) for r in trainer.train_dataset]


def ours(rows, tok):
    return [(e.input_ids, e.labels) for e in load_dataset_rows(rows, tok).examples]


SHAREGPT_AS_TRL = [{"conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello!"}]}]


def trl_chatml(rows):
    """ShareGPT rows through TRL's own converter (its assistant_only_loss check runs before its map)."""
    import copy
    import trl
    return [trl.maybe_convert_to_chatml(copy.deepcopy(r)) for r in rows]
TRL_CASES = {          # case -> (rows TRL reads, TRL's assistant_only_loss)
    "text": (SHAPES["text"][0], False),
    "prompt-completion": (SHAPES["prompt-completion"][0], False),
    "conversational prompt-completion": (SHAPES["conversational prompt-completion"][0], False),
    "messages": (SHAPES["messages"][0], True),
    "sharegpt": (SHAREGPT_AS_TRL, True),          # TRL keeps `from` as the role: write user/assistant
    "tool turns": (SHAPES["tool turns"][0], True),
}


@pytest.mark.parametrize("case", list(TRL_CASES))
def test_masks_equal_trl_sft_trainers_own(case):
    rows, assistant_only = TRL_CASES[case]
    marked = marked_tokenizer()
    expected = trl_labels(trl_chatml(rows) if case == "sharegpt" else rows, marked, assistant_only)
    assert ours(rows, marked) == expected                        # the template's marks, as TRL reads them
    assert ours(rows, tiny_tokenizer()) == expected              # turns rendered prefix by prefix, no marks


def test_alpaca_equals_trl_on_the_conversational_row_it_stands_for():
    row = SHAPES["alpaca"][0][0]
    pc = {"prompt": [{"role": "user", "content": f"{row['instruction']}\n\n{row['input']}"}],
          "completion": [{"role": "assistant", "content": row["output"]}]}
    assert ours([row], tiny_tokenizer()) == trl_labels([pc], tiny_tokenizer(), False)


# ---------------------------------------------------------------------------------------------
# the twelve shapes train, through `lorakit train` and `lorakit.train`
TWELVE = [(s, "jsonl") for s in SHAPES] + [("prompt-completion", "csv"), ("messages", "json"),
                                           ("conversational prompt-completion", "parquet"), ("text", "save_to_disk")]


@pytest.mark.parametrize("shape,kind", TWELVE, ids=[f"{s}-{k}" for s, k in TWELVE])
def test_each_shape_trains_through_the_cli_and_the_api(tmp_path, shape, kind, capsys):
    rows, _, label = SHAPES[shape]
    data = write(kind, tmp_path, rows * 2)
    common = dict(model="tiny-llama", steps=2, batch_size=2, r=2, progress=False)
    summary = lk.train(data=str(data), out=str(tmp_path / "api"), **common)
    assert summary["steps"] == 2 and summary["data"]["formats"] == {label: 4} and summary["final_loss"] > 0
    code = main(["train", "--model", "tiny-llama", "--data", str(data), "--out", str(tmp_path / "cli"), "--steps", "2",
                 "--batch-size", "2", "--r", "2", "--no-progress", "--no-bf16"])   # the API's default precision
    captured = capsys.readouterr()
    assert code == 0 and f"{label} x4" in captured.err and "precision: fp32 (as asked" in captured.err
    assert json.loads(captured.out)["final_loss"] == pytest.approx(summary["final_loss"], rel=1e-6)


# ---------------------------------------------------------------------------------------------
# bad rows, per file kind: named by file and row, no traceback
BAD_ROWS = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": " "}, {"prompt": "p3", "completion": "c3"}]
WHERE = {"jsonl": "rows.jsonl:2", "json": "rows.json:row 2", "parquet": "rows.parquet:row 2",
         "save_to_disk": "rows:row 2", "shards": "part-00001.jsonl:1", "csv": "rows.csv:row 2"}


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_row_is_named_by_file_and_row(tmp_path, kind, capsys):
    data = write(kind, tmp_path, BAD_ROWS)
    what = "empty completion"
    with pytest.raises(DataError, match=WHERE[kind].replace(".", r"\.") + f": {what}"):
        read_rows(data)
    code = main(["train", "--model", "tiny-llama", "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "1",
                 "--r", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and WHERE[kind] in err and what in err and "Traceback" not in err
    rows, bad = read_rows(data, skip_bad_rows=True)
    assert len(rows) == 2 and len(bad) == 1 and bad[0]["file"].endswith(WHERE[kind].rsplit(":", 1)[0])


def test_a_row_the_chat_template_cannot_render_is_named(tmp_path):
    plain = tiny_tokenizer()                  # a ChatML template that knows nothing of tools
    plain.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                           "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    calls = {"messages": SHAPES["tool turns"][0][0]["messages"]}
    data = write("jsonl", tmp_path, [SHAPES["messages"][0][1], calls, SHAPES["tool turns"][0][0]])
    with pytest.raises(DataError, match=r"rows\.jsonl:2: the chat template drops tool_calls \(message 1 calls 'get_rate'"):
        load_dataset(data, plain)
    with pytest.raises(DataError, match=r"rows\.jsonl:1: the chat template does not render 'tools'"):
        load_dataset(write("jsonl", tmp_path / "t", [SHAPES["tool turns"][0][0]]), plain)
    ds = load_dataset(data, plain, skip_bad_rows=True)
    assert len(ds) == 1 and [b["line"] for b in ds.bad_rows] == [2, 3]
    strict = tiny_tokenizer()
    strict.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(DataError, match=r"rows\.jsonl:1: the chat template cannot render this row .*must alternate"):
        load_dataset(data, strict)


def test_rows_of_no_known_shape_say_what_is_accepted(tmp_path):
    data = write("jsonl", tmp_path, [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"rows\.jsonl:1: no known row shape in keys \['answer', 'question'\].*--columns"):
        read_rows(data)
    bad_part = [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                              {"role": "assistant", "content": "a"}]}]
    with pytest.raises(DataError, match=r"messages\[0\]\.content\[0\] is a image_url part"):
        read_rows(write("jsonl", tmp_path / "img", bad_part))


# ---------------------------------------------------------------------------------------------
# --format and --columns
def test_columns_map_other_names_and_format_forces_a_shape(tmp_path, tok, capsys):
    data = write("csv", tmp_path, [{"question": "Route: crushed. Code:", "answer": " CLM-STD"}] * 4)
    summary = lk.train(model="tiny-llama", data=str(data), out=str(tmp_path / "run"), steps=1, batch_size=2, r=2,
                       columns="prompt=question,completion=answer", progress=False)
    assert summary["data"]["formats"] == {"prompt-completion": 4}
    ds = load_dataset(data, tok, columns={"prompt": "question", "completion": "answer"})
    assert loss_spans(ds.examples[0], tok) == [" CLM-STD<|im_end|>"]
    with pytest.raises(DataError, match=r"rows\.csv:row 1: missing column 'reply' \(--columns maps it to 'completion'\)"):
        read_rows(data, columns={"prompt": "question", "completion": "reply"})
    alpaca = write("jsonl", tmp_path / "a", SHAPES["alpaca"][0] + SHAPES["prompt-completion"][0][:1])
    with pytest.raises(DataError, match=r"rows\.jsonl:3: missing key 'instruction' for --format alpaca"):
        read_rows(alpaca, fmt="alpaca")
    assert main(["train", "--model", "tiny-llama", "--data", str(alpaca), "--out", str(tmp_path / "r2"), "--steps", "1",
                 "--r", "2", "--no-progress", "--format", "sharegpt"]) != 0
    assert "missing key 'conversations' for --format sharegpt" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--columns 'prompt'"):
        lk.train(model="tiny-llama", data=str(data), out=str(tmp_path / "r3"), steps=1, columns="prompt")


def test_a_glob_reads_its_shards_in_name_order(tmp_path, tok):
    rows = SHAPES["prompt-completion"][0]
    for i, row in enumerate(rows):
        (tmp_path / f"train-{i}.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "notes.txt").write_text("not data")
    ds = load_dataset(str(tmp_path / "train-*.jsonl"), tok)
    assert [loss_spans(ds.examples[i], tok) for i in range(2)] == [[" CLM-STD<|im_end|>"], [" DLY-STD<|im_end|>"]]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        load_dataset(str(tmp_path / "eval-*.jsonl"), tok)


def test_large_files_are_stored_flat_not_as_python_lists(tok):
    ds = load_dataset_rows([{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(2000)], tok)
    assert len(ds) == 2000 and ds.examples.ids.itemsize == 4 and ds.examples.loss.itemsize == 1
    assert ds.tokens == len(ds.examples.ids) and ds.examples.longest == max(len(e.input_ids) for e in ds.examples)
    assert ds.loss_tokens == sum(e.n_labels for e in ds.examples)
    assert torch.equal(torch.tensor(ds.examples[-1].input_ids), torch.tensor(ds.examples[1999].input_ids))


@pytest.mark.embedded
def test_masks_equal_trls_with_a_real_bpe_tokenizer(embedded_folder):
    """SmolLM2's BPE merges across a prompt/completion boundary ("wor" + "ld" is one token "world"),
    where TRL's rule (tokenize together, loss from the common prefix) decides; the byte-level tiny
    tokenizer never merges, so only a real one tests it."""
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(embedded_folder)
    rows = [{"prompt": "Hello wor", "completion": "ld, and goodbye"}, {"prompt": "Route: late. Code:", "completion": " DLY-STD"}]
    expected = trl_labels(rows, tok, False)
    assert ours(rows, tok) == expected
    assert tok.decode([t for t in expected[0][1] if t != IGNORE]).startswith(" world")   # the merged token trains
    for case in ("text", "conversational prompt-completion"):
        assert ours(TRL_CASES[case][0], tok) == trl_labels(TRL_CASES[case][0], tok, False), case


def test_review_cases_numeric_csv_bom_detection_order_and_json_tool_results(tmp_path, tok):
    # a CSV answer that looks like a number is text
    csv = tmp_path / "math.csv"
    csv.write_text("prompt,completion\nWhat is 2+2?,4\n")
    assert read_rows(csv)[0] == [{"prompt": "What is 2+2?", "completion": "4"}]
    # a byte-order mark is not data, and a non-UTF-8 line is a bad row like any other
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "completion": "b"}\n\xff\xfe\n')
    rows, bad = read_rows(bom, skip_bad_rows=True)
    assert rows == [{"prompt": "a", "completion": "b"}] and bad[0]["line"] == 2 and "not UTF-8" in bad[0]["error"]
    # TRL reads "prompt" before "text": a pre-rendered text column beside prompt/completion is not the row
    both = load_dataset_rows([{"prompt": "Code:", "completion": " X", "text": "Code: X"}], tok)
    assert both.formats == {"prompt-completion": 1} and loss_spans(both.examples[0], tok) == [" X<|im_end|>"]
    # a template that writes tool results as JSON (`| tojson`, as Llama 3's do) still renders the turn
    quoting = tiny_tokenizer()
    quoting.chat_template = CHATML.replace("{% else %}<|im_start|>{{ m['role'] }}\n" + TURN,
                                           "{% elif m['role'] == 'tool' %}<|im_start|>tool\n{{ m['content'] | tojson }}"
                                           "<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n" + TURN)
    row = json.loads(json.dumps(SHAPES["tool turns"][0][0]))
    row["messages"][2]["content"] = '{"rate": "5 EUR"}'
    ex = load_dataset_rows([row], quoting).examples[0]
    assert '"{\\"rate\\": \\"5 EUR\\"}"' in quoting.decode(ex.input_ids)
