"""Streaming engine: all pairwise attention statistics of one long sequence without any `L x H x n x n` tensor.

One SDPA-speed forward runs under `capture_attention` with a `QKStore` recorder that keeps every layer's post-RoPE
queries and keys (model dtype, on the layer's device). Then the causal part of the `n x n` attention plane is cut
into *segments* (a range of query rows x a range of keys) and, segment by segment, the attention probabilities of
all layers and heads are recomputed and written as the operands of docs/DESIGN.md section 3:

    X  = P (0 where masked)           Xr = P / |P_row|            Y = log P (0 where masked)

packed as `U = [Xr; X; Y]`, `[3, N, M]` with `N = L * H` (layer, head) rows and `M` the elements of the segments of
one *unit*. Per unit two matrix products accumulate, in fp32,

    acc_xy += X @ [X; Y]^T      (flat-cosine Gram and the KL cross terms)
    acc_r  += Xr @ Xr^T         (row-cosine Gram)

Entropies and the Jensen-Shannon divergence of adjacent layers are summed while the operands are written.

Row statistics (log-sum-exp of each row, and of the squared probabilities for the row norm) come first, in one
pass over the whole sequence, so that segments can split rows into chunks of keys: memory per unit is independent
of the sequence length. On CUDA two Triton kernels do the recomputation (flash-attention style: QK^T tiles in
registers, GQA by indexing the shared key head, softcapping, causal and sliding-window masks from indices,
`exclude_first` as a mask on the first keys, which is the renormalisation of `metrics.drop_first_keys`);
elsewhere, or for masks that are not causal/sliding (padding), the same operands come from plain torch.

Precision: the matmul operands default to float16 on GPU (10-bit mantissa, 8x finer than bfloat16; P and Xr are
scaled by 2^14, an exact power of two, so that small probabilities stay normal) with fp32 accumulation; KL uses
`diag(C)` for `sum P log P` so that `KL(a||a)` is exactly 0 and rounding errors of similar maps cancel. Where
layers' masks differ (sliding window vs global) the support term of KL (infinite where `a` attends where `b` is
masked) is decided from the windows, exactly, instead of from underflow-prone sums.

Several devices (`--device-map auto`): layers are grouped by the device they live on; each group keeps its own
queries/keys, row statistics and the rows of the accumulators that belong to its layers; operands are copied to
the other devices for the products, and the rows are gathered at the end on the first layer's device.

Sampled rows (`sampling`): beyond exact reach, a `RowSample` keeps only some query rows (the first stretch whole,
the rest in independent stratified replicates); every sum runs over those rows only, one set of sums per replicate,
and the delete-one-replicate jackknife gives a standard error for every entry (`SequenceStats.se`).

Modules, in the order the data flows: `store` (the recorder keeping queries and keys), `sampling` (which rows, and
the estimates and errors from them), `memory` (what a run needs, how it is cut into segments and units), `cost`
(how long it takes), `engine` (row statistics, operands, Gram products), `torch_backend` (the operands in plain
torch: CPU, padding masks), `kernels` (the Triton kernels), `sequence` (one sequence end to end).
"""

from .engine import StreamingStatistics
from .memory import (OPERAND_BYTES, Segment, StreamPlan, check_fits, default_operand_dtype, free_bytes, operand_bytes,
                     plan_segments)
from .sampling import RowSample
from .sequence import stream_sequence_stats
from .store import LayerGroup, LayerSpec, QKStore

__all__ = [
    "OPERAND_BYTES", "LayerGroup", "LayerSpec", "QKStore", "RowSample", "Segment", "StreamPlan", "StreamingStatistics",
    "check_fits", "default_operand_dtype", "free_bytes", "operand_bytes", "plan_segments", "stream_sequence_stats",
]
