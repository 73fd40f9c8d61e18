"""Speed and memory, measured: prefill and decode tokens/s, peak memory and KV-cache bytes, baseline vs patched.

Decode is measured the two ways users decode: eager (one forward per token on the dynamic cache) and, on a GPU,
compiled (`generate(cache_implementation="static")`: transformers compiles the step with CUDA graphs), where the
launch overhead that drowns a saving in eager decoding is gone."""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import TYPE_CHECKING, Any, Callable

import torch

from .. import compat, defaults
from ..errors import UserError
from ..patch import cache_bytes, share_attention
from ..parts import model_device

if TYPE_CHECKING:
    from ..planner.plan import PlanLike


class Timer:
    """Seconds taken by a callable: CUDA events on a GPU (after synchronising), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        if not self.cuda:
            start = time.perf_counter()
            result = fn()
            return time.perf_counter() - start, result
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(self.device)
        start.record()
        result = fn()
        end.record()
        torch.cuda.synchronize(self.device)
        return start.elapsed_time(end) / 1000.0, result

    @property
    def name(self) -> str:
        return "cuda-events" if self.cuda else "perf_counter"


@torch.inference_mode()
def prefill(model: torch.nn.Module, prompt: torch.Tensor):
    """Run the prompt `[B, T]` into a new cache; returns (cache, next token [B, 1])."""
    cache = compat.new_cache(model)  # built from the (possibly patched) config
    out = model(input_ids=prompt, **compat.cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    return cache, out.logits[:, -1:].argmax(-1)


@torch.inference_mode()
def decode(model: torch.nn.Module, cache: Any, token: torch.Tensor, n_new: int) -> torch.Tensor:
    """Greedy decoding of `n_new` tokens, one forward per token, on an existing cache."""
    cache_kwargs = compat.cache_kwargs(model, cache)  # read the keyword once, outside the timed loop
    for _ in range(n_new):
        out = model(input_ids=token, **cache_kwargs, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return token


def _round(model: torch.nn.Module, prompt: torch.Tensor, n_new: int, timer: Timer) -> tuple[float, float]:
    """One timed prefill of `prompt` [B, T] and `n_new` greedy decode steps on its cache: (prefill s, decode s)."""
    t_pre, (cache, token) = timer(lambda: prefill(model, prompt))
    t_dec = timer(lambda: decode(model, cache, token, n_new))[0] if n_new else 0.0
    return t_pre, t_dec


def _summarise(times: list[tuple[float, float]], prompt: torch.Tensor, n_new: int, timer: Timer) -> dict[str, Any]:
    batch, length = prompt.shape
    t_pre = statistics.median(t for t, _ in times)
    t_dec = statistics.median(t for _, t in times)
    return {"batch": int(batch), "prompt_len": int(length), "n_new": int(n_new), "repeats": len(times),
            "timer": timer.name, "prefill_s": t_pre, "decode_s": t_dec,
            "prefill_tokens_per_s": batch * length / t_pre if t_pre > 0 else None,
            "decode_tokens_per_s": batch * n_new / t_dec if n_new and t_dec > 0 else None}


def _memory(model: torch.nn.Module, prompt: torch.Tensor, n_new: int) -> dict[str, Any]:
    """KV-cache bytes after a prefill (summed over the cache's tensors) and peak memory (CUDA only)."""
    cache, _ = prefill(model, prompt)
    kv = cache_bytes(cache)
    del cache
    return {"kv_cache_bytes": kv["total"], "k_cache_bytes": kv["keys"], "v_cache_bytes": kv["values"],
            "peak_memory_bytes": _peak_memory(model, prompt, n_new)}


def measure_speed(model: torch.nn.Module, prompt: torch.Tensor, n_new: int = defaults.DECODE_TOKENS, warmup: int = 1, repeats: int = 3) -> dict[str, Any]:
    """Prefill and decode throughput of the model as it is now (median of `repeats` after `warmup` rounds), KV bytes, peak memory.

    `prompt` [B, T]. Prefill tokens/s = B*T / prefill time; decode tokens/s = B*n_new / time of n_new greedy steps
    on the prefilled cache. Timing: CUDA events after synchronising on a GPU, perf_counter on the CPU.
    """
    prompt = prompt.to(model_device(model))
    timer = Timer(prompt.device)
    times = [_round(model, prompt, n_new, timer) for _ in range(warmup + repeats)][warmup:]
    return {**_summarise(times, prompt, n_new, timer), **_memory(model, prompt, n_new)}


def _peak_memory(model: torch.nn.Module, prompt: torch.Tensor, n_new: int) -> int | None:
    """CUDA: peak allocated bytes over one prefill + decode (weights included). CPU: None (not measured)."""
    device = model_device(model)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    cache, token = prefill(model, prompt)
    decode(model, cache, token, n_new)
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def compare_speed(model: torch.nn.Module, plan: PlanLike, prompt: torch.Tensor, mode: str = "infer", n_new: int = defaults.DECODE_TOKENS,
                  warmup: int = 1, repeats: int = 3, compiled: bool | None = None) -> dict[str, Any]:
    """Baseline and patched speed and memory on the same prompt, with patched / baseline ratios.

    Rounds alternate baseline, patched, baseline, ... so that drift (clocks, other processes) hits both alike.
    `mode`: the patch's mode (default infer, the inference path: prefill as fast mode, decode steps reuse the anchor's
    softmax row). `compiled`: also the compiled static-cache decode (default: on CUDA, where users compile, for a
    model class transformers compiles; True where it cannot run is refused in one sentence, before any timing).
    """
    prompt = prompt.to(model_device(model))
    why_not = compiled_decode_unavailable(model, prompt.device)
    if compiled and why_not:
        raise UserError(f"Compiled decoding cannot be timed here: {why_not}; time eager decoding only (compiled=False).")
    compiled = why_not is None if compiled is None else compiled
    timer = Timer(prompt.device)
    times: dict[str, list[tuple[float, float]]] = {"baseline": [], "patched": []}
    for i in range(warmup + repeats):
        for name in times:
            with share_attention(model, plan, mode=mode) if name == "patched" else contextlib.nullcontext():
                sample = _round(model, prompt, n_new, timer)
            if i >= warmup:
                times[name].append(sample)
    base = {**_summarise(times["baseline"], prompt, n_new, timer), **_memory(model, prompt, n_new)}
    with share_attention(model, plan, mode=mode):
        patched = {**_summarise(times["patched"], prompt, n_new, timer), **_memory(model, prompt, n_new)}
    if compiled:
        steps = compiled_decode_steps(model, plan, prompt, mode, max(n_new, 2), repeats)
        base["compiled_decode_tokens_per_s"], patched["compiled_decode_tokens_per_s"] = steps
    ratio = {key: _ratio(patched.get(key), base.get(key)) for key in
             ("prefill_tokens_per_s", "decode_tokens_per_s", "compiled_decode_tokens_per_s", "kv_cache_bytes",
              "k_cache_bytes", "peak_memory_bytes")}
    note = None if base["peak_memory_bytes"] is not None else "peak memory is measured on CUDA only; None on the CPU"
    return {"baseline": base, "patched": patched, "ratio": ratio, "warmup": warmup, "mode": mode,
            "peak_memory_note": note, "compiled_note": None if compiled else
            f"compiled decoding not timed: {why_not or 'not asked for (compiled=False)'}"}


def compiled_decode_unavailable(model: torch.nn.Module, device: torch.device) -> str | None:
    """Why transformers' compiled static-cache decode step cannot be timed for `model` on `device`, or None where it
    can: it compiles with CUDA graphs on a GPU only, and only for classes that declare they compile whole."""
    if device.type != "cuda":
        return f"transformers compiles the static-cache step with CUDA graphs on a GPU only, and this runs on the {device.type.upper()}"
    if not compat.compiles_static_decode(model):
        return (f"transformers does not compile {type(model).__name__}'s decode step (the class does not declare "
                "that it compiles whole), so generate() would decode it eagerly")
    return None


def compiled_decode_steps(model: torch.nn.Module, plan: PlanLike, prompt: torch.Tensor, mode: str, n_new: int,
                          repeats: int) -> tuple[float, float]:
    """(baseline, patched) decode tokens/s of `generate(cache_implementation="static")`, transformers' compiled step:
    per round, the time of generating `n_new` tokens less that of generating one, over `n_new - 1` steps (the prefill
    and the first token drop out), median of `repeats` rounds alternating the models; after each switch one untimed
    generate, so that recompiling or re-recording the step for the other model stays out of the timing."""
    timer = Timer(prompt.device)
    found: dict[str, list[float]] = {"baseline": [], "patched": []}
    for _ in range(repeats):
        for name in found:
            with share_attention(model, plan, mode=mode) if name == "patched" else contextlib.nullcontext():
                generate_seconds(model, prompt, n_new, True, timer)  # the switch's cost, untimed
                step = generate_step_seconds(model, prompt, n_new, True, timer)
            found[name].append(prompt.shape[0] / step if step > 0 else float("nan"))
    return statistics.median(found["baseline"]), statistics.median(found["patched"])


def generate_options(prompt: torch.Tensor, n_new: int, compiled: bool) -> dict[str, Any]:
    """`generate()` keywords for a greedy decode of exactly `n_new` tokens after `prompt` [B, T]: compiled (the static
    cache, transformers' compiled step) or eager (the dynamic cache, compilation off)."""
    options = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0,
                   attention_mask=torch.ones_like(prompt))
    options.update(cache_implementation="static") if compiled else options.update(disable_compile=True)
    return options


def generate_seconds(model: torch.nn.Module, prompt: torch.Tensor, n_new: int, compiled: bool, timer: Timer) -> float:
    """Seconds of one greedy `generate()` of exactly `n_new` tokens after `prompt` [B, T] (`generate_options`)."""
    options = generate_options(prompt, n_new, compiled)
    with torch.inference_mode():
        return timer(lambda: model.generate(prompt, **options))[0]


def generate_step_seconds(model: torch.nn.Module, prompt: torch.Tensor, n_new: int, compiled: bool, timer: Timer) -> float:
    """Seconds per decode step of `generate()`: the time of `n_new` tokens less that of one, over `n_new - 1` steps
    (the prefill and the first token drop out)."""
    return (generate_seconds(model, prompt, n_new, compiled, timer) - generate_seconds(model, prompt, 1, compiled, timer)) / (n_new - 1)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None
