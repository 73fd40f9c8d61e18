"""The inference path's decode kernels (`patch.kernels`): against float64 references, and inside the patched model
(eager and compiled static-cache decode) against exact mode. They run with CUDA and Triton: on the CPU the inference
path uses batched matmuls (tested in test_patch.py) and these tests skip, except the first, which runs the kernels
in Triton's interpreter on the CPU where Triton is installed.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from sa_analysis.patch import kernels, share_attention
from sa_analysis.patch.decode import attend, decode_probs
from sa_analysis.capture import AttentionInputs

needs_kernels = pytest.mark.skipif(not (torch.cuda.is_available() and kernels._OPS is not None),
                                   reason="needs a CUDA device and Triton (torch >= 2.6)")

INTERPRETED = """
import torch
from sa_analysis.patch import _triton_decode as K
torch.manual_seed(0)
for batch, n_kv, groups, dim, n_keys in [(2, 3, 1, 16, 70), (1, 2, 4, 24, 200), (1, 2, 5, 96, 300)]:
    q, k, v = (torch.randn(batch, n_kv, n, dim).half() for n in (groups, n_keys, n_keys))
    for keys in (64, 128, 256):
        scores = K.scores(q, k, K.scores_kernel, 64, keys)
        assert (scores.double() - q.double() @ k.double().transpose(-1, -2)).abs().max() < 1e-4, keys
    row = torch.softmax(scores, -1)
    reference = row.half().double() @ v.double()
    for keys in (64, 128, 256):
        out = K.row_values(row, v, K.row_values_kernel, 64, keys)
        assert (out.double() - reference).abs().max() <= 2 ** -10 * reference.abs().max() * 2, keys
print("ok")
"""


def test_kernels_in_tritons_interpreter_equal_float64_products():
    """The kernels' indexing (groups padded to 16 rows, head dims not a power of two, keys ending mid-tile, splits of
    the keys) on the CPU, in Triton's interpreter (float16: the interpreter has no bfloat16), against float64."""
    import os
    import subprocess
    import sys
    from importlib.util import find_spec

    if find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]

# (batch, key/value heads, group, head dim, keys): MHA and GQA groups, head dims of the supported models (64, 128,
# 256) and one not a power of two (80), key counts that end mid-tile, and one long enough to split into many programs
SHAPES = [(1, 4, 1, 64, 70), (2, 2, 4, 128, 200), (3, 2, 8, 80, 333), (1, 1, 2, 256, 129), (2, 8, 1, 128, 9000)]


@pytest.fixture(autouse=True)
def kernels_on():
    """The inference path with the kernels (`kernels.ENABLED`), in eager steps too (`kernels.IN_EAGER`: so that eager
    calls here test them), whatever a test before left."""
    with kernels.settings(ENABLED=True, IN_EAGER=True):
        yield


def _operands(batch, n_kv, groups, dim, n_keys, dtype, seed=0):
    gen = torch.Generator("cuda").manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, device="cuda", generator=gen).to(dtype)  # noqa: E731
    return make(batch, n_kv, groups, dim), make(batch, n_kv, n_keys, dim), make(batch, n_kv, n_keys, dim)


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_scores_equal_float64_dot_products(shape, dtype):
    query, key, _ = _operands(*shape, dtype)
    found = kernels.scores(query, key)  # [B, Hkv, G, K]
    reference = query.double() @ key.double().transpose(-1, -2)
    assert found.dtype == torch.float32 and found.shape == reference.shape
    torch.testing.assert_close(found.double(), reference, atol=1e-4 * shape[3] ** 0.5, rtol=1e-5)


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_row_values_equal_float64_products(shape, dtype):
    """The row is cast to the values' dtype (as the matmul it replaces casts it), the sums run in float32: against
    float64 products of the same cast row, the error is the output's own rounding."""
    _, _, value = _operands(*shape, dtype)
    row = torch.softmax(torch.randn(*shape[:3], shape[4], device="cuda") * 3, dim=-1)  # [B, Hkv, G, K] float32
    found = kernels.row_values(row, value)  # [B, Hkv, G, D]
    reference = row.to(dtype).double() @ value.double()
    assert found.dtype == dtype and found.shape == reference.shape
    ulp = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
    assert (found.double() - reference).abs().max() <= ulp * reference.abs().max()


