"""Tiny random models of many transformers architectures, built in-process (no hub, no files).

One table of cases drives the architecture tests and the README's supported-architecture table
(`bench/architectures_table.py`). Each case: a name, the transformers config class and model
class, and the config values that make it tiny.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import transformers

V = 128
DEC = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64)


@dataclass(frozen=True)
class Case:
    name: str
    config: str
    model: str
    values: dict = field(default_factory=dict)
    task: str = "CAUSAL_LM"

    def build(self, seed: int = 0):
        config = getattr(transformers, self.config)(**self.values)
        torch.manual_seed(seed)
        model = getattr(transformers, self.model)(config)
        model.config._name_or_path = f"tiny-{self.name}"
        return model.eval()


CASES = [
    Case("llama", "LlamaConfig", "LlamaForCausalLM", dict(DEC)),
    Case("mistral", "MistralConfig", "MistralForCausalLM", dict(DEC)),
    Case("qwen2", "Qwen2Config", "Qwen2ForCausalLM", dict(DEC)),
    Case("qwen3", "Qwen3Config", "Qwen3ForCausalLM", dict(DEC, head_dim=8)),
    Case("gemma", "GemmaConfig", "GemmaForCausalLM", dict(DEC, head_dim=8)),
    Case("gemma2", "Gemma2Config", "Gemma2ForCausalLM", dict(DEC, head_dim=8)),
    Case("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM", dict(DEC, head_dim=8)),
    Case("phi", "PhiConfig", "PhiForCausalLM", dict(DEC)),
    Case("phi3", "Phi3Config", "Phi3ForCausalLM", dict(DEC, pad_token_id=0)),
    Case("gpt2", "GPT2Config", "GPT2LMHeadModel", dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    Case("gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", dict(DEC)),
    Case("falcon", "FalconConfig", "FalconForCausalLM", dict(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                            num_attention_heads=4)),
    Case("opt", "OPTConfig", "OPTForCausalLM", dict(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                                    num_attention_heads=4, max_position_embeddings=64,
                                                    word_embed_proj_dim=32)),
    Case("bloom", "BloomConfig", "BloomForCausalLM", dict(vocab_size=V, hidden_size=32, n_layer=2, n_head=4)),
    Case("stablelm", "StableLmConfig", "StableLmForCausalLM", dict(DEC)),
    Case("starcoder2", "Starcoder2Config", "Starcoder2ForCausalLM", dict(DEC)),
    Case("olmo2", "Olmo2Config", "Olmo2ForCausalLM", dict(DEC)),
    Case("cohere", "CohereConfig", "CohereForCausalLM", dict(DEC)),
    Case("gptj", "GPTJConfig", "GPTJForCausalLM", dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                       rotary_dim=4)),
    Case("mixtral", "MixtralConfig", "MixtralForCausalLM", dict(DEC, num_local_experts=4, num_experts_per_tok=2)),
    Case("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(DEC, head_dim=8, num_experts=4,
                                                                   num_experts_per_tok=2, moe_intermediate_size=16)),
    Case("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(DEC, num_experts=4, num_experts_per_tok=2,
                                                                   moe_intermediate_size=16,
                                                                   shared_expert_intermediate_size=32)),
    Case("bert-cls", "BertConfig", "BertForSequenceClassification",
         dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=64, num_labels=3), task="SEQ_CLS"),
    Case("llama-cls", "LlamaConfig", "LlamaForSequenceClassification", dict(DEC, num_labels=3, pad_token_id=0),
         task="SEQ_CLS"),
    Case("t5", "T5Config", "T5ForConditionalGeneration", dict(vocab_size=V, d_model=32, d_kv=8, d_ff=64,
                                                              num_layers=2, num_heads=4), task="SEQ_2_SEQ_LM"),
]
BY_NAME = {c.name: c for c in CASES}
