"""Quality of a patched model against its baseline on the same tokens: perplexity, next-token KL, top-1 agreement."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UserError
from ..patch import share_attention


@dataclass
class Baseline:
    """The unpatched model's next-token log-probabilities, computed once and compared with every patched run."""

    input_ids: torch.Tensor  # [S, T] on the model's device
    log_probs: list[torch.Tensor]  # per micro-batch [b, T-1, V] float32
    batch_size: int


def token_ids(batch: Any) -> torch.Tensor:
    """[S, T] token ids from a TokenBatch or a tensor."""
    ids = batch.input_ids if hasattr(batch, "input_ids") else batch
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 2:
        raise UserError("Validation needs token ids of shape [sequences, tokens] with at least 2 tokens per sequence.")
    return ids


def model_device(model: torch.nn.Module) -> torch.device:
    return getattr(model, "device", None) or next(model.parameters()).device


@torch.inference_mode()
def _next_token_log_probs(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """[b, T-1, V] float32 log-probabilities of the next token at every position but the last."""
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1]  # [b, T-1, V]
    return torch.log_softmax(logits.float(), dim=-1)


def baseline(model: torch.nn.Module, batch: Any, batch_size: int = 4) -> Baseline:
    """Run the unpatched model over `batch` in micro-batches of `batch_size` sequences."""
    ids = token_ids(batch).to(model_device(model))
    chunks = [_next_token_log_probs(model, ids[i:i + batch_size]) for i in range(0, ids.shape[0], batch_size)]
    return Baseline(ids, chunks, batch_size)


def compare_log_probs(base: torch.Tensor, patched: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Sums over tokens: NLL of both, KL(base || patched), top-1 agreement. `base`/`patched` [b, T-1, V], `targets` [b, T-1]."""
    nll_base = -base.gather(-1, targets[..., None]).sum()
    nll_patched = -patched.gather(-1, targets[..., None]).sum()
    kl = (base.exp() * (base - patched)).sum(-1)  # [b, T-1]
    agree = (base.argmax(-1) == patched.argmax(-1)).sum()
    return {"nll_baseline": float(nll_base), "nll_patched": float(nll_patched), "kl": float(kl.sum()),
            "kl_max": float(kl.max()), "agree": float(agree), "n_tokens": int(targets.numel())}


def measure_quality(model: torch.nn.Module, plan: Any, base: Baseline, mode: str = "fast") -> dict[str, float]:
    """Patched vs baseline on the baseline's tokens: perplexities, relative change, mean KL, top-1 agreement."""
    totals: dict[str, float] = {}
    with share_attention(model, plan, mode=mode):
        for i, base_lp in enumerate(base.log_probs):
            ids = base.input_ids[i * base.batch_size:(i + 1) * base.batch_size]
            sums = compare_log_probs(base_lp, _next_token_log_probs(model, ids), ids[:, 1:])
            kl_max = max(totals.get("kl_max", 0.0), sums.pop("kl_max"))
            totals = {k: totals.get(k, 0) + v for k, v in sums.items()}
            totals["kl_max"] = kl_max
    n = totals["n_tokens"]
    nll_b, nll_p = totals["nll_baseline"] / n, totals["nll_patched"] / n
    return {"ppl_baseline": math.exp(nll_b), "ppl_patched": math.exp(nll_p), "ppl_change": math.expm1(nll_p - nll_b),
            "nll_baseline": nll_b, "nll_patched": nll_p, "kl_mean": totals["kl"] / n, "kl_max": totals["kl_max"],
            "top1_agreement": totals["agree"] / n, "n_tokens": int(n)}
