"""Streaming engine: same numbers as the maps path, as direct float64 definitions, on one or several devices."""

from __future__ import annotations

import math

import numpy as np

import pytest
import torch

import conftest

from sa_analysis.compat import attention_implementation
from sa_analysis.capture import AttentionInputs, AttentionMaps, capture_attention
from sa_analysis.errors import UserError
from sa_analysis.metrics import PairStatistics, drop_first_keys, sequence_stats_from_maps
from sa_analysis.streaming import (
    LayerGroup,
    QKStore,
    RowSample,
    StreamingStatistics,
    check_fits,
    plan_segments,
    stream_sequence_stats,
)

FIELDS = ("cosine_flat", "cosine_row", "kl", "entropy", "js_adjacent")
CUDA = torch.cuda.is_available()

# the streaming tests' shapes: 3 layers, windows of 16 (cut through the tiles), Gemma 2 with a strong softcap;
# larger contexts than the shared tiny configs allow
STREAM_SHAPES = {
    "llama": dict(),
    "mistral": dict(sliding_window=16),
    "gemma2": dict(sliding_window=16, attn_logit_softcapping=5.0),
    "qwen3": dict(),
}


def tiny_model(name: str, dtype=torch.float32, device="cpu", seed=0, **overrides):
    """conftest's tiny model in the streaming shape (queries sharpened x4 so maps are not near-uniform)."""
    shape = {"n_layers": 3, "intermediate_size": 64, "max_position_embeddings": 4096, **STREAM_SHAPES[name], **overrides}
    if "num_hidden_layers" in shape:
        shape["n_layers"] = shape.pop("num_hidden_layers")
    return conftest.tiny_model(name, dtype=dtype, device=device, seed=seed, q_scale=4.0, **shape)


def maps_stats(model, ids, exclude_first=0, dtype=torch.float32, operand_dtype=None):
    maps = AttentionMaps(dtype=dtype)
    with torch.no_grad(), capture_attention(model, maps):
        model(ids, use_cache=False)
    log_probs = torch.stack([maps.log_probs[i][0] for i in range(len(maps.log_probs))])
    return sequence_stats_from_maps(log_probs, exclude_first=exclude_first, block=16, operand_dtype=operand_dtype)


def filled_store(model, ids, groups=None) -> QKStore:
    n_layers = model.config.num_hidden_layers
    store = QKStore.for_model(model) if groups is None else QKStore(
        n_layers, [LayerGroup(a, b, torch.device(d)) for a, b, d in groups])
    with torch.no_grad(), capture_attention(model, store):
        model(ids, use_cache=False)
    store.finish()
    return store


def assert_stats_close(got, ref, atol, rtol=0.0, atol_kl=None):
    assert got.n_rows == ref.n_rows
    for name in FIELDS:
        bound = atol_kl if name == "kl" and atol_kl is not None else atol
        a, b = getattr(got, name).double().cpu(), getattr(ref, name).double().cpu()
        assert a.shape == b.shape, name
        assert torch.equal(torch.isinf(a), torch.isinf(b)), f"{name}: infinite entries differ"
        finite = torch.isfinite(b)
        assert not torch.isnan(a).any(), name
        torch.testing.assert_close(a[finite], b[finite], atol=bound, rtol=rtol, msg=lambda m: f"{name}: {m}")


# ----- streaming == maps path -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(STREAM_SHAPES))
@pytest.mark.parametrize("exclude_first", [0, 3])
def test_streaming_equals_maps_path(name, exclude_first):
    model = tiny_model(name)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    ref = maps_stats(model, ids, exclude_first)
    got, logits = stream_sequence_stats(model, ids, exclude_first=exclude_first, block_rows=16)
    assert logits is None
    assert_stats_close(got, ref, atol=1e-5, rtol=1e-5)
    assert attention_implementation(model) == ("eager" if name == "gemma2" else "sdpa")


def test_sliding_and_global_layers_give_infinite_kl_one_way():
    model = tiny_model("gemma2")  # layer 0 slides (window 16), layer 1 is global
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    got, _ = stream_sequence_stats(model, ids)
    assert torch.isinf(got.kl[1, :, 0, :]).all()  # global attends where the window cannot
    assert torch.isfinite(got.kl[0, :, 1, :]).all()
    assert torch.isfinite(got.kl[0, :, 2, :]).all()


def test_window_longer_than_sequence_is_plain_causal():
    model = tiny_model("gemma2")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    got, _ = stream_sequence_stats(model, ids)
    assert torch.isfinite(got.kl).all()
    assert_stats_close(got, maps_stats(model, ids), atol=1e-5, rtol=1e-5)


