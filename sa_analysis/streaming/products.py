"""The engine's one matrix product: low-precision operands, the accumulation and result in float32 (`torch.mm`'s
`out_dtype` on CUDA where the release has it; CPU casts the operands, which multiplies exactly what the GPU does).
Its own module so that the cost model (`cost`) times the very product the engine runs without reaching into it."""

from __future__ import annotations

import torch

_MM_DTYPE_OK: bool | None = None


def mm32(a: torch.Tensor, b: torch.Tensor, acc_dtype: torch.dtype) -> torch.Tensor:
    """a @ b with the result (and the accumulation) in `acc_dtype`; low-precision operands stay low on GPU."""
    global _MM_DTYPE_OK
    if a.dtype == acc_dtype:
        return a @ b
    if a.is_cuda and acc_dtype == torch.float32 and _MM_DTYPE_OK is not False:
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _MM_DTYPE_OK = True
            return out
        except (TypeError, RuntimeError):
            _MM_DTYPE_OK = False
    return a.to(acc_dtype) @ b.to(acc_dtype)  # CPU: same rounding of operands, exact products
