#!/usr/bin/env python
"""Heal at the Shared Attention paper's scale on the GPUs of one host: a Llama-3.1-8B shape (random bf16 weights),
8 of 32 layers shared (followers 23-30 reuse layer 22), sequences of 1024 tokens, on transformers' Trainer.

Parts (each prints one JSON line; `--out` keeps them):
  fsdp        full fine-tune sharded over the processes with FSDP2; run it under
              `accelerate launch --num_processes 2 --multi_gpu benchmarks/check_sharded_heal.py --part fsdp`.
              The export gathers the full weights; `load_shared` reloads them and must give the healed model's logits.
  device-map  LoRA on one model spread over the visible GPUs (`--device-map auto`), one process.
  ddp         LoRA data parallel: under `accelerate launch --num_processes 2 --multi_gpu ... --part ddp`.

Rows: steps, loss first -> last, tokens/s (all processes), peak memory per GPU (torch's allocator, this process),
seconds. `--tiny` runs the same on a tiny Llama (CPU: `torchrun --nproc_per_node 2 ... --part fsdp --tiny` with gloo).

    accelerate launch --num_processes 2 --multi_gpu benchmarks/check_sharded_heal.py --part fsdp --tokenizer DIR --out R
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sa_analysis.data import token_batch  # noqa: E402
from sa_analysis.heal import HealConfig, heal, load_heal_data  # noqa: E402
from sa_analysis.loading import LoadedModel, describe, load_model  # noqa: E402
from sa_analysis.planner import SharePlan  # noqa: E402

GIB = 1024**3


def model_for(args, device: str, device_map: str | None) -> LoadedModel:
    if not args.tiny:
        return load_model("llama3.1-8b", random_init=True, dtype="bfloat16", device=device, device_map=device_map)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", num_hidden_layers=32, hidden_size=64, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=128, vocab_size=49152, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device).eval()
    return LoadedModel(model, None, describe(model, "tiny-llama-32", "tiny", "random-init"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["fsdp", "device-map", "ddp"], required=True)
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer folder (the default model's); default: its own")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("results/sharded-heal"))
    args = parser.parse_args()
    started = time.time()
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and not args.tiny
    device = f"cuda:{local}" if cuda else "cpu"
    loaded = model_for(args, device, "auto" if args.part == "device-map" else None)
    if args.tokenizer:
        from transformers import AutoTokenizer

        loaded.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    tokenizer = loaded.tokenizer
    vocab = None if tokenizer is not None and len(tokenizer) <= loaded.info.vocab_size else loaded.info.vocab_size
    seq = args.seq_len if not args.tiny else 64
    data = load_heal_data(None, tokenizer, seq_len=seq, vocab_size=vocab, max_examples=args.steps * 2 * 2)
    heldout = token_batch(tokenizer, split="heldout", n_seqs=4, seq_len=seq, vocab_size=loaded.info.vocab_size)
    plan = SharePlan.from_spans("23-30", loaded.info.n_layers, model=loaded.info.shape())
    full = args.part == "fsdp"
    config = HealConfig(method="full" if full else "lora", steps=args.steps, batch_size=1, seq_len=seq,
                        lr=2e-4, shard="fsdp" if full else "none", eval_batch_size=1)
    out = args.out / args.part
    report = heal(loaded, plan, data, heldout, config, out=out, export=full)
    if report is None:  # not the main process: its own peak, for the per-GPU row
        if cuda:
            print(json.dumps({"part": args.part, "rank": local, "peak_memory_gib_this_process":
                              round(torch.cuda.max_memory_allocated(device) / GIB, 2)}), flush=True)
        return
    row = {"part": args.part, "processes": report.run["world_size"], "sharding": report.run["sharding"],
           "steps": report.run["steps"], "loss_first": report.losses[0], "loss_last": report.losses[-1],
           "tokens_per_s": report.run["tokens_per_s"], "seconds_training": report.run["seconds"],
           "peak_memory_gib_this_process": round((report.run["peak_memory_bytes"] or 0) / GIB, 2),
           "mixed_precision": report.run["mixed_precision"], "n_trainable": report.run["n_trainable"],
           "perplexity": report.evals["held-out"]["perplexity"], "seconds": round(time.time() - started, 1),
           "devices": loaded.info.device, "versions": report.meta.get("versions")}
    if full:
        row.update(reload_check(loaded, report, heldout))
    print(json.dumps(row, default=str), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "check.json").write_text(json.dumps(row, indent=2, default=str))


def reload_check(loaded: LoadedModel, report, heldout) -> dict:
    """The exported folder, reloaded by `load_shared`, against the healed model in memory: the same logits?"""
    from sa_analysis import load_shared

    device = next(loaded.model.parameters()).device
    dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    ids = heldout.input_ids[:1].to(device)
    with torch.no_grad():
        healed = loaded.model(input_ids=ids, use_cache=False).logits.float()
        reloaded_model = load_shared(report.files["model"], device=str(device), dtype=dtype)
        reloaded = reloaded_model.model(input_ids=ids, use_cache=False).logits.float()
        again = loaded.model(input_ids=ids, use_cache=False).logits.float()  # the same model twice: kernel noise
    mine = _weights(loaded)
    theirs = _weights(reloaded_model)
    weights_equal = mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    return {"reload_max_abs_logit_diff": float((healed - reloaded).abs().max()),
            "same_model_twice_max_abs_logit_diff": float((healed - again).abs().max()),
            "reload_weights_identical": weights_equal, "n_weights": len(mine),
            "reload_logit_scale": float(healed.abs().max()), "reload_plan": reloaded_model.share.followers}


def _weights(loaded: LoadedModel) -> dict:
    """Every weight of the model with its sharing lifted (followers' q/k included), by name."""
    loaded.share.remove()
    try:
        return {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    finally:
        from sa_analysis.patch import share_attention

        loaded.share = share_attention(loaded.model, loaded.share.anchor_of, mode=loaded.share.mode,
                                       head_map=loaded.share.head_map)


if __name__ == "__main__":
    main()