def test_key_chunks_and_units_do_not_change_results():
    model = tiny_model("mistral")
    ids = torch.randint(0, 128, (1, 70), generator=torch.Generator().manual_seed(4))
    store = filled_store(model, ids)
    ref = StreamingStatistics(store, exclude_first=2).run()
    for rows, chunk, unit in [(8, 8, 64), (16, 24, 1000), (64, 64, 10**6)]:
        got = StreamingStatistics(store, exclude_first=2, block_rows=rows, key_chunk=chunk, unit_elements=unit).run()
        assert_stats_close(got, ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("operand_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_operands_close_to_fp32(operand_dtype):
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(5))
    store = filled_store(model, ids)
    ref = StreamingStatistics(store).run()
    got = StreamingStatistics(store, operand_dtype=operand_dtype).run()
    assert_stats_close(got, ref, atol=1e-3)
    for name in ("kl",):  # KL(a || a) stays exactly 0 with diag(C) as sum P log P
        kl = getattr(got, name).reshape(12, 12)
        assert torch.all(kl.diagonal() == 0)


def test_tri_and_full_products_agree():
    model = tiny_model("qwen3", num_hidden_layers=5)
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(6))
    store = filled_store(model, ids)
    full = StreamingStatistics(store, gram="full").run()
    for chunks in (2, 3, 7):
        tri = StreamingStatistics(store, gram="tri", tri_chunks=chunks).run()
        assert_stats_close(tri, full, atol=1e-6, rtol=1e-6)
    split = StreamingStatistics(store, gram="splitk", tri_chunks=4, block_rows=16, key_chunk=16).run()
    assert_stats_close(split, full, atol=5e-6, rtol=1e-5)


# ----- float64 reference written from the definitions ------------------------------------------------------------------
def reference_float64(log_probs: torch.Tensor, exclude_first: int):
    """DESIGN.md section 3, directly: loops over (layer, head) pairs of [L, H, n, n] float64 log-probabilities."""
    lp = drop_first_keys(log_probs.double(), exclude_first)
    L, H, n, _ = lp.shape
    rows = [i for i in range(n) if all(torch.isfinite(lp[l, h, i]).any() for l in range(L) for h in range(H))]
    lp = lp[:, :, rows]
    P = lp.exp()
    R = len(rows)
    cos_flat = torch.zeros(L, H, L, H, dtype=torch.float64)
    cos_row = torch.zeros_like(cos_flat)
    kl = torch.zeros_like(cos_flat)
    for l in range(L):
        for h in range(H):
            for m in range(L):
                for g in range(H):
                    a, b = P[l, h], P[m, g]
                    cos_flat[l, h, m, g] = (a * b).sum() / (a.norm() * b.norm())
                    cos_row[l, h, m, g] = torch.stack([
                        torch.dot(a[i], b[i]) / (a[i].norm() * b[i].norm()) for i in range(R)]).mean()
                    if ((a > 0) & ~torch.isfinite(lp[m, g])).any():
                        kl[l, h, m, g] = math.inf
                    else:
                        terms = torch.where(a > 0, a * (lp[l, h] - lp[m, g]), torch.zeros_like(a))
                        kl[l, h, m, g] = terms.sum() / R
    entropy = torch.zeros(L, H, dtype=torch.float64)
    js = torch.zeros(max(L - 1, 0), H, dtype=torch.float64)
    for l in range(L):
        for h in range(H):
            a = P[l, h]
            entropy[l, h] = -torch.where(a > 0, a * lp[l, h], torch.zeros_like(a)).sum() / R
            if l + 1 < L:
                b = P[l + 1, h]
                mix = 0.5 * (a + b)
                kl_am = torch.where(a > 0, a * (torch.log(a) - torch.log(mix)), torch.zeros_like(a)).sum()
                kl_bm = torch.where(b > 0, b * (torch.log(b) - torch.log(mix)), torch.zeros_like(b)).sum()
                js[l, h] = 0.5 * (kl_am + kl_bm) / R
    return dict(cosine_flat=cos_flat, cosine_row=cos_row, kl=kl, entropy=entropy, js_adjacent=js, n_rows=R)


@pytest.mark.parametrize("name,exclude_first", [("llama", 0), ("gemma2", 2)])
def test_against_float64_definitions(name, exclude_first):
    model = tiny_model(name, dtype=torch.float64, num_hidden_layers=2)
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(7))
    maps = AttentionMaps(dtype=torch.float64)
    with torch.no_grad(), capture_attention(model, maps):
        model(ids, use_cache=False)
    log_probs = torch.stack([maps.log_probs[i][0] for i in range(2)])
    ref = reference_float64(log_probs, exclude_first)
    got, _ = stream_sequence_stats(model, ids, exclude_first=exclude_first)
    assert got.n_rows == ref["n_rows"]
    for field in FIELDS:
        a, b = getattr(got, field).cpu(), ref[field]
        assert a.dtype == torch.float64
        assert torch.equal(torch.isinf(a), torch.isinf(b)), field
        fin = torch.isfinite(b)
        torch.testing.assert_close(a[fin], b[fin], atol=1e-10, rtol=1e-9, msg=lambda m: f"{field}: {m}")


