"""Where a model keeps the parts sa-analysis touches: its decoder layers, each layer's attention module, the output
head. The one place that knows a model's layout (capture, patch, heal, the prefix replay and streaming all ask here),
like TransformerLens' named hook points; and the one way to hook or stand in for a decoder layer, in a `with` block
that checks every index and puts everything back in `finally`.

The layout read, on every supported transformers release (5.17-5.24): `model.get_decoder()` (public) keeps the layers
in an `nn.ModuleList` named `layers` (Llama, Mistral, Qwen, Gemma) or `h` (GPT-2, capture only), which its forward
calls in turn with the hidden states first and takes each one's return value as the next hidden states; each layer
holds its attention module under `self_attn` (or `attn`), which carries its `layer_idx`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

LAYER_LISTS = ("layers", "h")  # where a decoder keeps its layers, by architecture
ATTENTION_NAMES = ("self_attn", "attn")  # where a decoder layer keeps its attention module


def model_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go (its first parameter's device when it says none)."""
    return getattr(model, "device", None) or next(model.parameters()).device


def n_layers(model: nn.Module) -> int:
    return int(model.config.get_text_config().num_hidden_layers)


def decoder(model: nn.Module) -> nn.Module:
    """The decoder stack: embeddings, layers, final norm; its forward returns the final hidden states."""
    return model.get_decoder()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers in the order the forward calls them (checked: one per layer of the config)."""
    stack, count = decoder(model), n_layers(model)
    for name in LAYER_LISTS:
        layers = getattr(stack, name, None)
        if isinstance(layers, nn.ModuleList) and len(layers) == count:
            return layers
    raise TypeError(f"{type(model).__name__} keeps no list of {count} decoder layers ({' or '.join(LAYER_LISTS)}); "
                    f"this model layout is not supported")


def attention_name(layer: nn.Module) -> str:
    """The attribute under which a decoder layer keeps its attention module."""
    for name in ATTENTION_NAMES:
        if isinstance(getattr(layer, name, None), nn.Module):
            return name
    raise TypeError(f"{type(layer).__name__} keeps no attention module ({' or '.join(ATTENTION_NAMES)}); "
                    f"this model layout is not supported")


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Each decoder layer's attention module, in layer order (checked: module i says `layer_idx` i)."""
    modules = [getattr(layer, attention_name(layer)) for layer in decoder_layers(model)]
    wrong = [i for i, module in enumerate(modules) if getattr(module, "layer_idx", None) != i]
    if wrong:
        raise TypeError(f"the attention modules of layers {wrong} do not carry their own layer_idx; this model layout "
                        f"is not supported")
    return modules


def attention_of(model: nn.Module, index: int) -> nn.Module:
    """The module layer `index` calls for attention now (its own, or one put in its place)."""
    layer = decoder_layers(model)[index]
    return getattr(layer, attention_name(layer))


def swap_attention(model: nn.Module, index: int, module: nn.Module) -> nn.Module:
    """Put `module` in place of layer `index`'s attention module; returns the module it replaced."""
    layer = decoder_layers(model)[index]
    name = attention_name(layer)
    replaced = getattr(layer, name)
    setattr(layer, name, module)
    return replaced


def next_token_logits(model: nn.Module, hidden: torch.Tensor, head: nn.Module | None = None) -> torch.Tensor:
    """[..., V] logits from the decoder's final hidden states [..., H], as the model's own forward makes them: the
    output embedding (or `head`, a copy of it), then the final logit softcapping Gemma 2 and 3 apply
    (`config.final_logit_softcapping`, a public field; the forward applies it inline, so no public function does both)."""
    logits = (head or model.get_output_embeddings())(hidden)
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def frozen_head(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`next_token_logits` through a frozen copy of the model's output head as it is now: the untouched model's
    predictions stay available after a fine-tune that trains the head (tied embeddings included)."""
    import copy

    head = copy.deepcopy(model.get_output_embeddings()).requires_grad_(False)
    return lambda hidden: next_token_logits(model, hidden, head)


def layer_input(args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor:
    """The hidden states [B, T, H] a decoder layer was called with."""
    return args[0] if args else kwargs["hidden_states"]


def layer_output(output: Any) -> torch.Tensor:
    """The hidden states [B, T, H] a decoder layer returned (a tensor, or a tuple led by one)."""
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def layer_hooks(model: nn.Module, before: Mapping[int, Callable] | None = None,
                after: Mapping[int, Callable] | None = None) -> Iterator[None]:
    """Within the block, `before[i](args, kwargs)` hears every call of decoder layer i and `after[i](args, kwargs,
    output)` its result; every index is checked first, every hook removed on exit, also when the block raises."""
    layers = decoder_layers(model)
    before, after = dict(before or {}), dict(after or {})
    bad = sorted(i for i in {*before, *after} if not 0 <= i < len(layers))
    if bad:
        raise ValueError(f"layers {bad} do not exist; this model has layers 0..{len(layers) - 1}")
    handles = []
    try:
        for i, hear in before.items():
            handles.append(layers[i].register_forward_pre_hook(
                lambda _m, args, kwargs, hear=hear: hear(args, kwargs), with_kwargs=True))
        for i, hear in after.items():
            handles.append(layers[i].register_forward_hook(
                lambda _m, args, kwargs, output, hear=hear: hear(args, kwargs, output), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


class _Handover(nn.Module):
    """Stands in for a decoder layer below a replay's start: the first hands on the recorded input of the start
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
    layers = decoder_layers(model)
    if not 0 <= start < len(layers):
        raise ValueError(f"layer {start} does not exist; this model has layers 0..{len(layers) - 1}")
    originals = list(layers)
    try:
        for i in range(start):
            layers[i] = _Handover(originals[i], hidden if i == 0 else None)
        yield
    finally:
        for i in range(start):
            layers[i] = originals[i]
