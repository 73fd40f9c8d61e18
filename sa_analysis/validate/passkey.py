"""Passkey retrieval: a five-digit key hidden at several depths in filler text, at several lengths up to the
model's context; offline and synthetic (the task of Mohtashami & Jaggi 2023, "Landmark Attention").

Perplexity on 256-token windows says nothing about whether sharing breaks retrieval over long context (a sliding
anchor turns a global follower windowed only past the window). Each prompt is scored by teacher forcing: the key's
tokens are appended, one forward runs, and the key counts as retrieved when the model's greedy choice at each of
its positions is the key's own token. Only the last few positions' logits are computed (`logits_to_keep`), so the
memory of a long prompt does not grow with the vocabulary.
"""

from __future__ import annotations

import random
from typing import Any

import torch

NAME = "passkey"


INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "


QUESTION = "\nWhat is the pass key? The pass key is"


DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)  # where the key sits, as a fraction of the filler


SAMPLES_PER_CELL = 2  # prompts per (length, depth); --task-limit changes it


def passkey_lengths(max_positions: int | None, shortest: int = 256) -> list[int]:
    """Four prompt lengths up to the model's context: context/8, /4, /2 and the context itself (at least `shortest`)."""
    context = int(max_positions or 4096)
    return sorted({max(shortest, context // d) for d in (8, 4, 2)} | {context})


def passkey_prompts(tokenizer: Any, lengths: list[int], depths=DEPTHS, samples: int = SAMPLES_PER_CELL,
                    seed: int = 0) -> list[dict[str, Any]]:
    """[{"ids": [T] prompt + key tokens, "key_len", "length", "depth"}], the same every run for a tokenizer."""
    rng = random.Random(seed)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    intro, filler, question = encode(INTRO), encode(FILLER), encode(QUESTION)
    prompts = []
    for length in lengths:
        for depth in depths:
            for _ in range(samples):
                key = str(rng.randint(10000, 99999))
                needle, answer = encode(NEEDLE.format(key=key)), encode(" " + key)
                room = length - len(intro) - len(needle) - len(question) - len(answer)
                if room < len(filler):
                    continue
                hay = (filler * (room // len(filler) + 1))[:room]
                cut = int(round(depth * room))
                ids = intro + hay[:cut] + needle + hay[cut:] + question + answer
                prompts.append({"ids": ids, "key_len": len(answer), "length": length, "depth": depth})
    return prompts


@torch.inference_mode()
def retrieved(model: torch.nn.Module, prompt: dict[str, Any]) -> bool:
    """Teacher-forced greedy check: does the model predict every token of the key after the question?"""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt["ids"]], device=device)  # [1, T]
    n = prompt["key_len"]
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=n + 1).logits[0, :-1]  # [n, V]: positions before each key token
    return bool((logits.argmax(-1) == ids[0, -n:]).all())


def run_passkey(model: torch.nn.Module, tokenizer: Any, max_positions: int | None, limit: int | None = None) -> dict[str, float]:
    """{"acc": share retrieved, "acc_len<L>": per length, "acc_depth<D>": per depth (percent of the filler)}."""
    prompts = passkey_prompts(tokenizer, passkey_lengths(max_positions), samples=limit or SAMPLES_PER_CELL)
    hits = [(p, retrieved(model, p)) for p in prompts]
    out = {"acc": _share(hits)}
    for length in sorted({p["length"] for p in prompts}):
        out[f"acc_len{length}"] = _share([h for h in hits if h[0]["length"] == length])
    for depth in DEPTHS:
        out[f"acc_depth{int(100 * depth)}"] = _share([h for h in hits if h[0]["depth"] == depth])
    return out


def _share(hits: list) -> float:
    return sum(ok for _, ok in hits) / len(hits) if hits else float("nan")
