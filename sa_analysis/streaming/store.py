"""The streaming recorder: every layer's post-RoPE queries and keys from one forward, grouped by device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from .. import parts
from ..capture import AttentionInputs, causal_allowed

# ----- recorder: keep post-RoPE queries and keys --------------------------------------------------------------
@dataclass
class LayerSpec:
    """How to recompute one layer's attention: scaling, softcap and its mask (iota window or a generic mask)."""

    scaling: float
    softcap: float | None
    window: int | None  # sliding window (keys i-window < j <= i); None = plain causal
    generic_mask: torch.Tensor | None = None  # set when the mask is not causal/sliding (e.g. padding)
    inputs: AttentionInputs | None = None  # kept only for generic masks (to slice `allowed`)


@dataclass
class LayerGroup:
    """Consecutive layers on one device; `halo` = 1 when the previous layer is copied in (JS across the border)."""

    start: int
    stop: int
    device: torch.device
    halo: int = 0

    @property
    def n_layers(self) -> int:
        return self.stop - self.start

    @property
    def first_stored(self) -> int:
        return self.start - self.halo


class QKStore:
    """Recorder that copies every layer's post-RoPE query `[Hq, n, D]` and key `[Hkv, n, D]` into per-device buffers.

    `groups` are consecutive layer ranges on one device (by default read off the attention modules' parameters);
    buffers are allocated on the first record of each group, in the dtype of the recorded tensors. With `rows` (the
    positions of a sampled run, `[m]` int64) only those query rows are kept: queries `[Hq, m, D]`, keys all `n`.
    """

    layers = None  # every layer

    def __init__(self, n_layers: int, groups: Sequence[LayerGroup] | None = None, rows: torch.Tensor | None = None):
        self.n_layers = n_layers
        self.rows = rows
        self.groups: list[LayerGroup] = list(groups) if groups else [LayerGroup(0, n_layers, torch.device("cpu"))]
        self._group_of = {}
        for gi, g in enumerate(self.groups):
            for layer in range(g.start, g.stop):
                self._group_of[layer] = gi
        if sorted(self._group_of) != list(range(n_layers)):
            raise ValueError(f"layer groups {[(g.start, g.stop) for g in self.groups]} do not cover 0..{n_layers - 1}")
        for gi, g in enumerate(self.groups):
            g.halo = 1 if g.start > 0 else 0
        self.q: list[torch.Tensor | None] = [None] * len(self.groups)
        self.k: list[torch.Tensor | None] = [None] * len(self.groups)
        self.specs: list[LayerSpec | None] = [None] * n_layers
        self.seq_len: int | None = None
        self._mask_cache: dict[tuple, int | None | str] = {}

    @classmethod
    def for_model(cls, model: torch.nn.Module, rows: torch.Tensor | None = None) -> "QKStore":
        """A store whose groups follow the devices of the model's attention modules (one group per device run)."""
        modules = parts.attention_modules(model)
        by_name = dict(model.named_modules())
        name_of = {id(m): n for n, m in by_name.items()}
        devices = [_execution_device(m, name_of[id(m)], by_name) for m in modules]
        groups: list[LayerGroup] = []
        for layer, dev in enumerate(devices):
            if groups and groups[-1].device == dev:
                groups[-1].stop = layer + 1
            else:
                groups.append(LayerGroup(layer, layer + 1, dev))
        return cls(len(modules), groups, rows)

    # -- recording
    def record(self, inputs: AttentionInputs) -> None:
        q, k = inputs.query, inputs.key
        if q.shape[0] != 1:
            raise ValueError("the streaming engine analyses one sequence at a time (batch size 1)")
        if q.shape[2] != k.shape[2]:
            raise ValueError("the streaming engine needs a forward without cache (queries and keys of the same length)")
        n = q.shape[2]
        if self.seq_len is None:
            self.seq_len = n
        elif self.seq_len != n:
            raise ValueError(f"layers saw different lengths ({self.seq_len} and {n})")
        layer = inputs.layer_idx
        gi = self._group_of[layer]
        g = self.groups[gi]
        kept = q[0] if self.rows is None else q[0].index_select(1, self.rows_on(q.device))  # [Hq, m, D]
        if self.q[gi] is None:
            slots = g.n_layers + g.halo
            self.q[gi] = _stacked_like(kept, slots)
            self.k[gi] = _stacked_like(k[0], slots)
            g.device = q.device
        self.q[gi][layer - g.first_stored].copy_(kept)
        self.k[gi][layer - g.first_stored].copy_(k[0])
        self.specs[layer] = self._spec(inputs)

    def rows_on(self, device: torch.device) -> torch.Tensor:
        """The sampled positions on `device` (copied once per device)."""
        if self.rows.device != device:
            self.rows = self.rows.to(device)
        return self.rows

    def _spec(self, inputs: AttentionInputs) -> LayerSpec:
        window = inputs.sliding_window if inputs.sliding_window else None
        spec = LayerSpec(scaling=float(inputs.scaling), softcap=inputs.softcap, window=window)
        if inputs.mask is not None:
            key = (inputs.mask.data_ptr(), tuple(inputs.mask.shape), inputs.mask.dtype, window)
            if key not in self._mask_cache:
                self._mask_cache[key] = "iota" if _mask_is_causal(inputs, window) else "generic"
            if self._mask_cache[key] == "generic":
                spec.generic_mask = inputs.mask
                spec.inputs = AttentionInputs(inputs.layer_idx, inputs.query[:, :, :0], inputs.key[:, :, :0],
                                              inputs.mask, inputs.scaling, inputs.softcap, inputs.sliding_window)
        return spec

    def finish(self) -> None:
        """Check every layer was recorded and copy each group's halo layer (the previous group's last layer)."""
        missing = [i for i, s in enumerate(self.specs) if s is None]
        if missing:
            raise RuntimeError(f"layers {missing} were not recorded; did the forward run inside capture_attention?")
        for gi, g in enumerate(self.groups):
            if g.halo:
                prev = self.groups[gi - 1]
                src = g.start - 1 - prev.first_stored
                self.q[gi][0].copy_(self.q[gi - 1][src])
                self.k[gi][0].copy_(self.k[gi - 1][src])

    def release(self) -> None:
        self.q = [None] * len(self.groups)
        self.k = [None] * len(self.groups)

    # -- building a store without a model (tests, notebooks)
    @classmethod
    def from_inputs(cls, inputs: Iterable[AttentionInputs], groups: Sequence[tuple[int, int]] | None = None,
                    devices: Sequence[torch.device | str] | None = None, rows: torch.Tensor | None = None
                    ) -> "QKStore":
        """A filled store from recorded `AttentionInputs` (one per layer, in order); `groups` splits the layers and
        `rows` keeps only those query rows (a sampled run)."""
        inputs = list(inputs)
        n_layers = len(inputs)
        splits = list(groups) if groups else [(0, n_layers)]
        devs = [torch.device(d) for d in devices] if devices else [inputs[0].query.device] * len(splits)
        store = cls(n_layers, [LayerGroup(a, b, d) for (a, b), d in zip(splits, devs)], rows)
        for inp in inputs:
            gi = store._group_of[inp.layer_idx]
            moved = AttentionInputs(inp.layer_idx, inp.query.to(devs[gi]), inp.key.to(devs[gi]),
                                    None if inp.mask is None else inp.mask.to(devs[gi]),
                                    inp.scaling, inp.softcap, inp.sliding_window)
            store.record(moved)
        store.finish()
        return store