# ----- generic (non-causal) masks: the support Gram path --------------------------------------------------------------
def test_generic_masks_match_pair_statistics():
    gen = torch.Generator().manual_seed(8)
    L, H, Hkv, n, D = 3, 4, 2, 20, 8
    inputs = []
    for layer in range(L):
        allowed = torch.rand(n, n, generator=gen) < 0.5
        allowed = (allowed | torch.eye(n, dtype=torch.bool)) & torch.ones(n, n, dtype=torch.bool).tril()
        if layer == 1:
            allowed[:, :2] = False  # padding-like: first keys masked in one layer
            allowed[:2, :] = False  # rows that see nothing: skipped everywhere
        mask = allowed[None, None]
        inputs.append(AttentionInputs(layer, torch.randn(1, H, n, D, generator=gen) * 2,
                                      torch.randn(1, Hkv, n, D, generator=gen), mask, 0.35))
    store = QKStore.from_inputs(inputs)
    assert all(s.generic_mask is not None for s in store.specs)
    stats = PairStatistics(L, H)
    log_probs = torch.stack([inp.log_probs()[0] for inp in inputs])
    for start in range(0, n, 7):
        stats.add(log_probs[:, :, start:start + 7, :start + 7])
    ref = stats.result()
    for groups in (None, [(0, 2), (2, 3)]):
        store = QKStore.from_inputs(inputs, groups=groups)
        got = StreamingStatistics(store, block_rows=5).run()
        assert_stats_close(got, ref, atol=1e-5, rtol=1e-5)
    assert torch.isinf(ref.kl).any()


def test_store_keeps_the_recorded_layout_and_values():
    """Queries/keys arrive token-major (a transposed [n, H, D] projection): the store copies them as they are."""
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    store = filled_store(model, ids)
    q, k = store.q[0], store.k[0]  # [L, H, n, D] views
    assert q.shape == (3, 4, 40, 16) and k.shape == (3, 2, 40, 16)
    assert q.stride(1) < q.stride(2) and k.stride(1) < k.stride(2)  # token-major underneath
    inputs = []

    class Keep:
        layers = None

        def record(self, inp):
            inputs.append(inp)

    with torch.no_grad(), capture_attention(model, Keep()):
        model(ids, use_cache=False)
    for layer, inp in enumerate(inputs):
        assert torch.equal(q[layer], inp.query[0]) and torch.equal(k[layer], inp.key[0])


# ----- several devices ---------------------------------------------------------------------------------------------
def test_layers_offloaded_by_accelerate_are_grouped_where_they_compute(tmp_path):
    """Offloaded weights sit on "meta" between forwards; the store must follow the hook's execution device."""
    from accelerate import dispatch_model

    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(16))
    plain, _ = stream_sequence_stats(model, ids)
    placement = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                 "model.layers.1": "disk", "model.layers.2": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    offloaded = dispatch_model(model, device_map=placement, main_device="cpu", offload_dir=str(tmp_path))
    assert next(offloaded.model.layers[1].parameters()).device.type == "meta"
    store = QKStore.for_model(offloaded)
    assert [(g.start, g.stop, g.device.type) for g in store.groups] == [(0, 3, "cpu")]
    got, _ = stream_sequence_stats(offloaded, ids)
    assert_stats_close(got, plain, atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("path", ["maps", "stream"])
def test_a_model_spread_over_gpu_and_cpu_gives_the_one_device_statistics(path):
    """Layers 0-1 on the GPU, 2-3 on the CPU (accelerate moves activations): a layer's input and output, and the
    maps of different layers, sit on different devices; matrices and Block Influence equal the one-device run."""
    from accelerate import dispatch_model

    from sa_analysis.pipeline import sequence_stats

    model = tiny_model("llama", dtype=torch.float32, num_hidden_layers=4)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(5))
    plain, plain_bi = sequence_stats(model, ids, path=path)
    placement = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
                 "model.layers.2": "cpu", "model.layers.3": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    spread = dispatch_model(model, device_map=placement)
    got, got_bi = sequence_stats(spread, ids.to("cuda:0"), path=path)
    # maps: the same float32 math on two devices; stream: the GPU layers go through Triton's fp16 operands (their
    # documented accuracy is 1e-3; 6e-5 seen on an H200), the CPU layers through the fp32 torch backend
    assert_stats_close(got, plain, atol=2e-5 if path == "maps" else 2e-4, rtol=1e-4 if path == "maps" else 1e-2)
    np.testing.assert_allclose(got_bi, plain_bi, atol=1e-5)


