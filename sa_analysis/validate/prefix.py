"""Output damage of a plan on calibration tokens, with the unchanged prefix of the model computed once.

Sharing a follower changes nothing below its anchor, so a plan whose lowest anchor is layer `s` needs only layers
`s..L-1` re-run: `PrefixRun.record` runs the unpatched model once, keeping every layer's input hidden states and
the final hidden states; `PrefixRun.damage` then replays the forward from `s` (the layers below are stand-ins that
hand on the recorded input of layer `s`) with the plan in force, and compares the next-token distributions with the
baseline's position chunk by position chunk, so memory stays flat in the vocabulary (the baseline's log-probabilities
are recomputed from its final hidden states by the output head alone when they would be large).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from .. import compat
from ..patch import share_attention
from .quality import KEEP_BYTES, model_device, token_ids

POSITION_CHUNK = 128  # positions compared at a time: temporaries are [S, chunk, V]
COMPARED_POSITIONS = 512  # per sequence at most: longer sequences are compared at evenly strided positions


@dataclass
class Damage:
    """Per-sequence output damage of one patched run against the baseline, on the same tokens."""

    kl: list[float]  # [S] mean next-token KL(baseline || patched) per sequence, nats
    nll_change: list[float]  # [S] mean NLL change per sequence (patched - baseline), nats
    top1: list[float]  # [S] share of positions whose most likely next token is unchanged

    @property
    def kl_mean(self) -> float:
        return float(sum(self.kl) / len(self.kl))

    @property
    def nll_mean(self) -> float:
        return float(sum(self.nll_change) / len(self.nll_change))

    def to_dict(self) -> dict[str, list[float]]:
        return {"kl": self.kl, "nll_change": self.nll_change, "top1": self.top1}

    def summary(self) -> dict[str, float]:
        """Means with their 95 % intervals over sequences (KL and NLL change), and the mean top-1 agreement."""
        from ..planner.damage import interval

        return {**interval("kl", self.kl), **interval("nll_change", self.nll_change),
                "top1": float(sum(self.top1) / len(self.top1))}


class _Handover(nn.Module):
    """Stands in for a decoder layer below the replay's start: the first hands on the recorded input of the start
    layer, the others pass their input through. Keeps the attributes a model's forward may read off its layers."""

    def __init__(self, replaced: nn.Module, hidden: torch.Tensor | None):
        super().__init__()
        self.hidden = hidden
        for name in ("attention_type", "layer_idx"):
            if hasattr(replaced, name):
                setattr(self, name, getattr(replaced, name))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states if self.hidden is None else self.hidden


@contextmanager
def replay_from(model: nn.Module, start: int, hidden: torch.Tensor) -> Iterator[None]:
    """Within the block, the model's forward skips layers `0..start-1` and feeds `hidden` [S, T, H] (the recorded
    input of layer `start`) to layer `start`; every layer is put back on exit, also when the block raises."""
    layers = compat.decoder_layer_list(model)
    originals = list(layers)
    try:
        for i in range(start):
            layers[i] = _Handover(originals[i], hidden if i == 0 else None)
        yield
    finally:
        for i in range(start):
            layers[i] = originals[i]