def _stacked_like(t: torch.Tensor, slots: int) -> torch.Tensor:
    """An empty `[slots, H, n, D]` buffer laid out like `t` `[H, n, D]`, so that recording a layer is a plain copy.

    Models project queries/keys as `[n, H, D]` and transpose, so `t` is usually token-major (head stride D); a
    head-major buffer would turn every recording into a strided transpose. The kernels take any strides.
    """
    H, n, D = t.shape
    if t.stride(1) > t.stride(0):  # token-major
        return torch.empty((slots, n, H, D), dtype=t.dtype, device=t.device).transpose(1, 2)
    return torch.empty((slots, H, n, D), dtype=t.dtype, device=t.device)


def _execution_device(module: torch.nn.Module, name: str, by_name: dict[str, torch.nn.Module]) -> torch.device:
    """Where `module` computes: its weights' device, or, for weights offloaded by accelerate (on "meta" between
    forwards), the execution device of the hook on it or on its nearest ancestor."""
    first = next(module.parameters(), None)
    if first is not None and first.device.type != "meta":
        return first.device
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        hook = getattr(by_name.get(".".join(parts[:i])), "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
            device = getattr(h, "execution_device", None)
            if device is not None:
                return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return torch.device("cpu")


def _mask_is_causal(inputs: AttentionInputs, window: int | None, chunk: int = 2048) -> bool:
    """Whether `inputs.mask` equals the causal (sliding-window) pattern, compared in chunks of rows."""
    n_q, n_k = inputs.query.shape[2], inputs.key.shape[2]
    mask = inputs.mask
    if mask.shape[0] != 1 or mask.shape[-1] < n_k:
        return False
    for start in range(0, n_q, chunk):
        rows = slice(start, min(n_q, start + chunk))
        m = mask[:, :, rows, :n_k]
        allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
        if not torch.equal(allowed, causal_allowed(rows, n_q, n_k, n_k, window, m.device).expand_as(allowed)):
            return False
    return True