def test_layer_groups_on_two_devices_give_the_same_matrices():
    model = tiny_model("gemma2", num_hidden_layers=5)
    ids = torch.randint(0, 128, (1, 50), generator=torch.Generator().manual_seed(9))
    single = StreamingStatistics(filled_store(model, ids), exclude_first=1).run()
    store = filled_store(model, ids, groups=[(0, 2, "cpu"), (2, 5, "cpu")])
    # group 1 holds a copy of layer 1 (its halo) for the JS of layers 1-2
    assert store.groups[1].halo == 1
    assert torch.equal(store.q[1][0], store.q[0][1]) and torch.equal(store.k[1][0], store.k[0][1])
    engine = StreamingStatistics(store, exclude_first=1, block_rows=16, key_chunk=16)
    assert engine.gram == "full" and len(engine.states) == 2
    assert engine.states[0].acc_xy.shape[1] == 2 * 4 and engine.states[1].acc_xy.shape[1] == 3 * 4  # [parts, rows, 2N]
    got = engine.run()
    assert_stats_close(got, single, atol=5e-6, rtol=1e-5)


def test_store_groups_follow_module_devices():
    model = tiny_model("llama")
    store = QKStore.for_model(model)
    assert [(g.start, g.stop, g.device.type) for g in store.groups] == [(0, 3, "cpu")]


# ----- planning ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("windows", [[None, None], [5, 5], [5, None]])
@pytest.mark.parametrize("exclude_first", [0, 2])
def test_segments_cover_the_causal_region_once(windows, exclude_first):
    n = 23
    units = plan_segments(n, exclude_first, windows, block_rows=4, key_chunk=3, unit_elements=20)
    seen = torch.zeros(n, n, dtype=torch.long)
    for unit in units:
        offset = 0
        for seg in unit:
            assert seg.offset == offset
            offset += seg.elements
            seen[seg.r0:seg.r0 + seg.rows, seg.k0:seg.k0 + seg.keys] += 1
        assert offset <= 20 or len(unit) == 1
    rows, keys = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    needed = (keys <= rows) & (keys >= exclude_first) & (rows >= exclude_first)
    if all(windows):
        needed &= keys > rows - max(windows)
    assert (seen[needed] == 1).all()
    assert (seen <= 1).all()


class _Info:
    n_layers, n_heads, n_kv_heads, head_dim = 32, 32, 32, 128
    hidden_size, intermediate_size, vocab_size = 4096, 11008, 32000
    dtype, architecture, sliding_window, extra = "bfloat16", "llama", None, {}


def test_check_fits_plans_and_refuses_with_the_longest_length():
    plan = check_fits(_Info(), 4096, "cuda:0", free=60 * 1024**3)
    assert plan.block_rows == 128 and plan.key_chunk == 2048  # 1.5 GiB of fp16 operands per unit on a GPU
    assert plan.bytes_needed < 4 * 1024**3
    small = check_fits(_Info(), 4096, "cuda:0", free=60 * 1024**3, max_operand_bytes=768 * 1024**2)
    assert small.key_chunk == 1024 and small.bytes_needed < plan.bytes_needed
    with pytest.raises(UserError) as err:
        check_fits(_Info(), 32768, "cuda:0", free=20 * 1024**3)
    msg = str(err.value)
    assert "needs" in msg and "GiB but only 16.0 GiB are free on cuda:0" in msg
    longest = int(msg.split("the longest length that fits is ")[1].split(" ")[0])
    assert f"(use --seq-len {longest})" in msg
    assert 4096 < longest < 32768
    check_fits(_Info(), longest, "cuda:0", free=20 * 1024**3)
    with pytest.raises(UserError):
        check_fits(_Info(), longest + 256, "cuda:0", free=20 * 1024**3)


def test_check_fits_on_cpu_does_not_refuse():
    plan = check_fits(_Info(), 1 << 20, "cpu")
    assert plan.bytes_free is None and "cpu" in plan.describe()


# ----- sampled rows -------------------------------------------------------------------------------------------------
def sampled_store(model, ids, sample: RowSample) -> QKStore:
    store = QKStore.for_model(model, rows=sample.flat(ids.device))
    with torch.no_grad(), capture_attention(model, store):
        model(ids, use_cache=False)
    store.finish()
    return store