@pytest.mark.gpu
@needs_kernels
def test_row_values_read_strided_rows():
    """A head-mapped follower's row is gathered (index_select) and viewed grouped; a strided view must give what a
    contiguous copy gives."""
    _, _, value = _operands(2, 2, 4, 128, 300, torch.bfloat16)
    wide = torch.softmax(torch.randn(2, 2, 4, 600, device="cuda"), dim=-1)
    row = wide[..., ::2]  # [B, Hkv, G, 300], stride 2 over keys
    torch.testing.assert_close(kernels.row_values(row, value), kernels.row_values(row.contiguous(), value))


@pytest.mark.gpu
@needs_kernels
def test_splits_cover_every_key_once():
    """However the keys are split over programs, the sum is the same (a key counted twice or missed would show)."""
    query, key, value = _operands(1, 2, 4, 128, 5000, torch.bfloat16)
    row = torch.rand(1, 2, 4, 5000, device="cuda")
    results, scores = [], []
    for per_sm in (1, 4, 64, 10 ** 9):  # 10**9: one tile of keys a program
        with kernels.settings(PROGRAMS_PER_SM=per_sm, SCORES_PROGRAMS_PER_SM=per_sm):
            results.append(kernels.row_values(row, value).float())
            scores.append(kernels.scores(query, key))
    reference = row.bfloat16().double() @ value.double()
    for found in results:
        assert (found.double() - reference).abs().max() <= 2 ** -7 * reference.abs().max()
    exact = query.double() @ key.double().transpose(-1, -2)
    for found in scores:
        torch.testing.assert_close(found.double(), exact, atol=1e-4 * 128 ** 0.5, rtol=1e-5)


@pytest.mark.gpu
@needs_kernels
def test_eager_steps_keep_the_matmuls_and_compiled_steps_take_the_kernels():
    """`usable` is False for an eager call (a Triton launch from Python costs more than it saves at decode) unless
    IN_EAGER asks, and True inside a compiled step."""
    kernels.IN_EAGER = False  # the library's default; the fixture restores it
    tensor = torch.zeros(4, device="cuda", dtype=torch.bfloat16)
    assert not kernels.usable(tensor)
    step = torch.compile(lambda x: x + 1 if kernels.usable(x) else x - 1, fullgraph=True)
    assert step(tensor).tolist() == [1.0] * 4
    kernels.IN_EAGER = True
    assert kernels.usable(tensor)


@pytest.mark.gpu
@needs_kernels
def test_kernels_match_the_batched_matmuls_they_replace():
    """The anchor's row and a follower's output with and without the kernels (`kernels.ENABLED`), masked static
    cache, GQA: the same to float32 rounding of the scores and bf16 rounding of the output."""
    query, key, value = _operands(2, 2, 4, 128, 700, torch.bfloat16)
    mask = torch.zeros(2, 1, 1, 700, dtype=torch.bool, device="cuda")
    mask[..., :650] = True  # [B, 1, 1, K]: the filled part of a static cache
    inputs = AttentionInputs(layer_idx=0, query=query.reshape(2, 8, 1, 128), key=key, mask=mask, scaling=128 ** -0.5,
                             softcap=None, sliding_window=None)
    probs = decode_probs(inputs)  # [B, Hq, 1, K]
    output = attend(probs, value)  # [B, 1, Hq, D]
    kernels.ENABLED = False
    reference_probs = decode_probs(inputs)
    reference_output = attend(reference_probs, value)
    torch.testing.assert_close(probs, reference_probs, atol=1e-6, rtol=1e-4)
    assert probs[..., 650:].abs().max() == 0  # masked keys take no probability
    torch.testing.assert_close(output.float(), reference_output.float(), atol=2e-2, rtol=2e-2)


