"""Triton kernels for DynaMixer's mixing matmul and its backward on CUDA (eager).

Each program multiplies one (line, segment) mixing matrix P (N x N) with that segment's N tokens, read straight
from the NHWC map (a row or a column of it), and writes the mixed tokens in the line-major layout the output
projection reads. The torch path needs a segment-major copy of the map before its batched matmul and a
transposed copy after it, and cuBLAS serves 16- and 32-token matrices with kernels far from the memory
bandwidth (profiles: docs/benchmarks.md).

Without triton (CPU-only torch builds) or a CUDA tensor, ``fused._mixed_tokens`` keeps the torch path. Set
``TRITON_INTERPRET=1`` before importing this module to run the kernel on CPU tensors (the tests do).
"""
import os
from typing import Optional, Tuple

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover  (CPU-only torch installs come without triton)
    triton = None

# Read at every call; ``dynamixer bench --no-triton`` turns it off to time the torch path.
_INTERPRET = os.environ.get('TRITON_INTERPRET') == '1'


def usable(mix: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether :func:`mixed_tokens` may serve these tensors: eager CUDA (or the interpreter), same float dtype,
    and no dispatch mode watching (``FlopCounterMode`` must see the matmul, fake tensors have no memory).
    The compile check comes first: dynamo cannot trace the dispatch-mode query and would break the graph."""
    return (triton is not None and (x.is_cuda or _INTERPRET)
            and not (torch.compiler.is_compiling() or torch.jit.is_scripting() or torch.jit.is_tracing()
                     or torch.onnx.is_in_onnx_export())
            and mix.device == x.device and mix.dtype == x.dtype
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and _get_current_dispatch_mode() is None)


if triton is not None:
    @triton.jit
    def _tile(L1, N, c, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's (line, segment): line and segment ids, image and line index, token and channel ranges,
        and the offsets and masks of its N x N mixing matrix and of its N x c tokens."""
        line = tl.program_id(0).to(tl.int64)  # b * L1 + l
        s = tl.program_id(1)
        n = tl.arange(0, BLOCK_N)
        j = tl.arange(0, BLOCK_C)
        rows_ok = n[:, None] < N
        mix_offsets = ((line * tl.num_programs(1) + s) * N + n[:, None]) * N + n[None, :]
        return line, s, line // L1, line % L1, n, j, mix_offsets, rows_ok & (n[None, :] < N), rows_ok & (j[None, :] < c)

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        if IEEE:  # fp32 stays fp32 (no TF32): the fast path must match the reference to 1e-5
            return tl.dot(a, b, input_precision='ieee')
        return tl.dot(a, b)

    @triton.jit
    def _mix_lines_kernel(mix_ptr, x_ptr, y_ptr, L1, N, C, c, stride_b, stride_line, stride_token,
                          BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, IEEE: tl.constexpr):
        """Per (line, segment): y = P x, x read from the NHWC map, y written line-major."""
        line, s, b, l, n, j, mix_offsets, mix_ok, tokens_ok = _tile(L1, N, c, BLOCK_N, BLOCK_C)
        p = tl.load(mix_ptr + mix_offsets, mask=mix_ok, other=0.)
        tokens = tl.load(x_ptr + b * stride_b + l * stride_line + n[:, None] * stride_token + s * c + j[None, :],
                         mask=tokens_ok, other=0.)
        mixed = _dot(p, tokens, IEEE)
        tl.store(y_ptr + (line * N + n[:, None]) * C + s * c + j[None, :], mixed.to(y_ptr.dtype.element_ty),
                 mask=tokens_ok)

    @triton.jit
    def _mix_lines_backward_kernel(mix_ptr, x_ptr, grad_y_ptr, grad_mix_ptr, grad_x_ptr, L1, N, C, c,
                                   stride_b, stride_line, stride_token, grad_stride_b, grad_stride_line,
                                   grad_stride_token, NEED_MIX: tl.constexpr, NEED_X: tl.constexpr,
                                   ACCUMULATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                                   IEEE: tl.constexpr):
        """Per (line, segment): grad_P = grad_y x^T, grad_x (+)= P^T grad_y, grad_x in the NHWC layout."""
        line, s, b, l, n, j, mix_offsets, mix_ok, tokens_ok = _tile(L1, N, c, BLOCK_N, BLOCK_C)
        grad_y = tl.load(grad_y_ptr + (line * N + n[:, None]) * C + s * c + j[None, :], mask=tokens_ok, other=0.)
        if NEED_MIX:
            tokens = tl.load(x_ptr + b * stride_b + l * stride_line + n[:, None] * stride_token + s * c + j[None, :],
                             mask=tokens_ok, other=0.)
            grad_mix = _dot(grad_y, tl.trans(tokens), IEEE)
            tl.store(grad_mix_ptr + mix_offsets, grad_mix.to(grad_mix_ptr.dtype.element_ty), mask=mix_ok)
        if NEED_X:
            p = tl.load(mix_ptr + mix_offsets, mask=mix_ok, other=0.)
            grad_x = _dot(tl.trans(p), grad_y, IEEE)
            target = (grad_x_ptr + b * grad_stride_b + l * grad_stride_line + n[:, None] * grad_stride_token
                      + s * c + j[None, :])
            if ACCUMULATE:  # the other branch wrote its share in an earlier launch
                grad_x += tl.load(target, mask=tokens_ok, other=0.).to(tl.float32)
            tl.store(target, grad_x.to(grad_x_ptr.dtype.element_ty), mask=tokens_ok)


def _block(size: int) -> int:
    return max(16, triton.next_power_of_2(size))  # tl.dot wants power-of-two blocks of at least 16


def _line_strides(t: torch.Tensor, columns: bool) -> Tuple[int, int, int]:
    """Strides of image, line and token in an NHWC map: rows are lines h of tokens w, columns lines w of tokens h."""
    stride_b, stride_h, stride_w, _ = t.stride()
    return (stride_b, stride_w, stride_h) if columns else (stride_b, stride_h, stride_w)


def mixed_tokens(mix: torch.Tensor, x: torch.Tensor, branches: Tuple[bool, ...]) -> torch.Tensor:
    """Same as ``fused._mixed_tokens``: ``mix`` ``(K, B, L1, S, N, N)``, ``x`` the NHWC map ``(B, H, W, C)``,
    ``branches`` K flags (False: rows, True: columns); returns ``(K, B * L1 * N, C)``. Check :func:`usable`."""
    K, B, L1, S, N, _ = mix.shape
    C = x.shape[-1]
    c = C // S
    mix = mix.contiguous()
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(K, B, L1, N, C, dtype=x.dtype, device=x.device)
    for k, columns in enumerate(branches):
        _mix_lines_kernel[(B * L1, S)](
            mix[k], x, y[k], L1, N, C, c, *_line_strides(x, columns),
            BLOCK_N=_block(N), BLOCK_C=_block(c), IEEE=x.dtype == torch.float32, num_warps=2)
    return y.view(K, -1, C)


def mixed_tokens_backward(grad_y: torch.Tensor, mix: torch.Tensor, x: torch.Tensor, branches: Tuple[bool, ...],
                          need_mix: bool, need_x: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of :func:`mixed_tokens` for ``mix`` and ``x`` given ``grad_y`` ``(K, B * L1 * N, C)`` (line-major,
    as it produced); ``grad_x`` sums both branches in the NHWC layout of ``x``. Check :func:`usable` (and that
    ``grad_y`` has ``x``'s dtype)."""
    K, B, L1, S, N, _ = mix.shape
    C = x.shape[-1]
    c = C // S
    mix, grad_y = mix.contiguous(), grad_y.contiguous()
    if x.stride(-1) != 1:
        x = x.contiguous()
    grad_mix = torch.empty_like(mix) if need_mix else None
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else None
    for k, columns in enumerate(branches):
        _mix_lines_backward_kernel[(B * L1, S)](
            mix[k], x, grad_y[k], grad_mix[k] if need_mix else mix[k], grad_x if need_x else x, L1, N, C, c,
            *_line_strides(x, columns), *_line_strides(grad_x if need_x else x, columns),
            NEED_MIX=need_mix, NEED_X=need_x, ACCUMULATE=k > 0, BLOCK_N=_block(N), BLOCK_C=_block(c),
            IEEE=x.dtype == torch.float32, num_warps=2)
    return grad_mix, grad_x