def every_row_as_two_replicates(n: int, exclude_first: int, fixed: int) -> RowSample:
    """A 'sample' that holds every row once: `fixed` first rows, then the even and the odd rest as two replicates
    (delta = 2, so each replicate's sums count once: delta / R = 1)."""
    rest = np.arange(exclude_first + fixed, n)
    assert len(rest) % 2 == 0
    return RowSample(n=n, exclude_first=exclude_first, fixed=fixed, positions=np.stack([rest[0::2], rest[1::2]]),
                     seed=0)


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2"])
@pytest.mark.parametrize("exclude_first,fixed", [(0, 0), (3, 5)])
def test_a_sample_of_every_row_equals_the_run_over_all_rows(name, exclude_first, fixed):
    model = tiny_model(name)
    n = 96 + exclude_first + fixed  # an even number of rows after the fixed ones
    ids = torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(21))
    exact = StreamingStatistics(filled_store(model, ids), exclude_first=exclude_first).run()
    sample = every_row_as_two_replicates(n, exclude_first, fixed)
    store = sampled_store(model, ids, sample)
    assert store.q[0].shape[2] == sample.rows and store.k[0].shape[2] == n  # only the sampled queries are kept
    got = StreamingStatistics(store, exclude_first=exclude_first, sample=sample, block_rows=16, key_chunk=32).run()
    # KL = (N - C) / rows is a difference of two float32 sums as large as the rows' entropy (3-4 nats here): summed in
    # other blocks (16 sampled rows at a time against all rows at once) it moves by a few float32 steps of that, up to
    # 2.2e-6 on this machine's releases (2026-12-07); every other statistic is a plain sum and keeps the 2e-6 bound
    assert_stats_close(got, exact, atol=2e-6, rtol=1e-5, atol_kl=4e-6)
    assert got.sampling["rows"] == n - exclude_first and set(got.se) >= set(FIELDS)


def test_a_sampled_run_on_two_device_groups_equals_one_group():
    model = tiny_model("gemma2", num_hidden_layers=4)
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(23))
    sample = RowSample.draw(300, 96, exclude_first=2, replicates=4, seed=1)
    single = StreamingStatistics(sampled_store(model, ids, sample), exclude_first=2, sample=sample).run()
    split = QKStore(4, [LayerGroup(0, 1, torch.device("cpu")), LayerGroup(1, 4, torch.device("cpu"))], sample.flat())
    with torch.no_grad(), capture_attention(model, split):
        model(ids, use_cache=False)
    split.finish()
    got = StreamingStatistics(split, exclude_first=2, sample=sample, block_rows=16).run()
    assert_stats_close(got, single, atol=2e-6, rtol=1e-5)
    for key, se in single.se.items():
        torch.testing.assert_close(got.se[key], se, atol=2e-6, rtol=1e-4)


def test_a_sampled_run_matches_float64_definitions_on_its_rows():
    """Independent of the engine: float64 maps, PairStatistics over each part's rows, combined by hand as
    fixed + delta / R * sum of the replicates."""
    model = tiny_model("mistral", dtype=torch.float64)
    n, exclude_first = 160, 2
    ids = torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(22))
    sample = RowSample.draw(n, 48, exclude_first=exclude_first, replicates=4, seed=3)
    assert sample.fixed > 0 and abs(sample.delta / sample.replicates - 1) > 0.5  # weights that matter
    got = StreamingStatistics(sampled_store(model, ids, sample), exclude_first=exclude_first, sample=sample).run()
    maps = AttentionMaps(dtype=torch.float64)
    with torch.no_grad(), capture_attention(model, maps):
        model(ids, use_cache=False)
    lp = drop_first_keys(torch.stack([maps.log_probs[i][0] for i in range(3)]), exclude_first)  # [L, H, n, n-k]
    parts = [np.arange(exclude_first, exclude_first + sample.fixed)] + list(sample.positions)
    sums = []
    for rows in parts:
        part = PairStatistics(3, lp.shape[1], dtype=torch.float64, track_support=True)
        part.add(lp[:, :, torch.as_tensor(rows)])
        sums.append(part)
    w = sample.delta / sample.replicates

    def combined(field):
        return getattr(sums[0], field) + w * sum(getattr(p, field) for p in sums[1:])

    rows = sums[0].n_rows + w * sum(p.n_rows for p in sums[1:])
    gram = combined("gram_flat")
    diag = gram.diagonal()
    neg_entropy = combined("neg_entropy")
    kl = (neg_entropy[:, None] - combined("cross_log")) / rows
    kl = torch.where(combined("support_miss") > 0, torch.full_like(kl, math.inf), kl).clamp_min(0)
    L, H = 3, lp.shape[1]
    expected = dict(cosine_flat=gram / torch.sqrt(diag[:, None] * diag[None, :]), cosine_row=combined("gram_row") / rows,
                    kl=kl, entropy=-neg_entropy / rows, js_adjacent=combined("js_sum") / rows)
    for field, ref in expected.items():
        a, b = getattr(got, field).reshape(-1), ref.reshape(-1)
        assert torch.equal(torch.isinf(a), torch.isinf(b)), field
        fin = torch.isfinite(b)
        torch.testing.assert_close(a[fin], b[fin], atol=1e-10, rtol=1e-9, msg=lambda m: f"{field}: {m}")
    assert got.se["kl"].shape == (L, H, L, H) and got.se["kl_layers"].shape == (L, L)
    assert (got.se["kl"][torch.isinf(got.kl)] == 0).all()  # infinite KL is decided exactly from the windows


