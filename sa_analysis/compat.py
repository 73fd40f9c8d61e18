"""The one adapter between sa-analysis and its fast-moving dependencies: tested ranges, and every touch of an internal.

Everything else in the library goes through the public interfaces of transformers (`AttentionInterface`,
`AttentionMaskInterface`, `set_attn_implementation`, `DynamicCache` and the cache's `update`) or through the
functions below; where a model keeps its layers, attention modules and output head is `parts`' one job. Each function says which internal it reads and why no public interface serves.

Checked on transformers 5.17.0 (the lowest release in range, also the GPU device's) and 5.24.0 (the newest), with
accelerate 1.3.0 / 1.15.0 and peft 0.18.0 / 0.21.2 (heal runs on transformers' Trainer, which calls
`Accelerator.unwrap_model(keep_torch_compile=...)`: accelerate 1.3.0 and newer, although transformers itself asks
for 1.1.0 only). Below 5.17, seen on 2026-11-30: 5.4.0 and older break the patch
on Gemma 3 (its mask mapping has no entry for a layer type the patch gives a follower: `KeyError: 'full_attention'`),
and 5.5.0 converts the default model's GGUF tokenizer differently (the default held-out text shrinks to 30 tokens).
What moved in the range and is handled here:
  * 5.24 renamed the forward keyword `past_key_values` to `cache` (the old name is deprecated until 5.40 and renamed
    by a decorator with a FutureWarning). Decoder layers call `self_attn(..., cache=...)` from 5.24 on and
    `self_attn(..., past_key_values=...)` before: `cache_from_kwargs` accepts both; `cache_kwargs` spells our own
    calls the way the installed release wants, so no deprecation warning comes from our code.

Importing this module is cheap (no torch, no transformers): `sa_analysis/__init__.py` calls `check_versions` on import.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from contextlib import contextmanager
from importlib import metadata
from typing import Any, Callable, Iterator

log = logging.getLogger("sa_analysis")

# Tested ranges, [lowest passing release, first release not yet tested). pyproject.toml states the same ranges and
# `.ci/run` installs the lower ends for a second run of the patch, capture, metrics and heal tests.
TESTED_RANGES: dict[str, tuple[str, str]] = {
    "transformers": ("5.17.0", "5.25"),
    "accelerate": ("1.3.0", "1.16"),
    "peft": ("0.18.0", "0.22"),
}
CACHE_KEYWORDS = ("cache", "past_key_values")  # newest spelling first


# ----- versions --------------------------------------------------------------------------------------------------
def in_range(version: str, low: str, high: str) -> bool:
    """True when `version` satisfies `>=low,<high` as pip reads it (so 5.25.0rc1 lies outside `<5.25`)."""
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(f">={low},<{high}").contains(version, prereleases=True)


def untested_versions() -> list[str]:
    """One phrase per installed dependency outside its tested range: 'transformers 5.30.0 (tested >=5.17.0,<5.25)'."""
    found = []
    for package, (low, high) in TESTED_RANGES.items():
        try:
            version = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
        if not in_range(version, low, high):
            found.append(f"{package} {version} (tested >={low},<{high})")
    return found


GGUF_TOKENIZER_FROM = {"Gemma": "5.24.0"}  # tokenizer class prefix -> first release measured to convert it right


def check_gguf_tokenizer(tokenizer: Any) -> None:
    """Refuse a GGUF tokenizer this transformers release converts wrongly. Measured: 5.17 turns Gemma-3-270M's GGUF
    vocabulary into a tokenizer that splits common words (" world" in three) and gives a held-out perplexity of 67
    where 5.24 gives the real tokens (releases between were not checked)."""
    from importlib import metadata

    from packaging.version import Version

    from .errors import UserError

    version = metadata.version("transformers")
    for prefix, first_good in GGUF_TOKENIZER_FROM.items():
        if type(tokenizer).__name__.startswith(prefix) and Version(version) < Version(first_good):
            raise UserError(f"transformers {version} converts {prefix} GGUF tokenizers wrongly (measured on 5.17); "
                            f"install transformers>={first_good} to load this model from a GGUF file.")


def check_versions() -> None:
    """Log one warning line when an installed dependency lies outside its tested range; change nothing else."""
    outside = untested_versions()
    if outside:
        log.warning("sa-analysis was not tested with %s; results may differ.", "; ".join(outside))


# ----- the KV cache keyword --------------------------------------------------------------------------------------
def cache_keyword(model: Any) -> str:
    """The keyword the installed transformers uses for the KV cache in `model.forward` ('cache' or 'past_key_values').

    Read from the public signature (the deprecation decorator keeps the new one), so a release that renames the
    keyword again fails here, in one place, rather than silently dropping the cache.
    """
    parameters = inspect.signature(model.forward).parameters
    for name in CACHE_KEYWORDS:
        if name in parameters:
            return name
    raise TypeError(f"{type(model).__name__}.forward takes none of {CACHE_KEYWORDS}; this transformers release is not supported")


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """`{keyword: cache}` for a call `model(input_ids, **cache_kwargs(model, cache), use_cache=True)`."""
    return {cache_keyword(model): cache}


def cache_from_kwargs(kwargs: dict[str, Any]) -> Any:
    """Pop the KV cache a decoder layer passed to its attention module, under either spelling (None if absent)."""
    found = None
    for name in CACHE_KEYWORDS:
        value = kwargs.pop(name, None)
        if found is None:
            found = value
    return found


def new_cache(model: Any) -> Any:
    """A fresh dynamic cache laid out for `model`'s config (per-layer sliding windows included)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def compiles_static_decode(model: Any) -> bool:
    """Whether transformers compiles this model's decode step under `generate(cache_implementation="static")` (the
    class says so with `_can_compile_fullgraph`)."""
    return bool(getattr(type(model), "_can_compile_fullgraph", False))


