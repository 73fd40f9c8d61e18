"""Shared Attention (Liao & Vargas 2024) applied to a loaded transformers model, and removed again cleanly.

A *follower* layer `m` reuses, head by head, the attention pattern of its *anchor* `a` (the last non-shared layer
before it) with its **own** values and its own `o_proj`; it never computes `q_proj` / `k_proj`, and its KV cache
keeps values only.

How it is wired (no forward method is monkey-patched):

* One attention function is registered with transformers' `AttentionInterface` (with the base implementation's
  mask function under the same name in `AttentionMaskInterface`) and selected with `model.set_attn_implementation`.
  On every non-follower layer it calls the model's original implementation, so their outputs are unchanged; on an
  anchor it also stashes what the followers need: post-RoPE query, key (after the cache update), mask, scaling and
  the per-call extras (softcap, sliding window), and in exact mode the fp32 softmax.
* The attention module of each follower's decoder layer (`parts.swap_attention`) is swapped for a small `SharedAttention` module that
  holds the original `v_proj` and `o_proj`, computes V, reads the anchor's stash and attends:
    - ``mode="fast"``: the model's own attention kernel (SDPA, or eager where the model needs it, e.g. Gemma 2's
      logit softcapping) on `(Q_anchor, K_anchor, V_own)` with the anchor's mask: nothing `[B, H, Q, K]` is
      materialised;
    - ``mode="exact"``: `P_anchor @ V_own` with the anchor's materialised fp32 softmax (the SA reference code's
      semantics).
* KV cache: a follower calls `cache.update(key, value)` with a key of head dimension 0 (`[B, Hkv, T, 0]`), so the
  cache stores no K bytes but keeps its per-layer sequence bookkeeping (sliding-window layers count tokens). One
  wrinkle: a full-attention `DynamicLayer` reports `get_seq_length() == 0` for a follower (it counts key
  elements); transformers asks layer 0 and the first layer of each attention type, which are never followers
  (layer 0 is never shared, and a follower takes its earlier anchor's type, below).
* Head maps (LiSA, arXiv 2408.01890, found sharing by head index "ineffective" without aligning heads): a follower
  may carry a map from each query head h to the anchor head `map[h]` whose pattern it reuses (the plan's
  `head_map`); exact mode gathers the anchor's softmax rows, fast mode gathers the anchor's queries and the matching
  key heads (still grouped when each KV group takes one anchor key head, else expanded to one per query head).
* Sliding windows: a follower reuses its anchor's softmax, so it also uses the anchor's mask (window or not). When
  the config lists per-layer `layer_types`, followers take their anchor's type while patched, so that a cache built
  by `generate()` gives the follower's values the same length (window) as the anchor's keys.

Usage::

    with share_attention(model, plan):          # SharePlan, or a mapping {follower: anchor}
        model.generate(input_ids, max_new_tokens=32)

    handle = share_attention(model, {5: 4, 6: 4}, mode="exact")
    ...
    handle.remove()                              # bit-identical to the unpatched model again

Limits (documented, checked where possible): decoder-only models of the types in `SUPPORTED_MODEL_TYPES`, base
attention `sdpa` or `eager`; the dynamic (default) KV cache; no gradient checkpointing while patched (a follower's
recomputation would run before its anchor's). Gradients flow through the stash into the anchor (nothing is
detached). While patched, followers' unused `q_proj`/`k_proj` (and QK-norms) are out of the module tree.

Modules: `anchors` (the plan as {follower: anchor}, checked; the modes), `stash` (what an anchor leaves, and the
registered attention function), `follower` (the SharedAttention module), `apply` (share_attention and its handle),
`cache` (bytes held by a cache). Every touch of transformers' internals goes through `sa_analysis.compat`.
"""

from .anchors import MODES, check_mode, plan_anchors, plan_head_maps
from .apply import SUPPORTED_MODEL_TYPES, SharedAttentionHandle, share_attention
from .cache import cache_bytes, layer_cache_bytes
from .follower import SharedAttention
from .stash import SHARE_PREFIX, AnchorStash, exact_probs, shared_attention_forward

__all__ = [
    "MODES", "SHARE_PREFIX", "SUPPORTED_MODEL_TYPES", "AnchorStash", "SharedAttention", "SharedAttentionHandle",
    "cache_bytes", "check_mode", "exact_probs", "layer_cache_bytes", "plan_anchors", "plan_head_maps", "share_attention",
    "shared_attention_forward",
]