def test_row_samples_weigh_every_position_equally_and_keep_the_first_stretch():
    n, k = 1000, 7
    sample = RowSample.draw(n, 64, exclude_first=k, replicates=16, seed=0)
    assert sample.strata == 4 and sample.rows == sample.fixed + 64
    assert torch.equal(sample.flat()[: sample.fixed], torch.arange(k, k + sample.fixed))
    start = k + sample.fixed
    for s in range(sample.strata):  # one row per stretch of delta rows
        lo, hi = start + math.floor(s * sample.delta), start + math.ceil((s + 1) * sample.delta)
        assert ((sample.positions[:, s] >= lo) & (sample.positions[:, s] < hi)).all()
    counts = np.zeros(n)
    draws = 3000
    for seed in range(draws):
        np.add.at(counts, RowSample.draw(n, 32, exclude_first=k, replicates=2, seed=seed).positions.reshape(-1), 1)
    rest = counts[k + RowSample.draw(n, 32, exclude_first=k, replicates=2).fixed:]
    expected = draws * 32 / len(rest)  # every sampled position equally often
    assert abs(rest.mean() - expected) < 1e-9
    assert np.abs(rest - expected).max() < 5 * math.sqrt(expected)  # binomial spread, no position favoured
    with pytest.raises(ValueError, match="at least 2 replicates"):
        RowSample.draw(n, 64, replicates=1)


def test_sampled_estimates_are_unbiased_and_their_standard_errors_match_their_spread():
    model = tiny_model("llama")
    n = 384
    ids = torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(1))
    exact = StreamingStatistics(filled_store(model, ids)).run()
    draws = {f: [] for f in ("cosine_flat", "cosine_row", "kl", "entropy")}
    errors = {f: [] for f in draws}
    for seed in range(40):
        sample = RowSample.draw(n, 64, replicates=8, seed=seed)
        got = StreamingStatistics(sampled_store(model, ids, sample), sample=sample).run()
        for f in draws:
            draws[f].append(getattr(got, f).double())
            errors[f].append(got.se[f])
    for f in draws:
        values, se = torch.stack(draws[f]), torch.stack(errors[f]).mean(0)
        spread = values.std(0)
        varies = spread > 1e-6  # the diagonals are exact (cosine 1, KL 0)
        ratio = (se[varies] / spread[varies]).median()
        assert 0.75 < ratio < 1.25, (f, float(ratio))  # the jackknife error is the spread one draw has
        bias = (values.mean(0) - getattr(exact, f).double())[varies] / (spread[varies] / math.sqrt(40))
        assert bias.abs().median() < 1.5 and (bias.abs() > 4.5).float().mean() < 0.01, f  # unbiased


def test_a_sampled_run_refuses_a_store_that_kept_other_rows():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(2))
    sample = RowSample.draw(200, 64, replicates=4, seed=0)
    with pytest.raises(ValueError, match="exactly the sampled rows"):
        StreamingStatistics(filled_store(model, ids), sample=sample)
    with pytest.raises(ValueError, match="pass the RowSample"):
        StreamingStatistics(sampled_store(model, ids, sample))


def test_check_fits_counts_only_the_sampled_query_rows():
    n = 131072
    sample = RowSample.draw(n, 16384, replicates=16)
    exact = check_fits(_Info(), n, "cpu")
    sampled = check_fits(_Info(), n, "cpu", sample=sample)
    info = _Info()
    saved = info.n_layers * info.n_heads * (n - sample.rows) * info.head_dim * 2  # bf16 queries not kept
    assert exact.bytes_qk - sampled.bytes_qk == saved