def _decode(model, prompt, steps, mode, compiled, fed=None):
    """([steps, B, V] logits, [steps, B, 1] tokens fed, graphs compiled) of decode steps through a static cache,
    eager or compiled (fullgraph), patched in `mode` (None: unpatched). `fed`: the tokens to feed (another run's),
    else greedy: a tiny random model's logits are nearly tied, and two runs whose last bits differ would otherwise
    pick different tokens and compare logits of different texts."""
    import contextlib

    from torch._dynamo.utils import counters
    from transformers import StaticCache

    from sa_analysis.compat import cache_kwargs

    torch._dynamo.reset()
    counters.clear()
    found = []
    plan = {2: 1, 3: 1}
    with share_attention(model, plan, mode=mode) if mode else contextlib.nullcontext(), torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + steps + 1)
        out = model(input_ids=prompt, **cache_kwargs(model, cache), use_cache=True)
        token = out.logits[:, -1:].argmax(-1) if fed is None else fed[0]
        tokens = []
        step = torch.compile(model.forward, fullgraph=True, dynamic=False) if compiled else model.forward
        for i in range(steps):
            tokens.append(token)
            position = torch.full((prompt.shape[0], 1), prompt.shape[1] + i, device=prompt.device)
            out = step(input_ids=token, **cache_kwargs(model, cache), use_cache=True, position_ids=position,
                       cache_position=position[0])
            found.append(out.logits[:, -1].float())
            token = out.logits[:, -1:].argmax(-1) if fed is None else fed[min(i + 1, steps - 1)]
    graphs = int(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    return torch.stack(found), torch.stack(tokens), graphs


@pytest.mark.gpu
@needs_kernels
def test_validate_speed_times_compiled_decoding_on_a_gpu():
    """validate's speed section on CUDA: eager and compiled (static cache) decode tokens/s of both models, through
    the inference path, with their ratios."""
    from sa_analysis.validate import compare_speed

    model = tiny_model("llama", dtype=torch.bfloat16, device="cuda")
    prompt = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    speed = compare_speed(model, {2: 1, 3: 1}, prompt, n_new=4, repeats=1)
    assert speed["mode"] == "infer"
    for side in ("baseline", "patched"):
        assert speed[side]["compiled_decode_tokens_per_s"] > 0 and speed[side]["decode_tokens_per_s"] > 0
    assert speed["ratio"]["compiled_decode_tokens_per_s"] == pytest.approx(
        speed["patched"]["compiled_decode_tokens_per_s"] / speed["baseline"]["compiled_decode_tokens_per_s"])
    torch._dynamo.reset()


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_patched_decode_through_the_kernels_equals_exact_mode(arch):
    """Eager and compiled (fullgraph, one graph for every step, as unpatched) decode of the inference path, with the
    kernels, equal exact mode's logits to bf16 precision."""
    model = tiny_model(arch, dtype=torch.bfloat16, device="cuda")
    prompt = torch.randint(3, 128, (2, 56), generator=torch.Generator().manual_seed(1)).cuda()
    exact, fed, _ = _decode(model, prompt, 5, "exact", compiled=False)
    eager, _, _ = _decode(model, prompt, 5, "infer", compiled=False, fed=fed)
    scale = exact.abs().max()
    assert (eager - exact).abs().max() <= 0.02 * scale
    if arch == "gemma3_text":
        return  # its sliding-window cache recompiles on its own, patched or not (test_patch.py)
    compiled, _, graphs = _decode(model, prompt, 5, "infer", compiled=True, fed=fed)
    _, _, unpatched_graphs = _decode(model, prompt, 5, None, compiled=True, fed=fed)
    assert graphs == unpatched_graphs == 1
    assert (compiled - exact).abs().max() <= 0.02 * scale
