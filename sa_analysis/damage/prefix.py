"""Output damage of a plan on calibration tokens, with the unchanged prefix of the model computed once.

Sharing a follower changes nothing below its anchor, so a plan whose lowest anchor is layer `s` needs only layers
`s..L-1` re-run: `PrefixRun.record` runs the unpatched model once, keeping every layer's input hidden states and
the final hidden states; `PrefixRun.damage` then replays the forward from `s` (`parts.replay_from`: the layers below are stand-ins that
hand on the recorded input of layer `s`) with the plan in force, and compares the next-token distributions with the
baseline's position chunk by position chunk, so memory stays flat in the vocabulary (the baseline's log-probabilities
are recomputed from its final hidden states by the output head alone when they would be large).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from torch import nn

from .. import parts
from ..patch import share_attention
from .logprobs import KEEP_BYTES, Sums, chunks, compare_chunk, log_probs, token_ids
from ..planner.record import Damage

if TYPE_CHECKING:
    from ..data import Tokens

COMPARED_POSITIONS = 512  # per sequence at most: longer sequences are compared at evenly strided positions


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
    def record(cls, model: nn.Module, batch: Tokens, keep_bytes: int = KEEP_BYTES,
               compared: int = COMPARED_POSITIONS) -> "PrefixRun":
        """One unpatched forward over `batch` (TokenBatch or ids [S, T]) that keeps what every later run reuses;
        `compared`: positions per sequence whose next token is compared (at most)."""
        ids = token_ids(batch).to(parts.model_device(model))
        n_layers = parts.n_layers(model)
        inputs: dict[int, torch.Tensor] = {}

        def keep(index: int):
            return lambda args, kwargs: inputs.__setitem__(index, parts.layer_input(args, kwargs).detach())

        with parts.layer_hooks(model, before={i: keep(i) for i in range(n_layers)}):
            final = parts.decoder(model)(input_ids=ids, use_cache=False).last_hidden_state  # [S, T, H]
        stride = -(-(ids.shape[1] - 1) // compared)
        positions = torch.arange(0, ids.shape[1] - 1, stride, device=ids.device)  # [P]
        run = cls(model, ids, [inputs[i] for i in range(n_layers)], final, positions, None)
        vocab = int(model.config.get_text_config().vocab_size)
        if ids.shape[0] * len(positions) * vocab * 4 <= keep_bytes:
            run.base_log_probs = run._log_probs(final, positions)
        run.baseline_nll = run._baseline_nll()
        return run

    def _baseline_nll(self) -> float:
        total = 0.0
        for part, base in self._baseline_chunks():
            total -= float(base.gather(-1, self._targets(part)[..., None]).sum())
        return total / self.n_tokens

    def _baseline_chunks(self):
        """(positions [c], baseline log-probabilities [S, c, V]) chunk by chunk, kept or recomputed from the head."""
        for chunk in chunks(len(self.positions)):
            part = self.positions[chunk]
            kept = self.base_log_probs
            yield part, (kept[:, chunk] if kept is not None else self._log_probs(self.final_hidden, part))

    def _targets(self, part: torch.Tensor) -> torch.Tensor:
        """[S, c] the next tokens at positions `part`."""
        return self.input_ids[:, part + 1]

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
        """[S, c, V] next-token log-probabilities at `positions` from final hidden states [S, T, H]."""
        return log_probs(self.model, hidden[:, positions])

    @torch.inference_mode()
    def damage(self, anchor_of: Mapping[int, int], head_map: Mapping[int, Sequence[int]] | None = None,
               mode: str = "fast", probe: bool = False) -> Damage:
        """Next-token KL, NLL change and top-1 agreement per sequence with `anchor_of` shared (`probe`: anchors need
        not be the last non-shared layer, see `share_attention`). Layers below the lowest anchor are not re-run."""
        if not anchor_of:
            return Damage.none(self.n_seqs)
        start = min(anchor_of.values())
        with share_attention(self.model, dict(anchor_of), mode=mode, head_map=dict(head_map or {}), probe=probe), \
                parts.replay_from(self.model, start, self.layer_inputs[start]):
            hidden = parts.decoder(self.model)(input_ids=self.input_ids, use_cache=False).last_hidden_state
        return self._compare(hidden)

    def _compare(self, hidden: torch.Tensor) -> Damage:
        """Per-sequence means over the compared positions of KL, NLL change and top-1 agreement against the baseline
        (`compare.compare_chunk`, chunk by chunk)."""
        sums = Sums.zeros(self.n_seqs)
        for part, base in self._baseline_chunks():
            sums.add(compare_chunk(base, self._log_probs(hidden, part), self._targets(part)))
        count = sums.positions
        return Damage((sums.kl / count).tolist(), (sums.nll_change / count).tolist(),
                      (sums.agree / count).tolist())