# ----- CUDA: the Triton kernels -------------------------------------------------------------------------------------
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(STREAM_SHAPES))
def test_cuda_triton_equals_maps_path(name):
    model = tiny_model(name, device="cuda")
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(10)).cuda()
    for exclude_first in (0, 5):
        ref = maps_stats(model, ids, exclude_first)
        store = filled_store(model, ids)
        engine = StreamingStatistics(store, exclude_first=exclude_first, operand_dtype=torch.float32)
        assert engine.backend == "triton"
        assert_stats_close(engine.run(), ref, atol=2e-5, rtol=1e-4)
        got, _ = stream_sequence_stats(model, ids, exclude_first=exclude_first)  # fp16 operands
        assert_stats_close(got, ref, atol=1e-3)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("tiles", [((64, 64, 4), (128, 64, 4)), ((64, 128, 8), (128, 128, 8)),
                                   ((128, 64, 8), (64, 64, 4)), ((32, 32, 4), (32, 32, 2)),
                                   ((64, 64, 4, 2, 168), (64, 64, 4))])
@pytest.mark.parametrize("name, overrides, n, exclude_first", [
    ("gemma2", {}, 200, 3),
    ("mistral", dict(sliding_window=100), 400, 70),  # window edges and excluded keys cut through tiles
    ("qwen3", dict(head_dim=24), 260, 0),  # head_dim padded to 32 inside the kernels
])
def test_cuda_tiles_and_mask_free_paths_equal_maps_path(tiles, name, overrides, n, exclude_first):
    model = tiny_model(name, device="cuda", **overrides)
    ids = torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(14)).cuda()
    ref = maps_stats(model, ids, exclude_first)
    engine = StreamingStatistics(filled_store(model, ids), exclude_first=exclude_first, operand_dtype=torch.float32,
                                 tile=tiles[0], stats_tile=tiles[1], unit_elements=128 * 256)
    assert_stats_close(engine.run(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_bf16_model_against_float64_maps():
    model = tiny_model("llama", dtype=torch.bfloat16, device="cuda", num_hidden_layers=4)
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(11)).cuda()
    ref = maps_stats(model, ids, dtype=torch.float64)
    got, _ = stream_sequence_stats(model, ids)
    assert_stats_close(got, ref, atol=1e-3)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_two_groups_on_one_gpu_equal_single_group():
    model = tiny_model("gemma2", device="cuda", num_hidden_layers=4)
    ids = torch.randint(0, 128, (1, 150), generator=torch.Generator().manual_seed(12)).cuda()
    single = StreamingStatistics(filled_store(model, ids), operand_dtype=torch.float32).run()
    split = filled_store(model, ids, groups=[(0, 1, "cuda"), (1, 4, "cuda")])
    got = StreamingStatistics(split, operand_dtype=torch.float32).run()
    assert_stats_close(got, single, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_model_spread_over_gpu_and_cpu_by_accelerate_gives_the_same_matrices():
    """A real device map (accelerate hooks, layers 0-1 on the GPU, 2-3 on the CPU) equals the one-device run."""
    from accelerate import dispatch_model

    model = tiny_model("mistral", num_hidden_layers=4)
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(15))
    single, _ = stream_sequence_stats(model, ids, exclude_first=2, operand_dtype=torch.float32)
    placement = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
                 "model.layers.2": "cpu", "model.layers.3": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    spread = dispatch_model(model, device_map=placement, main_device="cpu")  # the "cpu" layers compute there
    store = QKStore.for_model(spread)
    assert [(g.start, g.stop, g.device.type) for g in store.groups] == [(0, 2, "cuda"), (2, 4, "cpu")]
    got, _ = stream_sequence_stats(spread, ids, exclude_first=2, operand_dtype=torch.float32)
    assert_stats_close(got, single, atol=2e-5, rtol=1e-4)  # layers 0-1 computed on the GPU, 2-3 on the CPU


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("name, overrides, exclude_first", [("llama", {}, 0), ("mistral", dict(sliding_window=100), 5),
                                                             ("gemma2", {}, 3), ("qwen3", dict(head_dim=24), 0)])
def test_cuda_sampled_rows_equal_the_torch_backend_and_float64(name, overrides, exclude_first):
    """The Triton kernels at sampled positions (ROWPOS) against the torch backend on the same rows, and a sample of
    every row against the float64 maps."""
    model = tiny_model(name, device="cuda", **overrides)
    n = 600
    ids = torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(16)).cuda()
    sample = RowSample.draw(n, 128, exclude_first=exclude_first, replicates=4, seed=5)
    store = sampled_store(model, ids, sample)
    kwargs = dict(exclude_first=exclude_first, sample=sample, operand_dtype=torch.float32, unit_elements=64 * 256)
    triton = StreamingStatistics(store, backend="triton", **kwargs)
    assert triton.backend == "triton"
    torch_ref = StreamingStatistics(store, backend="torch", **kwargs).run()
    got = triton.run()
    assert_stats_close(got, torch_ref, atol=2e-5, rtol=1e-4)
    for key in torch_ref.se:
        torch.testing.assert_close(got.se[key].cpu(), torch_ref.se[key].cpu(), atol=2e-5, rtol=1e-3)
    full = every_row_as_two_replicates(n, exclude_first, (n - exclude_first) % 2)
    ref = maps_stats(model, ids, exclude_first, dtype=torch.float64)
    every = StreamingStatistics(sampled_store(model, ids, full), exclude_first=exclude_first, sample=full).run()
    assert_stats_close(every, ref, atol=1e-3)


