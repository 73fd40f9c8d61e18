"""A Gemma-3-270M-shaped model with random weights, saved as a folder, to time `recommend-spans --validate` on a
sliding-window model with a 262k vocabulary (the issue's 82-minute case) without its weights.

Shape from Gemma 3 270M's config: 18 layers (every sixth global, the others a 512-token sliding window), hidden 640,
4 query heads and 1 KV head of 256, MLP 2048, vocabulary 262,144, tied embeddings. The folder has no tokenizer, so
the default text is tokenised by the default model's tokenizer and folded into the vocabulary (timing work only).

    PYTHONPATH=. python benchmarks/gemma3_270m_shape.py /tmp/gemma3-270m-shape
    time sa-analyze recommend-spans --model /tmp/gemma3-270m-shape --budget 3 --validate --out /tmp/g3
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def gemma3_270m_config():
    from transformers import AutoConfig

    layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)]
    return AutoConfig.for_model(
        "gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512, layer_types=layer_types,
        max_position_embeddings=32768, rope_theta=1_000_000.0, query_pre_attn_scalar=256, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=2, eos_token_id=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(gemma3_270m_config(), dtype=torch.float32)
    model.save_pretrained(args.folder)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters written to {args.folder}")


if __name__ == "__main__":
    main()
