"""Shared Attention patch: parity with an independent eager reference, fast == exact, generate(), the K-less cache,
clean removal, and clear refusals, on tiny models of every supported shape and on the real default model.

The reference (`reference_logits`) shares nothing with sa_analysis.patch: it runs a deep copy of the model with
its own eager attention function in float64, in which a follower multiplies its *own* (repeated) values by the
softmax its anchor computed in the same forward. Sliding windows and softcapping come from the eager mask and
the model's own call arguments.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache

from conftest import tiny_model
from sa_analysis.compat import attention_implementation, cache_kwargs
from sa_analysis.errors import UserError
from sa_analysis.patch import SharedAttention, cache_bytes, layer_cache_bytes, plan_anchors, share_attention

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"]
PLANS = {"span": {2: 1, 3: 1}, "split": {1: 0, 3: 2}}
SEQ = 12  # longer than the tiny sliding windows (6)


pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(batch=2, seq=SEQ, seed=1):
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, **kwargs).logits


def _tol(model) -> float:
    """float64 tolerance: Gemma 2 runs eager attention, whose softmax is float32 even in float64 models (its own
    non-shared layers too), so it matches float64 math only to float32 precision."""
    return 1e-6 if attention_implementation(model) == "eager" else 1e-10


# ----- the independent reference -------------------------------------------------------------------------------
def reference_model(model, anchor_of: dict[int, int], detach_shared: bool = False, head_map: dict | None = None):
    """A float64 eager copy of `model` in which each follower uses its anchor's softmax with its own V.

    `detach_shared=True` cuts the gradient of the reused softmax (to show what the follower path contributes);
    `head_map` {follower: [anchor head per query head]} makes follower head h take the anchor's head map[h].
    """
    head_map = head_map or {}
    probs: dict[int, torch.Tensor] = {}

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **_):
        n_rep = query.shape[1] // key.shape[1]
        key = torch.repeat_interleave(key, n_rep, dim=1)  # [B, H, K, D]
        value = torch.repeat_interleave(value, n_rep, dim=1)  # [B, H, K, D]
        scores = torch.einsum("bhqd,bhkd->bhqk", query, key) * scaling
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        if attention_mask is not None:
            scores = scores + attention_mask  # eager's additive mask, windows included
        weights = torch.softmax(scores, dim=-1)
        layer = module.layer_idx
        if layer in anchor_of:
            weights = probs[anchor_of[layer]]
            if layer in head_map:
                weights = weights[:, list(head_map[layer])]  # [B, H, Q, K]: head h <- anchor head map[h]
            weights = weights.detach() if detach_shared else weights
        else:
            probs[layer] = weights
        return torch.einsum("bhqk,bhkd->bqhd", weights, value), weights

    name = f"sa_test_reference_{len(_REFERENCES)}"
    _REFERENCES.append(name)
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, AttentionMaskInterface()["eager"])
    reference = copy.deepcopy(model).to(torch.float64)
    reference.set_attn_implementation(name)
    return reference


_REFERENCES: list[str] = []  # one registered name per reference model (each has its own closure)


def reference_logits(model, ids, anchor_of: dict[int, int], head_map: dict | None = None) -> torch.Tensor:
    """Logits of `reference_model`."""
    return _logits(reference_model(model, anchor_of, head_map=head_map), ids)


# ----- parity ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_empty_plan_is_bit_identical(arch, device):
    model = tiny_model(arch, device=device)
    ids = _ids().to(device)
    base = _logits(model, ids)
    with share_attention(model, {}):
        assert torch.equal(_logits(model, ids), base)
        cached = DynamicCache(config=model.config)
        with torch.no_grad():
            step = model(input_ids=ids, **cache_kwargs(model, cached), use_cache=True).logits
    assert torch.equal(step, base)


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("arch", ARCHS)
def test_exact_mode_equals_independent_reference(arch, plan, device):
    model = tiny_model(arch, device=device)
    ids = _ids().to(device)
    expected = reference_logits(model, ids, PLANS[plan])
    with share_attention(model, PLANS[plan], mode="exact"):
        got = _logits(model, ids)
    assert not torch.allclose(expected, _logits(model, ids), atol=1e-3)  # sharing really changes the output
    torch.testing.assert_close(got, expected, rtol=_tol(model), atol=_tol(model))


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_equals_exact_float64(arch, device):
    model = tiny_model(arch, device=device)
    ids = _ids().to(device)
    for plan in PLANS.values():
        with share_attention(model, plan, mode="fast"):
            fast = _logits(model, ids)
        with share_attention(model, plan, mode="exact"):
            exact = _logits(model, ids)
        torch.testing.assert_close(fast, exact, rtol=_tol(model), atol=_tol(model))


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_equals_exact_bfloat16(arch, device):
    model = tiny_model(arch, dtype=torch.bfloat16, device=device)
    ids = _ids().to(device)
    base = _logits(model, ids).float()
    with share_attention(model, PLANS["span"], mode="fast"):
        fast = _logits(model, ids).float()
    with share_attention(model, PLANS["span"], mode="exact"):
        exact = _logits(model, ids).float()
    scale = exact.abs().max()
    assert (fast - exact).abs().max() <= 0.02 * scale  # a few bf16 ulps (2^-8 relative) of the logit range
    assert (base - exact).abs().max() >= 0.2 * scale  # while sharing itself moves the logits far more


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])  # tiny Gemma 2 gives NaN on padded rows even unpatched
def test_padding_fast_equals_exact(arch):
    model = tiny_model(arch)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding in the first sequence
    with share_attention(model, PLANS["span"], mode="fast"):
        fast = _logits(model, ids, attention_mask=mask)
    with share_attention(model, PLANS["span"], mode="exact"):
        exact = _logits(model, ids, attention_mask=mask)
    keep = mask.bool()
    torch.testing.assert_close(fast[keep], exact[keep], rtol=_tol(model), atol=_tol(model))


# ----- generate and the KV cache ----------------------------------------------------------------------------------
def _greedy_without_cache(model, prompt, n_new):
    tokens = prompt
    for _ in range(n_new):
        nxt = _logits(model, tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens


@pytest.mark.parametrize("mode", ["fast", "exact", "infer"])
@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_and_without_cache_matches_full_forward_loop(arch, mode, device):
    model = tiny_model(arch, device=device)
    model.generation_config.eos_token_id = None  # always generate n_new tokens, like the loop
    prompt = _ids(seq=5).to(device)
    n_new = 10  # 15 tokens in all: past the sliding window of 6
    gen = dict(max_new_tokens=n_new, do_sample=False, attention_mask=torch.ones_like(prompt), pad_token_id=0)
    with share_attention(model, PLANS["span"], mode=mode), torch.no_grad():
        expected = _greedy_without_cache(model, prompt, n_new)
        with_cache = model.generate(prompt, use_cache=True, **gen)
        without_cache = model.generate(prompt, use_cache=False, **gen)
    assert torch.equal(with_cache, expected)
    assert torch.equal(without_cache, expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_follower_cache_holds_values_but_no_keys(arch, device):
    model = tiny_model(arch, device=device)
    ids = _ids().to(device)
    plan = PLANS["span"]
    with share_attention(model, plan), torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
        model(input_ids=ids[:, :1], **cache_kwargs(model, cache), use_cache=True)  # one decode step
    per_layer = layer_cache_bytes(cache)
    for layer, (k_bytes, v_bytes) in enumerate(per_layer):
        if layer in plan:
            assert k_bytes == 0 and v_bytes == per_layer[plan[layer]][1] > 0
        else:
            assert k_bytes == v_bytes > 0
    assert cache.get_seq_length() == SEQ + 1
    total = cache_bytes(cache)
    assert total["keys"] == sum(k for k, _ in per_layer) and total["total"] == total["keys"] + total["values"]


def test_followers_never_call_q_or_k_projections():
    model = tiny_model("qwen3")  # QK-norm too
    calls: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "k_proj", "q_norm", "k_norm")):
            calls[name] = 0
            handles.append(module.register_forward_hook(lambda *_a, n=name: calls.__setitem__(n, calls[n] + 1)))
    ids = _ids(seq=5)
    with share_attention(model, PLANS["span"]), torch.no_grad():
        model(input_ids=ids)
        model.generate(ids, max_new_tokens=3, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    for handle in handles:
        handle.remove()
    for name, count in calls.items():
        layer = int(name.split(".")[2])
        assert (count == 0) == (layer in PLANS["span"]), (name, count)


def test_gradients_flow_from_followers_into_the_anchor():
    """The anchor's q_proj gradient equals the reference's, which differs when the reused softmax is detached."""
    model = tiny_model("llama")
    ids = _ids()

    def anchor_q_grad(net):
        logits = net(input_ids=ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        net.zero_grad()
        loss.backward()
        return net.model.layers[1].self_attn.q_proj.weight.grad.clone()

    expected = anchor_q_grad(reference_model(model, PLANS["span"]))
    without_followers = anchor_q_grad(reference_model(model, PLANS["span"], detach_shared=True))
    for mode in ("fast", "exact"):
        with share_attention(model, PLANS["span"], mode=mode):
            got = anchor_q_grad(model)
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
    assert not torch.allclose(expected, without_followers, rtol=1e-3)
    assert model.model.layers[2].self_attn.v_proj.weight.grad is not None


# ----- applying and removing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_remove_restores_the_model_exactly(arch):
    model = tiny_model(arch)
    ids = _ids()
    base = _logits(model, ids)
    originals = [layer.self_attn for layer in model.model.layers]
    impl, types = attention_implementation(model), getattr(model.config, "layer_types", None)
    types = list(types) if types else types

    handle = share_attention(model, PLANS["span"])
    assert isinstance(model.model.layers[2].self_attn, SharedAttention)
    assert not torch.equal(_logits(model, ids), base)
    handle.remove()
    handle.remove()  # idempotent
    assert torch.equal(_logits(model, ids), base)
    assert [layer.self_attn for layer in model.model.layers] == originals
    assert attention_implementation(model) == impl
    assert (list(model.config.layer_types) if types else None) == types
    assert not any("_sa_share" in m.__dict__ for m in model.modules())

    with pytest.raises(KeyError):
        with share_attention(model, PLANS["split"], mode="exact"):
            raise KeyError("boom")
    assert torch.equal(_logits(model, ids), base)
    assert [layer.self_attn for layer in model.model.layers] == originals


def test_shareplan_and_mapping_are_accepted():
    from sa_analysis.planner import SharePlan

    model = tiny_model("llama")
    ids = _ids()
    with share_attention(model, PLANS["span"]):
        from_mapping = _logits(model, ids)
    with share_attention(model, SharePlan.from_spans("2-3", 4)) as handle:
        assert handle.anchor_of == PLANS["span"]
        assert torch.equal(_logits(model, ids), from_mapping)


# ----- head maps (head-aligned sharing) -------------------------------------------------------------------------------
# 4 query heads in 2 KV groups: identity; a swap inside each group (stays grouped); heads crossing groups (keys
# expanded per query head); several heads reusing one anchor head (grouped, key heads reordered)
HEAD_MAPS = {"identity": [0, 1, 2, 3], "within-groups": [1, 0, 3, 2], "across-groups": [2, 0, 3, 1], "many-to-one": [3, 3, 0, 0]}


@pytest.mark.parametrize("mode", ["fast", "exact"])
@pytest.mark.parametrize("arch", ARCHS)
def test_identity_head_map_is_bit_identical_to_index_sharing(arch, mode, device):
    model = tiny_model(arch, device=device)
    ids = _ids().to(device)
    with share_attention(model, PLANS["span"], mode=mode):
        by_index = _logits(model, ids)
    with share_attention(model, PLANS["span"], mode=mode, head_map={2: HEAD_MAPS["identity"], 3: HEAD_MAPS["identity"]}) as handle:
        assert all(handle.model.model.layers[m].self_attn.head_map == (0, 1, 2, 3) for m in (2, 3))  # the gather really ran
        assert torch.equal(_logits(model, ids), by_index)


@pytest.mark.parametrize("head_map", list(HEAD_MAPS))
@pytest.mark.parametrize("arch", ARCHS)
def test_head_maps_equal_independent_reference(arch, head_map, device):
    model = tiny_model(arch, device=device)
    ids = _ids().to(device)
    maps = {2: HEAD_MAPS[head_map], 3: HEAD_MAPS["across-groups"]}
    expected = reference_logits(model, ids, PLANS["span"], maps)
    for mode in ("exact", "fast"):
        with share_attention(model, PLANS["span"], mode=mode, head_map=maps):
            got = _logits(model, ids)
        torch.testing.assert_close(got, expected, rtol=_tol(model), atol=_tol(model))
    if head_map != "identity":
        assert not torch.allclose(expected, reference_logits(model, ids, PLANS["span"]), atol=1e-3)  # the map matters


@pytest.mark.parametrize("mode", ["fast", "exact", "infer"])
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_head_maps_generate_with_cache_like_a_full_forward_loop(arch, mode):
    model = tiny_model(arch)
    model.generation_config.eos_token_id = None
    prompt = _ids(seq=5)
    gen = dict(max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(prompt), pad_token_id=0)
    maps = {2: HEAD_MAPS["across-groups"], 3: HEAD_MAPS["within-groups"]}
    with share_attention(model, PLANS["span"], mode=mode, head_map=maps), torch.no_grad():
        expected = _greedy_without_cache(model, prompt, 10)
        assert torch.equal(model.generate(prompt, use_cache=True, **gen), expected)


def test_head_map_travels_in_a_shareplan_and_back_through_json(tmp_path):
    from sa_analysis.planner import SharePlan

    model = tiny_model("llama")
    ids = _ids()
    plan = SharePlan(4, [2, 3], model={"n_heads": 4}, head_map={3: HEAD_MAPS["across-groups"]})
    plan.save(tmp_path / "plan.json")
    loaded = SharePlan.load(tmp_path / "plan.json")
    with share_attention(model, PLANS["span"], head_map={3: HEAD_MAPS["across-groups"]}):
        expected = _logits(model, ids)
    with share_attention(model, loaded) as handle:
        assert handle.head_map == {3: (2, 0, 3, 1)}
        assert torch.equal(_logits(model, ids), expected)


@pytest.mark.parametrize("head_map, words", [
    ({1: [0, 1, 2, 3]}, "does not share"),
    ({2: [0, 1, 2]}, "4 query heads"),
    ({2: [0, 1, 2, 4]}, "outside 0..3"),
    ({2: ["a", 1, 2, 3]}, "integers"),
])
def test_bad_head_maps_are_refused_clearly(head_map, words):
    with pytest.raises(UserError, match=words):
        share_attention(tiny_model("llama"), PLANS["span"], head_map=head_map)


# ----- refusals ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("plan, words", [
    ({0: 0}, "layer 0"),
    ({2: 0}, "last non-shared layer"),
    ({2: 3}, "earlier layer"),
    ({2: 1, 1: 0}, "itself shared"),
    ({5: 4}, "1..3"),
    ({"a": 1}, "mapping"),
])
def test_bad_plans_are_refused_clearly(plan, words):
    with pytest.raises(UserError, match=words):
        plan_anchors(plan, 4)


def test_plan_for_another_model_is_refused():
    from sa_analysis.planner import SharePlan

    with pytest.raises(UserError, match="30-layer model"):
        share_attention(tiny_model("llama"), SharePlan.from_spans("20-22", 30))


def test_unsupported_model_is_refused():
    model = tiny_model("gpt2")
    with pytest.raises(UserError, match="not supported for 'gpt2'"):
        share_attention(model, {1: 0})


def test_unknown_mode_and_double_patch_are_refused():
    model = tiny_model("llama")
    with pytest.raises(UserError, match="mode"):
        share_attention(model, {}, mode="fastest")
    with share_attention(model, {2: 1}):
        with pytest.raises(UserError, match="already patched"):
            share_attention(model, {3: 2})


# ----- the real default model -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_parity(default_model):
    from sa_analysis.data import token_batch

    model = default_model.model
    ids = token_batch(default_model.tokenizer, split="heldout", n_seqs=2, seq_len=64).input_ids
    base = _logits(model, ids)
    with share_attention(model, {}):
        assert torch.equal(_logits(model, ids), base)
    plan = {20: 19, 21: 19, 22: 19}
    with share_attention(model, plan, mode="fast"):
        fast = _logits(model, ids)
    with share_attention(model, plan, mode="exact"):
        exact = _logits(model, ids)
    assert not torch.allclose(fast, base, atol=1e-2)
    torch.testing.assert_close(fast, exact, rtol=1e-4, atol=1e-4)
    assert torch.equal(_logits(model, ids), base)


# ----- the benchmark script runs on the CPU ----------------------------------------------------------------------------
def test_bench_patch_tiny_runs_on_cpu(tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_patch.py"
    spec = importlib.util.spec_from_file_location("bench_patch", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--tiny", "--prefill-len", "32", "--prompt-len", "16", "--new-tokens", "2", "--batches", "1",
            "--repeats", "1", "--out", str(tmp_path)]
    assert bench.main(args) == 0
    result = json.loads((tmp_path / "bench_patch.json").read_text())
    assert result["prefill"]["result"]["ratio"]["kv_cache_bytes"] == pytest.approx(1 - 8 / 64)
    assert result["sanity"]["fast_vs_exact_max_abs"] < 1e-4
    assert "decode tokens/s" in capsys.readouterr().out


def test_bench_decode_reads_its_cells_and_sets_the_decode_path_of_each_variant(monkeypatch):
    """What a GPU run of bench_decode depends on before it times anything (a cell "maxx32768" once failed there)."""
    import importlib.util
    from pathlib import Path

    from sa_analysis.patch import kernels

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decode.py"
    spec = importlib.util.spec_from_file_location("bench_decode", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.cell_shape(None, "8x2048", 64) == (8, 2048)
    monkeypatch.setattr(bench, "fits", lambda loaded, batch, context, n_new: batch * (context + n_new) <= 3 * 40000)
    assert bench.cell_shape(None, "maxx32768", 64) == (3, 32768)
    assert [bench.new_tokens_for(c, None) for c in (2048, 8192, 32768)] == [64, 64, 128]
    assert bench.new_tokens_for(32768, 16) == 16
    model = tiny_model("llama")
    before = kernels.ENABLED, kernels.IN_EAGER
    seen = {}
    for name in ("patched", "patched matmul", "patched kernels"):
        with bench.variant(model, PLANS["span"], name, "infer"):
            seen[name] = (kernels.ENABLED, kernels.IN_EAGER, hasattr(model.model.layers[2].self_attn, "anchor_idx"))
    assert seen == {"patched": (True, False, True), "patched matmul": (False, False, True), "patched kernels": (True, True, True)}
    assert (kernels.ENABLED, kernels.IN_EAGER) == before


def test_kernel_settings_are_restored_after_the_block_and_unknown_names_refused():
    from sa_analysis.patch import kernels

    before = kernels.ENABLED, kernels.PROGRAMS_PER_SM
    with pytest.raises(RuntimeError), kernels.settings(ENABLED=not before[0], PROGRAMS_PER_SM=before[1] + 3):
        assert (kernels.ENABLED, kernels.PROGRAMS_PER_SM) == (not before[0], before[1] + 3)
        raise RuntimeError("inside the block")
    assert (kernels.ENABLED, kernels.PROGRAMS_PER_SM) == before
    with pytest.raises(ValueError, match="no kernel setting PROGRAMS_PER_CU"), kernels.settings(PROGRAMS_PER_CU=2):
        pass
    assert not hasattr(kernels, "PROGRAMS_PER_CU")


# ----- the inference path: decode steps reuse the anchor's softmax row --------------------------------------------
def _decode_logits(model, prompt, steps, mode, cache_kind="dynamic", head_map=None):
    """[steps, B, V] logits of greedy decode steps after `prompt`, patched in `mode`, through a cache of `cache_kind`."""
    from transformers import StaticCache

    found = []
    with share_attention(model, PLANS["span"], mode=mode, head_map=head_map), torch.no_grad():
        cache = (StaticCache(config=model.config, max_cache_len=prompt.shape[1] + steps + 1) if cache_kind == "static"
                 else DynamicCache(config=model.config))
        out = model(input_ids=prompt, **cache_kwargs(model, cache), use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        for step in range(steps):
            position = torch.full((prompt.shape[0], 1), prompt.shape[1] + step, device=prompt.device)
            out = model(input_ids=token, **cache_kwargs(model, cache), use_cache=True, position_ids=position,
                        cache_position=position[0])
            found.append(out.logits[:, -1])
            token = out.logits[:, -1:].argmax(-1)
    return torch.stack(found)


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@pytest.mark.parametrize("arch", ARCHS)
def test_infer_decode_steps_equal_exact_mode_float64(arch, cache_kind, device):
    model = tiny_model(arch, device=device)
    prompt = _ids(seq=5).to(device)
    maps = {2: HEAD_MAPS["across-groups"]} if arch == "llama" else None
    infer = _decode_logits(model, prompt, 9, "infer", cache_kind, maps)  # 14 tokens: past the sliding window
    exact = _decode_logits(model, prompt, 9, "exact", cache_kind, maps)
    torch.testing.assert_close(infer, exact, atol=_tol(model), rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_infer_decode_steps_equal_exact_mode_bfloat16(arch, device):
    model = tiny_model(arch, dtype=torch.bfloat16, device=device)
    prompt = _ids(seq=5).to(device)
    infer = _decode_logits(model, prompt, 6, "infer").float()
    exact = _decode_logits(model, prompt, 6, "exact").float()
    assert (infer - exact).abs().max() <= 0.02 * exact.abs().max()  # bf16 precision of the logits


def test_infer_anchor_decodes_from_the_row_it_keeps():
    """At a decode step the anchor's own output comes from the probabilities its followers reuse (no second
    softmax), and a follower reads no keys: the stash holds the row [B, Hq, 1, K]."""
    from sa_analysis.patch.stash import ShareState

    model = tiny_model("llama")
    prompt = _ids(seq=5)
    seen = []
    original_put = ShareState.put

    def put(self, anchor, entry):
        seen.append((entry.inputs.query.shape[2], None if entry.probs is None else tuple(entry.probs.shape)))
        original_put(self, anchor, entry)

    ShareState.put = put
    try:
        _decode_logits(model, prompt, 2, "infer")
    finally:
        ShareState.put = original_put
    heads = model.config.num_attention_heads
    assert seen[0] == (5, None)  # prefill: the model's own kernel, no probabilities formed
    assert seen[1] == (1, (2, heads, 1, 6)) and seen[2] == (1, (2, heads, 1, 7))


def _compiled_decode(model, prompt, steps, mode):
    """([steps, B, V] logits, graphs compiled) of greedy decode steps through a static cache and a compiled step
    (torch.compile, fullgraph: a graph break is an error), patched in `mode` (None: unpatched)."""
    import contextlib

    from torch._dynamo.utils import counters
    from transformers import StaticCache

    torch._dynamo.reset()
    counters.clear()
    found = []
    patched = share_attention(model, PLANS["span"], mode=mode) if mode else contextlib.nullcontext()
    with patched, torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + steps + 1)
        out = model(input_ids=prompt, **cache_kwargs(model, cache), use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        step = torch.compile(model.forward, fullgraph=True, dynamic=False)
        for i in range(steps):
            position = torch.full((prompt.shape[0], 1), prompt.shape[1] + i)
            out = step(input_ids=token, **cache_kwargs(model, cache), use_cache=True, position_ids=position,
                       cache_position=position[0])
            found.append(out.logits[:, -1])
            token = out.logits[:, -1:].argmax(-1)
    graphs = int(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    return torch.stack(found), graphs


def test_infer_decode_step_compiles_whole_without_recompiling():
    """The compiled static-cache decode step users rely on: torch.compile(fullgraph=True) traces the follower path
    with no graph break, compiles one graph for every step (as the unpatched model's step does), and decodes what the
    eager patched model decodes. (Gemma 3 traces whole too, but its sliding-window cache recompiles on its own, patched
    or not, which takes a minute of CPU: the GPU benchmark covers it.)"""
    model = tiny_model("llama", dtype=torch.float32)
    prompt = _ids(seq=5)
    eager = _decode_logits(model, prompt, 4, "infer", "static")
    compiled, graphs = _compiled_decode(model, prompt, 4, "infer")
    _, unpatched_graphs = _compiled_decode(model, prompt, 4, None)
    assert graphs == unpatched_graphs == 1
    torch.testing.assert_close(compiled, eager.float(), atol=1e-4, rtol=1e-4)