# ----- sampled rows through the heatmap job ----------------------------------------------------------------------------
def test_the_heatmap_job_samples_rows_says_why_and_keeps_standard_errors(tmp_path, monkeypatch):
    from sa_analysis import defaults
    from sa_analysis.data import TokenBatch
    from sa_analysis.loading import LoadedModel, describe
    from sa_analysis.pipeline import analyse
    from sa_analysis.planner import plan_spans
    from sa_analysis.report import AttentionReport

    model = tiny_model("llama", num_hidden_layers=4)
    loaded = LoadedModel(model, None, describe(model, "tiny-llama", "tiny-llama", "random-init"))
    batch = TokenBatch(torch.randint(3, 128, (2, 320), generator=torch.Generator().manual_seed(4)), "random",
                       "calibration", 1)
    heard = []
    report = analyse(loaded, batch, rows=96, notice=heard.append)
    assert heard == []  # asked for: nothing to explain
    assert report.meta["settings"]["path"] == "stream" and report.sampling["replicates"] == defaults.REPLICATES
    assert report.arrays["kl_mean_se"].shape == report.arrays["kl_mean"].shape
    assert report.arrays["cosine_flat_layers_se"].shape == report.arrays["cosine_flat_layers"].shape
    se = report.layer_matrix_se("kl")
    off = ~np.eye(4, dtype=bool)
    assert (se[off] > 0).all() and (np.diag(se) == 0).all()  # KL(a || a) = 0 exactly in every replicate
    report.save(tmp_path / "report")
    again = AttentionReport.load(tmp_path / "report.json")
    assert np.array_equal(again.layer_matrix_se("kl"), se) and again.sampling == report.sampling
    plan = plan_spans(again, budget=1, stability_resamples=0)
    assert plan.n_shared == 1 and any("estimates from" in note and "standard errors up to" in note for note in plan.notes)
    assert AttentionReport.load(tmp_path / "report.json").layer_matrix_se("cosine_row") is not None
    with pytest.raises(UserError, match="half or more of the 320 query rows"):
        analyse(loaded, batch, rows=200)
    with pytest.raises(UserError, match="drop --path maps"):
        analyse(loaded, batch, rows=96, path="maps")
    every = analyse(loaded, batch, rows="all", path="stream")
    assert every.layer_matrix_se("kl") is None and every.sampling is None
    assert not any("estimates from" in note for note in plan_spans(every, budget=1, stability_resamples=0).notes)
    monkeypatch.setattr(defaults, "SAMPLE_ABOVE_SECONDS", 0.0)  # "all rows would take too long" here
    monkeypatch.setattr(defaults, "SAMPLE_TARGET_SECONDS", 0.0)  # the fewest rows a sampled run takes
    auto = analyse(loaded, batch, path="stream", notice=heard.append)
    assert auto.sampling is not None and len(heard) == 1
    assert "all 320 query rows would take about" in heard[0] and "--rows all" in heard[0]
    assert f"estimated from {auto.sampling['rows']} of them" in heard[0]
    assert auto.meta["settings"]["rows_note"] == heard[0] and auto.sampling["rows"] > 8 * defaults.REPLICATES


def test_predicted_seconds_count_the_gram_work(monkeypatch):
    from sa_analysis.streaming import cost

    monkeypatch.setattr(cost, "matmul_rate", lambda device: 1e12)  # 1 TFLOP/s, whatever the device
    n, N = 4096, 32 * 32
    assert cost.causal_elements(n) == n * (n + 1) / 2
    assert cost.gram_flops(N, cost.causal_elements(n)) == pytest.approx(5 * N**2 * n * (n + 1) / 2)
    cuda = cost.predicted_seconds(32, 32, n, 0, "cuda:0")
    assert cuda == pytest.approx(1.8 * 5 * N**2 * n * (n + 1) / 2 / 1e12)
    assert cost.predicted_seconds(32, 32, n, 0, "cpu") == pytest.approx(cuda * 6.3 / 1.8)
    sampled = cost.predicted_seconds(32, 32, n, 0, "cuda:0", rows=512)  # stratified rows see n / 2 keys on average
    assert sampled / cuda == pytest.approx(512 * n / 2 / cost.causal_elements(n))
