"""Quality of a patched model against its baseline on the same tokens: perplexity, next-token KL, top-1 agreement."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..damage.compare import KEEP_BYTES, Sums, compare, log_softmax, token_ids
from ..parts import model_device
from ..stats import ppl_change
from ..patch import share_attention


MICRO_BATCH_BYTES = 1 << 30  # one micro-batch's [b, T-1, V] float32 log-probabilities stay under this


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


@torch.inference_mode()
def _next_token_log_probs(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """[b, T-1, V] float32 log-probabilities of the next token at every position but the last."""
    return log_softmax(model(input_ids=input_ids, use_cache=False).logits[:, :-1])  # [b, T-1, V]


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


def measure_quality(model: torch.nn.Module, plan: Any, base: Baseline, mode: str = "fast",
                    head_map: Any = None) -> dict[str, float]:
    """Patched vs baseline on the baseline's tokens: perplexities, relative change, mean KL, top-1 agreement.

    `head_map` ({follower: [anchor head per query head]}) for a mapping plan; a SharePlan brings its own."""
    sums: list[Sums] = []
    for i, ids in base.micro_batches():
        base_lp = base.log_probs[i] if base.log_probs is not None else _next_token_log_probs(model, ids)  # [b, T-1, V]
        with share_attention(model, plan, mode=mode, head_map=head_map):
            patched_lp = _next_token_log_probs(model, ids)  # [b, T-1, V]
        sums.append(compare(base_lp, patched_lp, ids[:, 1:]))  # per sequence of the micro-batch
        del base_lp, patched_lp
    total = lambda name: float(sum(float(getattr(s, name).sum()) for s in sums))  # noqa: E731
    n = sum(s.positions * len(s.kl) for s in sums)
    nll_b, change = total("nll_baseline") / n, total("nll_change") / n
    nll_p = nll_b + change
    return {"ppl_baseline": math.exp(nll_b), "ppl_patched": math.exp(nll_p), "ppl_change": ppl_change(change),
            "nll_baseline": nll_b, "nll_patched": nll_p, "kl_mean": total("kl") / n,
            "kl_max": max(s.kl_max for s in sums), "top1_agreement": total("agree") / n, "n_tokens": int(n)}
