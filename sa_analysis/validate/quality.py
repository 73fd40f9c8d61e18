"""Quality of a patched model against its baseline on the same tokens: perplexity, next-token KL, top-1 agreement."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UserError
from ..patch import share_attention


KEEP_BYTES = 512 * 2**20  # the baseline's log-probabilities are kept when they take at most this; else recomputed


MICRO_BATCH_BYTES = 1 << 30  # one micro-batch's [b, T-1, V] float32 log-probabilities stay under this


POSITION_CHUNK = 256  # positions compared at a time (the comparison's temporaries are [b, chunk, V])


@dataclass
class Baseline:
    """The unpatched model's next-token log-probabilities on the validation tokens, kept or recomputed.

    For a small vocabulary they are computed once and compared with every patched run. Past `KEEP_BYTES` (e.g.
    a 262k vocabulary: 2.1 GB at 8 x 256 tokens) `log_probs` is None and each comparison recomputes the baseline
    micro-batch by micro-batch, so memory stays at one micro-batch whatever the vocabulary (one more forward each).
    """

    input_ids: torch.Tensor  # [S, T] on the model's device
    log_probs: list[torch.Tensor] | None  # per micro-batch [b, T-1, V] float32, or None: recomputed when compared
    batch_size: int

    def micro_batches(self):
        for start in range(0, self.input_ids.shape[0], self.batch_size):
            yield start // self.batch_size, self.input_ids[start:start + self.batch_size]  # [b, T]


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


def baseline(model: torch.nn.Module, batch: Any, batch_size: int = 4, keep_bytes: int = KEEP_BYTES) -> Baseline:
    """The unpatched model over `batch` in micro-batches (fewer than `batch_size` sequences for a large vocabulary)."""
    ids = token_ids(batch).to(model_device(model))
    vocab = int(model.config.get_text_config().vocab_size)
    per_sequence = (ids.shape[1] - 1) * vocab * 4  # bytes of one sequence's float32 log-probabilities
    batch_size = max(1, min(batch_size, MICRO_BATCH_BYTES // per_sequence))
    base = Baseline(ids, None, batch_size)
    if per_sequence * ids.shape[0] <= keep_bytes:
        base.log_probs = [_next_token_log_probs(model, chunk) for _, chunk in base.micro_batches()]
    return base


def compare_log_probs(base: torch.Tensor, patched: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Sums over tokens: NLL of both, KL(base || patched), top-1 agreement. `base`/`patched` [b, T-1, V], `targets` [b, T-1].

    Works through `POSITION_CHUNK` positions at a time, so its temporaries stay [b, chunk, V]."""
    sums = {"nll_baseline": 0.0, "nll_patched": 0.0, "kl": 0.0, "kl_max": 0.0, "agree": 0.0}
    for start in range(0, targets.shape[1], POSITION_CHUNK):
        part = slice(start, start + POSITION_CHUNK)
        b, p, t = base[:, part], patched[:, part], targets[:, part, None]  # [b, c, V], [b, c, V], [b, c, 1]
        kl = (b.exp() * (b - p)).sum(-1)  # [b, c]
        sums["nll_baseline"] -= float(b.gather(-1, t).sum())
        sums["nll_patched"] -= float(p.gather(-1, t).sum())
        sums["kl"] += float(kl.sum())
        sums["kl_max"] = max(sums["kl_max"], float(kl.max()))
        sums["agree"] += float((b.argmax(-1) == p.argmax(-1)).sum())
    return {**sums, "n_tokens": int(targets.numel())}


def measure_quality(model: torch.nn.Module, plan: Any, base: Baseline, mode: str = "fast",
                    head_map: Any = None) -> dict[str, float]:
    """Patched vs baseline on the baseline's tokens: perplexities, relative change, mean KL, top-1 agreement.

    `head_map` ({follower: [anchor head per query head]}) for a mapping plan; a SharePlan brings its own."""
    totals: dict[str, float] = {}
    for i, ids in base.micro_batches():
        base_lp = base.log_probs[i] if base.log_probs is not None else _next_token_log_probs(model, ids)  # [b, T-1, V]
        with share_attention(model, plan, mode=mode, head_map=head_map):
            patched_lp = _next_token_log_probs(model, ids)  # [b, T-1, V]
        sums = compare_log_probs(base_lp, patched_lp, ids[:, 1:])
        del base_lp, patched_lp
        kl_max = max(totals.get("kl_max", 0.0), sums.pop("kl_max"))
        totals = {k: totals.get(k, 0) + v for k, v in sums.items()}
        totals["kl_max"] = kl_max
    n = totals["n_tokens"]
    nll_b, nll_p = totals["nll_baseline"] / n, totals["nll_patched"] / n
    return {"ppl_baseline": math.exp(nll_b), "ppl_patched": math.exp(nll_p), "ppl_change": math.expm1(nll_p - nll_b),
            "nll_baseline": nll_b, "nll_patched": nll_p, "kl_mean": totals["kl"] / n, "kl_max": totals["kl_max"],
            "top1_agreement": totals["agree"] / n, "n_tokens": int(n)}