@dataclass
class PrefixRun:
    """The unpatched model on calibration tokens: each layer's input, the final hidden states, the baseline's
    next-token log-probabilities (kept when small), ready to measure any plan from its lowest anchor on."""

    model: nn.Module
    input_ids: torch.Tensor  # [S, T]
    layer_inputs: list[torch.Tensor]  # per layer [S, T, H], on that layer's device
    final_hidden: torch.Tensor  # [S, T, H] after the final norm
    positions: torch.Tensor  # [P] the positions whose next token is compared (all T-1, or evenly strided)
    base_log_probs: torch.Tensor | None  # [S, P, V] float32, or None: recomputed from final_hidden per chunk
    baseline_nll: float = 0.0  # the unpatched model's mean next-token NLL on the compared positions (nats)

    @classmethod
    @torch.inference_mode()
    def record(cls, model: nn.Module, batch: Any, keep_bytes: int = KEEP_BYTES,
               compared: int = COMPARED_POSITIONS) -> "PrefixRun":
        """One unpatched forward over `batch` (TokenBatch or ids [S, T]) that keeps what every later run reuses;
        `compared`: positions per sequence whose next token is compared (at most)."""
        ids = token_ids(batch).to(model_device(model))
        layers = compat.decoder_layer_list(model)
        inputs: dict[int, torch.Tensor] = {}

        def keep(index: int):
            def hook(_module, args, kwargs):
                inputs[index] = (args[0] if args else kwargs["hidden_states"]).detach()
            return hook

        handles = [layer.register_forward_pre_hook(keep(i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            final = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state  # [S, T, H]
        finally:
            for handle in handles:
                handle.remove()
        stride = -(-(ids.shape[1] - 1) // compared)
        positions = torch.arange(0, ids.shape[1] - 1, stride, device=ids.device)  # [P]
        run = cls(model, ids, [inputs[i] for i in range(len(layers))], final, positions, None)
        vocab = int(model.config.get_text_config().vocab_size)
        if ids.shape[0] * len(positions) * vocab * 4 <= keep_bytes:
            run.base_log_probs = run._log_probs(final, positions)
        run.baseline_nll = run._baseline_nll()
        return run

    def _baseline_nll(self) -> float:
        total = 0.0
        for part, base in self._baseline_chunks():
            total -= float(base.gather(-1, self._targets(part)).sum())
        return total / self.n_tokens

    def _baseline_chunks(self):
        """(positions [c], baseline log-probabilities [S, c, V]) chunk by chunk, kept or recomputed from the head."""
        for first in range(0, len(self.positions), POSITION_CHUNK):
            chunk = slice(first, first + POSITION_CHUNK)
            part = self.positions[chunk]
            kept = self.base_log_probs
            yield part, (kept[:, chunk] if kept is not None else self._log_probs(self.final_hidden, part))

    def _targets(self, part: torch.Tensor) -> torch.Tensor:
        """[S, c, 1] the next tokens at positions `part`."""
        return self.input_ids[:, part + 1, None]

    @property
    def n_layers(self) -> int:
        return len(self.layer_inputs)

    @property
    def n_seqs(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_tokens(self) -> int:
        """Next-token predictions compared (sequences x compared positions)."""
        return int(self.input_ids.shape[0] * len(self.positions))

    def _log_probs(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[S, c, V] next-token log-probabilities at `positions` from final hidden states [S, T, H]: float32, or
        float64 for a float64 model (the references of the tests)."""
        logits = compat.next_token_logits(self.model, hidden[:, positions])
        return torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)

    @torch.inference_mode()
    def damage(self, anchor_of: Mapping[int, int], head_map: Mapping[int, Sequence[int]] | None = None,
               mode: str = "fast", probe: bool = False) -> Damage:
        """Next-token KL, NLL change and top-1 agreement per sequence with `anchor_of` shared (`probe`: anchors need
        not be the last non-shared layer, see `share_attention`). Layers below the lowest anchor are not re-run."""
        if not anchor_of:
            zeros = [0.0] * int(self.input_ids.shape[0])
            return Damage(list(zeros), list(zeros), [1.0] * len(zeros))
        start = min(anchor_of.values())
        with share_attention(self.model, dict(anchor_of), mode=mode, head_map=dict(head_map or {}), probe=probe), \
                replay_from(self.model, start, self.layer_inputs[start]):
            hidden = self.model.get_decoder()(input_ids=self.input_ids, use_cache=False).last_hidden_state
        return self._compare(hidden)

    def _compare(self, hidden: torch.Tensor) -> Damage:
        """Per-sequence sums over position chunks of KL, NLL change and top-1 agreement against the baseline."""
        n_seqs = self.input_ids.shape[0]
        kl = torch.zeros(n_seqs, dtype=torch.float64)
        nll = torch.zeros(n_seqs, dtype=torch.float64)
        agree = torch.zeros(n_seqs, dtype=torch.float64)
        for part, base in self._baseline_chunks():
            patched = self._log_probs(hidden, part)  # [S, c, V]
            targets = self._targets(part)  # [S, c, 1]
            kl += torch.linalg.vecdot(base.exp(), base - patched).sum(-1).double().cpu()
            nll += (base.gather(-1, targets) - patched.gather(-1, targets)).squeeze(-1).sum(-1).double().cpu()
            agree += (base.argmax(-1) == patched.argmax(-1)).sum(-1).double().cpu()
        count = len(self.positions)
        return Damage((kl / count).tolist(), (nll / count).tolist(), (agree / count).tolist())
