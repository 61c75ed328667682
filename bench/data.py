"""Preparing a large SFT file for training: lorakit vs TRL's own preparation, in one run.

A synthetic JSONL of --rows prompt/completion rows (default 1,000,000; ticket-routing prompts of
~25 tokens with a short code as the completion) is prepared for training by each library in its
own fresh process, alternating, --repeats times:

- lorakit: `load_dataset` (stream, check, batch-tokenize into flat arrays), inject LoRA, one
  `Trainer.train_step()`;
- TRL: `datasets.load_dataset("json")` (Arrow, into a fresh cache folder), `SFTTrainer` with a
  peft LoraConfig (its add-EOS, tokenize, label and truncate maps), `trainer.train()` for one step.

Both tokenize with the embedded SmolLM2 tokenizer, train the same tiny Llama (SmolLM2's vocabulary,
2 layers) with r=16 all-linear LoRA, batch 8, max length 512, on one process each (TRL's
dataset_num_proc=None, its default). Reported per side: seconds from the start of the work (after
imports) to the end of the first optimizer step, and the process's peak RSS (ru_maxrss, which
counts the memory-mapped Arrow pages TRL touches). The masks both build are the same
(tests/training/test_formats.py checks them against TRL's on every row shape).

    .venv/bin/python bench/data.py                    # 1,000,000 rows, 1 repeat
    .venv/bin/python bench/data.py --rows 100000 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRODUCTS = ["kettle", "router", "desk lamp", "rain jacket", "phone case", "blender", "monitor arm", "yoga mat"]
PROBLEMS = [("arrived crushed", "CLM-DMG"), ("never arrived", "CLM-LOST"), ("is late", "DLY-STD"),
            ("was the wrong size", "RET-EXC"), ("stopped working", "WTY-REP"), ("was charged twice", "BIL-DUP")]


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            problem, code = rng.choice(PROBLEMS)
            prompt = (f"Ticket #{i}: my {rng.choice(PRODUCTS)} {problem} (order {rng.randrange(10**6):06d}). "
                      "Route it. Code:")
            f.write(json.dumps({"prompt": prompt, "completion": f" {code}"}) + "\n")


def tiny_llama(vocab: int):
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def worker(lib: str, data: str, out: str) -> dict:
    import transformers

    from lorakit.models import resolve_folder

    if lib == "trl":
        import datasets
        import peft
        import trl
    else:
        import lorakit as lk
        from lorakit.training.data import load_dataset
        from lorakit.training.trainer import TrainConfig, Trainer
    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_folder("smollm2-135m-instruct"))
    model = tiny_llama(len(tokenizer))
    start = time.perf_counter()
    if lib == "lorakit":
        cfg = TrainConfig(data=data, out=out, steps=1, batch_size=8, max_len=512, progress=False)
        train_set = load_dataset(data, tokenizer, cfg.max_len, progress=False)
        prepared = time.perf_counter()
        lk.inject(model, lk.LoraConfig(r=16, alpha=32, targets="all-linear"))
        loss = Trainer(model, tokenizer, train_set, cfg).train_step()["loss"]
        rows, tokens = len(train_set), train_set.tokens
    else:
        table = datasets.load_dataset("json", data_files=data, split="train", cache_dir=out + "/hf-cache")
        args = trl.SFTConfig(output_dir=out, max_steps=1, per_device_train_batch_size=8, max_length=512,
                             report_to=[], use_cpu=True, bf16=False, save_strategy="no", logging_steps=1,
                             dataset_num_proc=None, disable_tqdm=True)
        lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=table, processing_class=tokenizer,
                                 peft_config=lora)
        prepared = time.perf_counter()
        loss = trainer.train().training_loss
        rows, tokens = len(trainer.train_dataset), None
    first_step = time.perf_counter() - start
    return {"lib": lib, "rows": rows, "tokens": tokens, "prepare_s": prepared - start, "first_step_s": first_step,
            "loss": loss, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_side(lib: str, data: Path) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, __file__, "--worker", lib, "--data", str(data), "--out", out]
        env = dict(os.environ, TQDM_DISABLE="1", HF_DATASETS_CACHE=out + "/hf-cache", TOKENIZERS_PARALLELISM="true")
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(f"{lib} worker failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def cpu() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags"))
        isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
        return f"{name} ({', '.join(isa)}), {os.cpu_count()} cores"
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--worker", choices=["lorakit", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.data, args.out)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.jsonl"
        write_rows(data, args.rows)
        print(f"{args.rows:,} rows, {data.stat().st_size / 2**20:.0f} MiB of JSONL; CPU: {cpu()}")
        runs = {"lorakit": [], "trl": []}
        for r in range(args.repeats):
            for lib in ("lorakit", "trl") if r % 2 == 0 else ("trl", "lorakit"):
                runs[lib].append(run_side(lib, data))
                print(f"  {lib:8s} {json.dumps(runs[lib][-1])}", flush=True)
    med = {lib: {k: statistics.median(x[k] for x in v) for k in ("first_step_s", "prepare_s", "peak_rss_mb")}
           for lib, v in runs.items()}
    ratio_t = med["lorakit"]["first_step_s"] / med["trl"]["first_step_s"]
    ratio_m = med["lorakit"]["peak_rss_mb"] / med["trl"]["peak_rss_mb"]
    print(f"\n| | lorakit | TRL | lorakit / TRL |\n|---|---|---|---|\n"
          f"| time to first step (s) | {med['lorakit']['first_step_s']:.1f} | {med['trl']['first_step_s']:.1f} | "
          f"x{ratio_t:.2f} |\n| of which preparing the data (s) | {med['lorakit']['prepare_s']:.1f} | "
          f"{med['trl']['prepare_s']:.1f} | x{med['lorakit']['prepare_s'] / med['trl']['prepare_s']:.2f} |\n"
          f"| peak RSS (MB) | {med['lorakit']['peak_rss_mb']:.0f} | {med['trl']['peak_rss_mb']:.0f} | x{ratio_m:.2f} |")
    print(f"targets: time <= x1.5 ({'met' if ratio_t <= 1.5 else 'MISSED'}), "
          f"peak RSS <= x1.0 ({'met' if ratio_m <= 1.0 else 'MISSED'})")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": args.rows, "cpu": cpu(), "runs": runs, "median": med}, indent=2))


if __name__ == "__main__":
    main()