def cache_layer_tensors(cache: Any) -> list[tuple[Any, Any]]:
    """[(keys, values)] per layer of a transformers cache (the `layers[i].keys/values` attributes; None if empty)."""
    return [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in getattr(cache, "layers", [])]


# ----- attention implementations --------------------------------------------------------------------------------
def attention_implementation(model: Any) -> str:
    """The name of the attention implementation `model` runs (`config._attn_implementation`: no public getter)."""
    return model.config._attn_implementation


def register_attention(name: str, base: str, function: Callable) -> str:
    """Register `function` under `name`, with `base`'s mask function (without one transformers passes no mask).

    Uses the public `AttentionInterface` / `AttentionMaskInterface` registries; returns `name`.
    """
    from transformers import AttentionInterface, AttentionMaskInterface

    masks = AttentionMaskInterface()
    if base not in masks:
        raise ValueError(f"attention implementation {base!r} has no mask function to reuse; load the model with sdpa or eager attention")
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, masks[base])
    return name


def base_attention_function(module: Any, base: str) -> Callable:
    """The attention function `module` would call under implementation `base`.

    A registered implementation comes from the public `AttentionInterface`; "eager" is each model file's own
    `eager_attention_forward` (it differs per architecture: softcapping, sinks), read from the module's file.
    """
    if base == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    from transformers import AttentionInterface

    return AttentionInterface()[base]


# ----- progress bars ------------------------------------------------------------------------------------------
@contextmanager
def no_gguf_progress_bar() -> Iterator[None]:
    """Within the block, transformers' GGUF conversion draws no tqdm bar of its own (the caller shows progress).

    transformers' `modeling_gguf_pytorch_utils` calls `tqdm.auto.tqdm` directly (checked on 5.17 and 5.24), which
    `disable_progress_bar()` does not reach; its module attribute is swapped for a disabled one and restored after.
    A release without that attribute is left as it is.
    """
    import importlib

    try:
        module = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
        original = module.tqdm
    except (ImportError, AttributeError):
        yield
        return
    module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        module.tqdm = original


# ----- per-layer attention types ---------------------------------------------------------------------------------
def layer_types(model: Any) -> list[str] | None:
    """`config.layer_types` of the text model ('sliding_attention' / 'full_attention' per layer), or None."""
    types = getattr(model.config.get_text_config(), "layer_types", None)
    return list(types) if types else None


def set_layer_types(model: Any, types: list[str]) -> None:
    """Replace `config.layer_types`; a cache built afterwards (`DynamicCache(config=...)`, generate()) follows it."""
    model.config.get_text_config().layer_types = list(types)


__all__ = [
    "CACHE_KEYWORDS", "TESTED_RANGES", "attention_implementation", "no_gguf_progress_bar", "base_attention_function", "cache_from_kwargs",
    "cache_keyword", "cache_kwargs", "cache_layer_tensors", "check_gguf_tokenizer", "check_versions", "in_range", "layer_types",
    "new_cache", "register_attention", "set_layer_types", "untested_versions",
]
