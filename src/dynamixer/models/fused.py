"""Fused autograd kernels of DynaMixer's fast path (the architecture itself is in ``dynamixer.py``).

Row and column branches of equal line length run as one batched op on strided views of the NHWC map (no
permuted copies), and the backward passes recompute cheap intermediates (the mixed tokens, and optionally the
generated mixing matrices) instead of keeping them. CPU fp32 inference runs linears with their bias, GELU and
residual add fused (oneDNN). ``dynamixer.models.reference`` is the plain oracle these are tested against
(outputs 1e-5, gradients 1e-4).
"""
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from dynamixer.models import cpu_mix, triton_mix

_AUTOCAST_DEVICES = ('cpu', 'cuda', 'xpu', 'mps', 'hpu')


@dataclass
class FastPath:
    """What the fast path of one DynaMixer module may use, kept on the module (``DynaMixer.set_fast_path``
    changes a whole model). Every kernel gives the plain modules' values and gradients (tested); a module takes
    them only when the layers they read are exactly ``nn.Linear`` without hooks, and calls its modules otherwise.
    FX tracing and TorchScript always get the plain modules (a scripted module does not hold this setting).
    Measurements behind the defaults: docs/benchmarks.md."""

    enabled: bool = True  # False: always the plain modules
    onednn_linears: bool = True  # CPU fp32 linears (forward and input gradient) through oneDNN ...
    onednn_min_macs: int = 1 << 26  # ... from this many multiply-adds a call (below, its call overhead wins)
    cpu_fused_inference: bool = True  # CPU fp32 inference: linear + bias + GELU / + residual as one oneDNN call
    autocast_norms: bool = True  # under autocast, LayerNorms write the low precision their consumers cast to
    recompute_mixing: bool = True  # backward regenerates the mixing matrices instead of keeping them (memory)
    inference_slice_bytes: int = 24 << 20  # CPU inference in batch slices whose temporaries stay below this; 0: off
    triton: bool = True  # CUDA: the Triton kernels for the mixing matmul and its backward
    cpu_kernels: bool = True  # CPU: the C++ kernels for the mixing and its backward (cpu_mix), where they build
    compiler_mixing_max_len: int = 8  # CPU training under torch.compile: lines up to this long mixed as plain ops
    cpu_stem_ops: bool = True  # CPU training: a conv stem's layers as opaque kernels on one layout (cpu_stem)


def _autocast_state(device_type: str) -> Tuple[bool, Optional[torch.dtype]]:
    if device_type not in _AUTOCAST_DEVICES:  # e.g. meta tensors
        return False, None
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The lower precision autocast runs matmuls in on ``x``'s device, or None where autocast is off."""
    enabled, dtype = _autocast_state(x.device.type)
    return dtype if enabled else None


def layer_norm(norm: torch.nn.LayerNorm, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``norm(x)`` written in ``dtype`` with autocast off: CUDA autocast would run it in fp32 and every consumer
    (the linears, the mixing matmul) cast the output straight back. torch's kernel accumulates in fp32; eager
    CUDA wants the affine parameters in the input's dtype (rounded once more), CPU takes them in fp32."""
    weight, bias = norm.weight, norm.bias
    if x.device.type != 'cpu' and weight is not None:
        weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        return torch.nn.functional.layer_norm(x.to(dtype), norm.normalized_shape, weight, bias, norm.eps)


# torch's CPU softmax handles the part of the last dimension beyond a multiple of the vector width one element
# at a time; DynaMixer's lines are short (4, 7, 8, 14 tokens), so whole-tensor ops win there
# (docs/benchmarks.md, "Why the fast path's defaults").
_CPU_SOFTMAX_WIDTH = 16


def _use_whole_tensor_softmax(x: torch.Tensor) -> bool:
    return (x.device.type == 'cpu' and x.shape[-1] % _CPU_SOFTMAX_WIDTH != 0
            and x.dtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling())


def _softmax_forward(x: torch.Tensor) -> torch.Tensor:
    if not _use_whole_tensor_softmax(x):
        return x.softmax(dim=-1)
    e = (x - x.amax(dim=-1, keepdim=True)).exp_()
    return e.div_(e.sum(dim=-1, keepdim=True))


def _softmax_backward(grad: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if not _use_whole_tensor_softmax(y):
        return torch._softmax_backward_data(grad.to(y.dtype), y, -1, y.dtype)
    return y * (grad - (grad * y).sum(dim=-1, keepdim=True))


class _Softmax(torch.autograd.Function):
    """Softmax over the last dimension with :func:`_softmax_forward` and its backward; saves only the output."""

    @staticmethod
    def forward(ctx, x):
        y = _softmax_forward(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, = ctx.saved_tensors
        return _softmax_backward(grad, y)


def softmax(x: torch.Tensor) -> torch.Tensor:
    """``x.softmax(dim=-1)``, fast on CPU for short last dimensions; same values and gradients.

    Under autocast, low-precision logits give low-precision probabilities: CUDA autocast would run the softmax
    in fp32 and the mixing matmul cast the result straight back, while torch's kernel accumulates in fp32
    anyway (the same values to rounding, a third of the memory traffic on the largest tensors of the model)."""
    if x.dtype == autocast_dtype(x):
        with torch.autocast(x.device.type, enabled=False):
            return x.softmax(dim=-1)
    if not _use_whole_tensor_softmax(x):
        return x.softmax(dim=-1)
    if torch.is_grad_enabled() and x.requires_grad:
        return _Softmax.apply(x)
    return _softmax_forward(x)


# oneDNN's linear with a fused epilogue (bias + GELU, bias + residual add): on CPU fp32 inference it saves the
# separate bias copy, activation and add passes over the hidden states. No autograd, so inference only.
_HAS_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, '_linear_pointwise')


def _register_onednn_linear_flops() -> None:
    """Let ``FlopCounterMode`` count the fused linears (2 * rows * in * out) like the ``addmm`` they replace."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula
    op = torch.ops.mkldnn._linear_pointwise
    if op in flop_registry:
        return

    @register_flop_formula(op)
    def _linear_flops(x_shape, *args, **kwargs) -> int:
        # default overload: (x, weight, bias, ...); binary: (x, other, weight, bias, ...)
        weight = args[1] if len(args) > 1 and isinstance(args[1], torch.Size) and len(args[1]) == 2 else args[0]
        rows = 1
        for size in x_shape[:-1]:
            rows *= size
        return 2 * rows * weight[0] * weight[1]


if _HAS_ONEDNN_LINEAR:
    _register_onednn_linear_flops()


def _eager_cpu(x: torch.Tensor) -> bool:
    """A CPU tensor outside tracing, compiling and export: those must keep seeing plain ops."""
    return (x.device.type == 'cpu'
            and not (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()
                     or torch.onnx.is_in_onnx_export()))


def eager_cpu_inference(x: torch.Tensor) -> bool:
    """CPU without autograd, run eagerly: the CPU inference shortcuts (batch slicing, fused linears) apply only
    here; tracing, compiling and export see plain whole-batch ops."""
    return not torch.is_grad_enabled() and _eager_cpu(x)


def onednn_fp32(x: torch.Tensor) -> bool:
    """Whether oneDNN's fp32 linear may serve ``x``: eager CPU, fp32, no autocast (with or without autograd)."""
    return (_HAS_ONEDNN_LINEAR and torch.backends.mkldnn.enabled and x.dtype == torch.float32
            and not torch.is_autocast_enabled('cpu') and _eager_cpu(x))


def onednn_inference(x: torch.Tensor) -> bool:
    """Whether :func:`linear_gelu` / :func:`linear_add` may serve ``x``: :func:`onednn_fp32` without autograd."""
    return onednn_fp32(x) and not torch.is_grad_enabled()


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``gelu(linear(x))`` (exact GELU) as one oneDNN call; check :func:`onednn_inference` first."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'gelu', [], 'none')


def linear_add(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               residual: torch.Tensor) -> torch.Tensor:
    """``residual + linear(x)`` as one oneDNN call; check :func:`onednn_inference` first."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, 'add')


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'none', [], '')


# oneDNN runs the model's fp32 linear shapes faster than the MKL sgemm behind ``F.linear`` on the CPUs
# measured, most of all the input gradient ``grad @ W``, which autograd runs in the layout MKL is slowest in; for
# the weight gradient ``grad^T @ x`` MKL is the faster one (oneDNN would need both operands transposed).
class _OneDnnLinear(torch.autograd.Function):
    """``F.linear`` on 2-d ``x`` with the forward and the input gradient through oneDNN; the same values and
    gradients."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad
        grad_x = None
        if need_x:  # under create_graph, ops with a derivative (oneDNN's linear has none)
            grad_x = grad @ weight if torch.is_grad_enabled() else _onednn_linear(grad, weight.t().contiguous())
        grad_weight = grad.t() @ x if need_weight else None
        grad_bias = grad.sum(0) if need_bias else None
        return grad_x, grad_weight, grad_bias


def _min_macs(fast: Optional[FastPath]) -> Optional[int]:
    """The multiply-adds from which a linear goes through oneDNN, or None: never."""
    return fast.onednn_min_macs if fast is not None and fast.onednn_linears else None


def _onednn_worth_it(x: torch.Tensor, out_features: int, min_macs: Optional[int]) -> bool:
    return min_macs is not None and onednn_fp32(x) and x.numel() * out_features >= min_macs


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           fast: Optional[FastPath] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN where ``fast`` and :func:`onednn_fp32` allow and the matmul
    is large enough (``fast.onednn_min_macs``; same values and gradients), through ``F.linear`` everywhere else."""
    if not _onednn_worth_it(x, weight.shape[0], _min_macs(fast)):
        return torch.nn.functional.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        # 2-d through the Function: an N-d result of oneDNN is a view, which autograd forbids modifying in place
        out = _OneDnnLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])
    return _onednn_linear(x, weight, bias)


def _segments(x: torch.Tensor, num_segments: int, columns: bool) -> torch.Tensor:
    """View an NHWC map as per-segment lines: rows ``(B, H, S, W, C/S)`` or columns ``(B, W, S, H, C/S)``."""
    x = x.unflatten(-1, (num_segments, -1))  # (B, H, W, S, c), no copy
    return x.permute(0, 2, 3, 1, 4) if columns else x.permute(0, 1, 3, 2, 4)


def _unsegment(y: torch.Tensor, columns: bool) -> torch.Tensor:
    """Inverse of :func:`_segments`: ``(B, L1, S, N, c)`` back to an NHWC ``(B, H, W, C)`` map (a view)."""
    y = y.permute(0, 3, 1, 2, 4) if columns else y.permute(0, 1, 3, 2, 4)
    return y.flatten(-2)


def _stack_segments(x: torch.Tensor, num_segments: int, branches: Tuple[bool, ...]) -> torch.Tensor:
    """``(K, B, L1, S, N, c)``: the lines of each branch (False: rows, True: columns), segment-major."""
    views = [_segments(x, num_segments, columns) for columns in branches]
    return views[0].unsqueeze(0) if len(views) == 1 else torch.stack(views)


def _as_autocast(mix: torch.Tensor, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``mix`` and ``x`` cast as autocast's bmm would cast them (unchanged without autocast), so that the choice
    between the Triton kernel and torch's ops sees the dtypes that the matmul computes in."""
    dtype = autocast_dtype(x)
    return (mix, x) if dtype is None else (mix.to(dtype), x.to(dtype))


# which hand-written mixing kernels may run (each still checks its inputs): (Triton, C++ on CPU)
Kernels = Tuple[bool, bool]


def _kernels(fast: FastPath) -> Kernels:
    return fast.triton, fast.cpu_kernels


def _as_map(y: torch.Tensor, shape: torch.Size, columns: bool) -> torch.Tensor:
    """A branch's line-major ``(B * L1 * N, C)`` matrix seen as the ``(B, H, W, C)`` map it holds (a view)."""
    B, H, W, C = shape
    return y.view(B, W, H, C).transpose(1, 2) if columns else y.view(B, H, W, C)


def _on_cpu_kernels(kernels: Kernels, x: torch.Tensor, mix: torch.Tensor) -> bool:
    """Whether the C++ mixing kernels mix ``x`` by ``mix`` (eager only: compiled steps call them from
    :func:`_compiler_branches`), rather than Triton or torch's ops (in the dtypes autocast will give them)."""
    # CPU tensors reach Triton only in its interpreter (tests): only then is the cast worth making
    return (kernels[1] and _eager_cpu(x) and cpu_mix.usable(x, mix)
            and not (kernels[0] and triton_mix._INTERPRET and triton_mix.usable(*_as_autocast(mix, x))))


def _mixed_tokens(mix: torch.Tensor, x: torch.Tensor, branches: Tuple[bool, ...], kernels: Kernels,
                  logits: bool = False) -> torch.Tensor:
    """Mixed tokens of every branch as one matrix per branch, ``(K, B * L1 * N, C)``, line-major.

    ``mix`` is ``(K, B, L1, S, N, N)`` (``logits``: before the softmax); all branches run as one batched matmul,
    and one copy brings the segments back together (row branch: (B, H, W) token order; column branch:
    (B, W, H)). Where ``kernels`` allow, one pass of a hand-written kernel does it all: Triton on CUDA
    (``triton_mix``), C++ on CPU (``cpu_mix``, which also normalises logits as it loads them).
    """
    on_cpu_kernels = _on_cpu_kernels(kernels, x, mix)
    if logits and not on_cpu_kernels:
        mix, logits = softmax(mix), False
    mix, x = _as_autocast(mix, x)
    if kernels[0] and triton_mix.usable(mix, x):
        return triton_mix.mixed_tokens(mix, x, branches)
    if on_cpu_kernels:
        y = x.new_empty(len(branches), x.shape[0] * x.shape[1] * x.shape[2], x.shape[3])
        for k, columns in enumerate(branches):
            cpu_mix.mix_lines_into(mix[k], x, columns, _as_map(y[k], x.shape, columns), softmax=logits)
        return y
    K, B, L1, S, N, _ = mix.shape
    xs = _stack_segments(x, S, branches)
    y = torch.bmm(mix.reshape(-1, N, N), xs.reshape(-1, N, xs.shape[-1]))  # bmm on 3-d is faster than matmul
    return y.view(K, -1, *xs.shape[2:]).transpose(3, 4).reshape(K, -1, x.shape[-1])


def _project(y: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], mix: torch.Tensor) -> torch.Tensor:
    """The branch projections of the mixed tokens ``y`` (:func:`_mixed_tokens`), ``(K, B, L1, N, C)``."""
    if bias is None:  # the caller adds the bias where it costs no extra pass (in the fusion)
        out = torch.bmm(y, weight.transpose(1, 2))
    else:
        out = torch.baddbmm(bias.unsqueeze(1), y, weight.transpose(1, 2))
    return out.view(mix.shape[0], -1, mix.shape[2], mix.shape[4], weight.shape[1])


def _mix_project_forward(mix: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         branches: Tuple[bool, ...], kernels: Kernels, logits: bool = False) -> torch.Tensor:
    return _project(_mixed_tokens(mix, x, branches, kernels, logits), weight, bias, mix)


def _keep_mixed_tokens(x: torch.Tensor) -> bool:
    """Whether backward gets the mixed tokens kept from forward rather than recomputed: on CPU the recompute
    (segment-major copy, mixing bmm, copy back) costs more time than keeping them costs memory; on CUDA one
    Triton pass recomputes them and memory is scarcer."""
    return x.device.type == 'cpu'


def mix_project(mix: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                branches: Tuple[bool, ...], fast: FastPath) -> Tuple[torch.Tensor, ...]:
    """:class:`_MixProject` when gradients are needed, else its forward directly (traceable for export): one
    ``(B, L1, N, C)`` output per branch."""
    if torch.is_grad_enabled() and (mix.requires_grad or x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _MixProject.apply(mix, x, weight, bias, branches, _min_macs(fast), _kernels(fast))
    return tuple(_mix_project_forward(mix, x, weight, bias, branches, _kernels(fast)).unbind(0))


def _weight_grad(a, b) -> torch.Tensor:
    """``a^T @ b`` per branch, ``(K, R, m), (K, R, n) -> (K, m, n)`` (either also a sequence of K matrices), as one
    mm per branch: a batched GEMM of two long reductions gets a kernel without split-K on CUDA, a slow one."""
    return torch.stack([x.t() @ y for x, y in zip(a, b)])


def _mix_project_backward(grads, mix, x, weight, branches, need_mix: bool, need_x: bool, need_weight: bool,
                          min_macs: Optional[int], kernels: Kernels, mixed: Optional[torch.Tensor] = None,
                          logits: bool = False):
    """Gradients of :func:`_mix_project_forward` (without bias) for ``mix`` (``logits``: the logits' gradient),
    ``x`` and ``weight``, from the output gradients ``grads`` (one per branch, or all stacked); ``min_macs`` may
    allow oneDNN for ``grad @ W`` (see :class:`_OneDnnLinear`); ``mixed``: the mixed tokens, if kept. The CPU
    kernels take the branches one by one; the other paths stack them."""
    K, B, L1, S, N, _ = mix.shape
    grads = [g.reshape(-1, g.shape[-1]) for g in grads]  # K x (B * L1 * N, C)
    grad_mix = grad_x = grad_weight = None
    if need_weight:
        mixed = _mixed_tokens(mix, x, branches, kernels, logits) if mixed is None else mixed
        grad_weight = _weight_grad(grads, mixed)
    probs = None
    on_cpu_kernels = _on_cpu_kernels(kernels, x, mix) and not torch.is_grad_enabled()  # no create_graph there
    if (need_mix or need_x) and logits and not on_cpu_kernels:
        mix = probs = softmax(mix)  # the paths below take probabilities; their gradient goes back through it
        logits = False
    if need_mix or need_x:
        mix, x = _as_autocast(mix, x)
        c = weight.shape[1] // S
        use_triton = kernels[0] and triton_mix.usable(mix, x)
        if on_cpu_kernels:
            # (not under create_graph: the kernels have no derivative) grad @ W, line-major as the mixed tokens
            onednn = _onednn_worth_it(grads[0], weight.shape[1], min_macs)
            grad_mix = torch.empty_like(mix) if need_mix else None
            grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
            for k, columns in enumerate(branches):
                grad_y = (_onednn_linear(grads[k], weight[k].t().contiguous()) if onednn
                          else grads[k].to(x.dtype) @ weight[k].to(x.dtype))
                cpu_mix.mix_lines_backward_into(_as_map(grad_y, x.shape, columns), mix[k], x, columns,
                                                None if grad_mix is None else grad_mix[k], grad_x, accumulate=k > 0,
                                                softmax=logits)
            return grad_mix, grad_x, grad_weight
        grad = torch.stack(grads)  # (K, B * L1 * N, C)
        # grad @ W per branch through oneDNN, written in segment-major order (not under create_graph: no derivative)
        if not use_triton and _onednn_worth_it(grad[0], weight.shape[1], min_macs) and not torch.is_grad_enabled():
            grad_y = grad.new_empty(K, B, L1, S, N, c)
            for k in range(K):
                grad_y[k].copy_(_onednn_linear(grad[k], weight[k].t().contiguous()).view(B, L1, N, S, c)
                                .transpose(2, 3))
        else:
            grad_y = torch.bmm(grad, weight)  # (K, B * L1 * N, C): line-major, as the mixed tokens
            if use_triton and grad_y.dtype == x.dtype:
                grad_mix, grad_x = triton_mix.mixed_tokens_backward(grad_y, mix, x, branches, need_mix, need_x)
                if probs is not None and grad_mix is not None:
                    grad_mix = _softmax_backward(grad_mix, probs)
                return grad_mix, grad_x, grad_weight
            grad_y = grad_y.view(K, -1, L1, N, S, c).transpose(3, 4)
        grad_y = grad_y.reshape(-1, N, c)  # (K * B * L1 * S, N, c)
        if need_mix:
            xs = _stack_segments(x, S, branches).reshape(-1, N, c)
            grad_mix = torch.bmm(grad_y, xs.transpose(1, 2)).view(mix.shape)
        if need_x:
            grad_xs = torch.bmm(mix.reshape(-1, N, N).transpose(1, 2), grad_y).view(K, -1, L1, S, N, c)
            grad_x = _unsegment(grad_xs[0], branches[0])
            for k in range(1, K):
                grad_x = grad_x + _unsegment(grad_xs[k], branches[k])
            grad_x = grad_x.contiguous()
    if probs is not None and grad_mix is not None:
        grad_mix = _softmax_backward(grad_mix, probs)
    return grad_mix, grad_x, grad_weight


class _MixProject(torch.autograd.Function):
    """``proj_k(P_k @ x)`` for K branches at once, each mixing the rows or the columns of an NHWC map ``x``.

    ``mix``: ``(K, B, L1, S, N, N)``; ``weight``: ``(K, C, C)``; ``bias``: ``(K, C)`` or None; ``branches``: a
    tuple of K flags (False: rows, True: columns). Returns K outputs ``(B, L1, N, C)`` (rows: ``(B, H, W, C)``,
    columns: ``(B, W, H, C)``), separate so that their gradients need not be stacked. It saves ``P`` and ``x``
    for backward (``x`` is kept alive by the compress and channel layers anyway) and, on CPU only, the mixed
    tokens (:func:`_keep_mixed_tokens`), instead of the two permuted copies per branch that plain autograd keeps
    (the segment-major input of the bmm and the input of ``proj``); what is not kept is recomputed.
    """

    @staticmethod
    def forward(ctx, mix, x, weight, bias, branches: Tuple[bool, ...], min_macs: Optional[int], kernels: Kernels):
        ctx.branches, ctx.min_macs, ctx.kernels = branches, min_macs, kernels
        ctx.device_type = x.device.type
        ctx.autocast = _autocast_state(x.device.type)
        y = _mixed_tokens(mix, x, branches, kernels)
        ctx.save_for_backward(mix, x, weight, y if _keep_mixed_tokens(x) else None)
        return tuple(_project(y, weight, bias, mix).unbind(0))

    @staticmethod
    def backward(ctx, *grads):
        mix, x, weight, mixed = ctx.saved_tensors
        enabled, dtype = ctx.autocast
        need = ctx.needs_input_grad
        grad_bias = None
        with torch.autocast(ctx.device_type if enabled else 'cpu', dtype=dtype, enabled=enabled):
            grad_mix, grad_x, grad_weight = _mix_project_backward(
                grads, mix, x, weight, ctx.branches, need[0], need[1], need[2], ctx.min_macs, ctx.kernels, mixed)
            if need[3]:
                grad_bias = torch.stack([g.reshape(-1, g.shape[-1]).sum(0) for g in grads])
        return grad_mix, grad_x, grad_weight, grad_bias, None, None, None


class WindowPadding(NamedTuple):
    """Lines padded to whole windows (:func:`_tiled_window_branches`): the padding must not be mixed in, so the
    inputs from ``length`` on of the last window of every line get -inf logits. The windows of a line are counted
    by dimension ``axis`` of the logits ``(K, B, L1, S, N, N)``, in runs of ``windows``."""
    axis: int
    windows: int
    length: int


def _mask_padding(logits: torch.Tensor, padding: Optional[WindowPadding]) -> torch.Tensor:
    """``logits`` with the padding of the last windows masked (in place: only those elements are written)."""
    if padding is not None:
        a, shape = padding.axis, logits.shape
        last = logits.view(*shape[:a], -1, padding.windows, *shape[a + 1:]).select(a + 1, padding.windows - 1)
        last[..., padding.length:] = float('-inf')
    return logits


def mixing_logits(lines: torch.Tensor, gen_weight: torch.Tensor, gen_bias: torch.Tensor,
                  dims: Tuple[int, int, int], padding: Optional[WindowPadding] = None) -> torch.Tensor:
    """Generate the mixing matrices' logits, one batched matmul for all branches: ``(K, B, L1, S, N, N)``."""
    L1, S, N = dims
    return _mask_padding(torch.baddbmm(gen_bias, lines, gen_weight).view(lines.shape[0], -1, L1, S, N, N), padding)


def softmax_mixing(lines: torch.Tensor, gen_weight: torch.Tensor, gen_bias: torch.Tensor,
                   dims: Tuple[int, int, int], padding: Optional[WindowPadding] = None) -> torch.Tensor:
    """Generate and normalise: the mixing matrices ``(K, B, L1, S, N, N)``."""
    return softmax(mixing_logits(lines, gen_weight, gen_bias, dims, padding))


class _GenerateMixProject(torch.autograd.Function):
    """Generate + softmax + :class:`_MixProject`, saving the compressed lines (``d / C`` of a token's size),
    ``x`` and, on CPU, the mixed tokens (:func:`_keep_mixed_tokens`): the mixing matrices, ``2 S N / C`` times
    the size of the feature map for both branches, are recomputed in backward (one small batched matmul and a
    softmax) instead of being kept.

    ``lines``: ``(K, R, in)``, ``gen_weight``: ``(K, in, out)`` (transposed ``generate.weight``), ``gen_bias``:
    ``(K, 1, out)``, ``dims``: ``(L1, S, N)``; the rest as :class:`_MixProject` (without bias).
    """

    @staticmethod
    def forward(ctx, lines, gen_weight, gen_bias, x, weight, branches: Tuple[bool, ...], dims: Tuple[int, int, int],
                min_macs: Optional[int], kernels: Kernels, padding: Optional[WindowPadding]):
        ctx.branches, ctx.dims, ctx.min_macs, ctx.kernels, ctx.padding = branches, dims, min_macs, kernels, padding
        ctx.device_type = x.device.type
        ctx.autocast = _autocast_state(x.device.type)
        logits = mixing_logits(lines, gen_weight, gen_bias, dims, padding)
        y = _mixed_tokens(logits, x, branches, kernels, logits=True)
        ctx.save_for_backward(lines, gen_weight, gen_bias, x, weight, y if _keep_mixed_tokens(x) else None)
        return tuple(_project(y, weight, None, logits).unbind(0))

    @staticmethod
    def backward(ctx, *grads):
        lines, gen_weight, gen_bias, x, weight, mixed = ctx.saved_tensors
        enabled, dtype = ctx.autocast
        need = ctx.needs_input_grad
        grad_lines = grad_gen_weight = grad_gen_bias = None
        with torch.autocast(ctx.device_type if enabled else 'cpu', dtype=dtype, enabled=enabled):
            logits = mixing_logits(lines, gen_weight, gen_bias, ctx.dims, ctx.padding)
            need_mix = need[0] or need[1] or need[2]
            grad_logits, grad_x, grad_weight = _mix_project_backward(
                grads, logits, x, weight, ctx.branches, need_mix, need[3], need[4], ctx.min_macs, ctx.kernels, mixed,
                logits=True)
            if need_mix:
                grad_logits = grad_logits.view(lines.shape[0], lines.shape[1], -1)
                if need[0]:
                    grad_lines = torch.bmm(grad_logits, gen_weight.transpose(1, 2).to(grad_logits.dtype))
                if need[1]:
                    grad_gen_weight = _weight_grad(lines.to(grad_logits.dtype), grad_logits)
                if need[2]:
                    grad_gen_bias = grad_logits.sum(1, keepdim=True)
        return grad_lines, grad_gen_weight, grad_gen_bias, grad_x, grad_weight, None, None, None, None, None


def generate_mix_project(lines, gen_weight, gen_bias, x, weight, branches, dims, fast: FastPath,
                         padding: Optional[WindowPadding] = None):
    """:class:`_GenerateMixProject` when gradients are needed, else its forward directly: one output per branch."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (lines, gen_weight, gen_bias, x, weight)):
        return _GenerateMixProject.apply(lines, gen_weight, gen_bias, x, weight, branches, dims, _min_macs(fast),
                                         _kernels(fast), padding)
    return tuple(_mix_project_forward(mixing_logits(lines, gen_weight, gen_bias, dims, padding), x, weight, None,
                                      branches, _kernels(fast), logits=True).unbind(0))


# ------------------------------------------------------------------------------------------------------------
# the token mixer's fast path: rows and columns as batched ops on the NHWC map (DynaMixerTokenMixer.fusable)


def generator_inputs(mixer, x: torch.Tensor, branches: Tuple[bool, ...], z: Optional[torch.Tensor] = None):
    """What the generate layers of the given branches (False: rows, True: columns; lines all of one
    length N) read, on a map of the built size: ``(lines (K, R, in), weight (K, in, out), bias (K, 1, out),
    (L1, S, N))``. The compress layers run as one matmul on the NHWC map (once when rows and columns
    share it), unless their output ``z`` is given (laid out as ``x``)."""
    ops = [mixer.column_op if columns else mixer.row_mix for columns in branches]
    S, d = ops[0].num_segments, ops[0].reduced_dim
    unique = list({id(op): op for op in ops}.values())
    if z is None:
        z = _compressed(mixer, x, unique)
    z = z.unflatten(-1, (len(unique), S, d))  # (B, H, W, ops, S, d)
    lines = [z[..., unique.index(op), :, :] for op in ops]
    lines = [z_.permute(0, 2, 3, 1, 4) if columns else z_.permute(0, 1, 3, 2, 4)  # (B, L1, S, N, d)
             for z_, columns in zip(lines, branches)]
    lines = torch.stack(lines) if len(lines) > 1 else lines[0].unsqueeze(0)  # (K, B, L1, S, N, d)
    K, _, L1, _, N, _ = lines.shape
    if ops[0].generation == 'dynamic':  # flatten each segment's line token-major
        lines = lines.reshape(K, -1, N * d)
    else:  # dense: each token's own row
        lines = lines.reshape(K, -1, d)
    weight = torch.stack([op.generate.weight for op in ops]).transpose(1, 2)
    bias = torch.stack([op.generate.bias for op in ops]).unsqueeze(1)
    return lines, weight, bias, (L1, S, N)


def _compressed(mixer, x: torch.Tensor, ops) -> torch.Tensor:
    """The compress layers of ``ops`` on the map ``x``, as one matmul: ``(..., len(ops) * S * d)``."""
    if len(ops) == 1:
        return linear(x, ops[0].compress.weight, ops[0].compress.bias, mixer.fast_path)
    weight = torch.cat([op.compress.weight for op in ops])
    bias = torch.cat([op.compress.bias for op in ops])
    return linear(x, weight, bias, mixer.fast_path)


def branch_mixing(mixer, x: torch.Tensor, branches: Tuple[bool, ...], z: Optional[torch.Tensor] = None,
                  padding: Optional[WindowPadding] = None) -> torch.Tensor:
    """Mixing matrices ``(K, B, L1, S, N, N)`` of the given branches on a map of the built size (``z`` and
    ``padding`` as :func:`_branch_group`'s)."""
    ops = [mixer.column_op if columns else mixer.row_mix for columns in branches]
    if ops[0].compress is None:  # static
        B, H, W, C = x.shape
        mixes = [softmax(op.logits).expand(B, W if columns else H, -1, -1, -1)
                 for op, columns in zip(ops, branches)]
        return torch.stack(mixes) if len(mixes) > 1 else mixes[0].unsqueeze(0)
    return softmax_mixing(*generator_inputs(mixer, x, branches, z), padding)


def _compiler_mixing(op, z: Optional[torch.Tensor], columns: bool) -> torch.Tensor:
    """Mixing matrices ``(B, L1, S, N_out, N_in)`` of one branch from the compressed map ``z``
    ``(B, H, W, S, d)``, as plain ops; static generation: ``(1, 1, S, N, N)``, to broadcast."""
    if op.compress is None:
        return softmax(op.logits)[None, None]
    lines = z.permute(0, 2, 3, 1, 4) if columns else z.permute(0, 1, 3, 2, 4)  # (B, L1, S, N, d)
    N = lines.shape[3]
    if op.generation == 'dynamic':  # each segment's line flattened token-major
        lines = lines.flatten(-2)
    logits = torch.nn.functional.linear(lines, op.generate.weight, op.generate.bias)
    return softmax(logits.view(*lines.shape[:3], N, N))


def _compiler_branches(mixer, x: torch.Tensor, kernels: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                      torch.Tensor]:
    """:func:`_fused_branches` written for the compiler: plain differentiable ops (no autograd Function, so it
    partitions and fuses the backward too) around the mixing, which with ``kernels`` is the C++ kernel
    (``cpu_mix``, an opaque op with its own gradient), otherwise a broadcast product summed over the line (for
    training only: for the 4- and 8-token lines of the CIFAR models a training step is faster so, inference is
    not). Either way the mixed tokens come out in the map's own (B, H, W, C) order, without segment-major copies
    (docs/benchmarks.md, "Why the fast path's defaults")."""
    B, H, W, C = x.shape
    row, col = mixer.row_mix, mixer.column_op
    S = row.num_segments
    z_row = z_col = None
    if row.compress is not None:
        if col is row:
            z_row = torch.nn.functional.linear(x, row.compress.weight, row.compress.bias).unflatten(-1, (S, -1))
            z_col = z_row
        else:
            weight = torch.cat([row.compress.weight, col.compress.weight])
            bias = torch.cat([row.compress.bias, col.compress.bias])
            z_row, z_col = torch.nn.functional.linear(x, weight, bias).unflatten(-1, (2, S, -1)).unbind(-3)
    mix_row, xs = _as_autocast(_compiler_mixing(row, z_row, False), x)
    mix_col, _ = _as_autocast(_compiler_mixing(col, z_col, True), x)
    if kernels:
        rows = cpu_mix.mix_lines(mix_row.expand(B, H, S, W, W), xs, columns=False)
        cols = cpu_mix.mix_lines(mix_col.expand(B, W, S, H, H), xs, columns=True)
    else:
        xs = xs.unflatten(-1, (S, -1))  # (B, H, W, S, c)
        # rows: y[b, h, j, s] = sum_i P[b, h, s, j, i] x[b, h, i, s]; columns: y[b, j, w, s] = sum_i
        # P[b, w, s, j, i] x[b, i, w, s] (each a vector of the segment's c channels)
        rows = (mix_row.permute(0, 1, 3, 4, 2).unsqueeze(-1) * xs.unsqueeze(2)).sum(3).flatten(-2)
        cols = (mix_col.permute(0, 3, 4, 1, 2).unsqueeze(-1) * xs.unsqueeze(1)).sum(2).flatten(-2)
    rows = torch.nn.functional.linear(rows, row.proj.weight)
    cols = torch.nn.functional.linear(cols, col.proj.weight)
    return rows, cols.transpose(1, 2), row.proj.bias, col.proj.bias


def _known_equal(size, length: int) -> bool:
    """``size == length`` where that is known without a guard: a symbolic size (an export with dynamic H, W) is
    not known to be any one length."""
    if isinstance(size, torch.SymInt):
        return statically_known_true(size == length)
    return bool(size == length)


def _fused_branches(mixer, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor],
                                                    Optional[torch.Tensor]]:
    """Row branch ``(B, H, W, C)``, column branch ``(B, W, H, C)`` and the biases of their projections when
    these are still to be added (``None`` when already in)."""
    B, H, W, C = x.shape
    row, col = mixer.row_mix, mixer.column_op
    if _tiled_by_windows(mixer, x):
        return _tiled_window_branches(mixer, x)
    # windows of the built line length (and symbolic lengths, an export with dynamic H, W): the ops one by one
    if not (_known_equal(W, row.seq_len) and _known_equal(H, col.seq_len)):
        rows, cols = mixer.line_branches(x)
        return rows, cols.transpose(1, 2), None, None
    if x.device.type == 'cpu' and torch.compiler.is_compiling():
        # an exported program must not need this package's compiled library
        kernels = mixer.fast_path.cpu_kernels and not torch.compiler.is_exporting() and cpu_mix.usable(x)
        if kernels or (torch.is_grad_enabled() and max(H, W) <= mixer.fast_path.compiler_mixing_max_len):
            return _compiler_branches(mixer, x, kernels)
    groups = [(False, True)] if H == W else [(False,), (True,)]  # one batched op when the lengths agree
    outs = [out for branches in groups for out in _branch_group(mixer, x, branches)]
    return outs[0], outs[1], row.proj.bias, col.proj.bias


def _branch_group(mixer, x: torch.Tensor, branches: Tuple[bool, ...], z: Optional[torch.Tensor] = None,
                  padding: Optional[WindowPadding] = None) -> Tuple[torch.Tensor, ...]:
    """The given branches (False: rows, True: columns) of a map whose lines have the ops' built lengths, mixed
    and projected without their biases: one ``(B, L1, N, C)`` output per branch. ``z``: the compress layers'
    output if already computed (:func:`generator_inputs`); ``padding``: the lines' padding, to be masked."""
    ops = [mixer.column_op if columns else mixer.row_mix for columns in branches]
    weight = torch.stack([op.proj.weight for op in ops]) if len(ops) > 1 else ops[0].proj.weight[None]
    if ops[0].compress is None or not mixer.fast_path.recompute_mixing:  # static: expanded matrices are free
        return mix_project(branch_mixing(mixer, x, branches, z, padding), x, weight, None, branches,
                           mixer.fast_path)
    lines, gen_weight, gen_bias, dims = generator_inputs(mixer, x, branches, z)
    return generate_mix_project(lines, gen_weight, gen_bias, x, weight, branches, dims, mixer.fast_path, padding)


def _tiled_by_windows(mixer, x: torch.Tensor) -> bool:
    """Eager, windowed, and not a map of exactly one window: every row and column cut into windows of the built
    length, the last ones padded where a side is not a multiple of it (generated matrices only: a static one
    would need renormalising per window)."""
    H, W = x.shape[1:3]
    N = mixer.row_mix.seq_len
    return (mixer.dynamic_size and mixer.column_op.seq_len == N and isinstance(H, int) and isinstance(W, int)
            and (H, W) != (N, N) and not torch.compiler.is_compiling()
            and (mixer.row_mix.compress is not None or (H % N == 0 and W % N == 0)))


def _window_padding(length: int, N: int, axis: int) -> Optional[WindowPadding]:
    """How lines of ``length`` tokens are padded to windows of ``N`` (None: they are not)."""
    pad = -length % N
    return WindowPadding(axis, (length + pad) // N, N - pad) if pad else None


def _padded(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``x`` padded with zeros to ``size`` along ``dim`` (1: H, 2: W of an NHWC map)."""
    if x.shape[dim] == size:
        return x
    return torch.nn.functional.pad(x, (0, 0) * (3 - dim) + (0, size - x.shape[dim]))


def _tiled_window_branches(mixer, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor],
                                                              Optional[torch.Tensor]]:
    """Row and column branches of a map cut into windows, through the fused ops: the windows of the rows are the
    rows of ``x.view(B, H * W / N, N, C)`` and those of the columns the columns of ``x.view(B * H / N, N, W, C)``
    (both free views), maps whose lines have the built length. A side that is not a multiple of N is padded
    first (rows and columns each only along their own lines) and the padding masked as :meth:`mix_lines` does:
    the compress layers run once on the map, and their output is padded with zeros (padding generates
    nothing)."""
    B, H, W, C = x.shape
    N = mixer.row_mix.seq_len
    row, col = mixer.row_mix, mixer.column_op
    Hp, Wp = H + (-H % N), W + (-W % N)
    z_row = z_col = None
    if row.compress is not None:
        z_row = z_col = _compressed(mixer, x, [row] if col is row else [row, col])
        if col is not row:
            z_row, z_col = z_row.chunk(2, dim=-1)
        z_row = _padded(z_row, 2, Wp).reshape(B, H * (Wp // N), N, -1)
        z_col = _padded(z_col, 1, Hp).reshape(B * (Hp // N), N, W, -1)
    rows, = _branch_group(mixer, _padded(x, 2, Wp).view(B, H * (Wp // N), N, C), (False,), z_row,
                          _window_padding(W, N, axis=2))
    cols, = _branch_group(mixer, _padded(x, 1, Hp).view(B * (Hp // N), N, W, C), (True,), z_col,
                          _window_padding(H, N, axis=1))  # (B * Hp / N, W, N, C)
    cols = cols.view(B, Hp // N, W, N, C).permute(0, 2, 1, 3, 4).reshape(B, W, Hp, C)
    return rows.view(B, H, Wp, C)[:, :, :W], cols[:, :, :H], row.proj.bias, col.proj.bias


def fuse_branches(mixer, x: torch.Tensor) -> torch.Tensor:
    """Everything but the output projection of a token mixer: the three branches, fused (``mixer.fusable()``
    must hold)."""
    C = x.shape[-1]
    rows, cols, bias_row, bias_col = _fused_branches(mixer, x)
    cols = cols.transpose(1, 2)  # (B, H, W, C) view
    if mixer.reweight is None:
        bias = None if bias_row is None else bias_row + bias_col
        x = linear(x, mixer.channel_mix.weight, bias, mixer.fast_path).add_(rows).add_(cols)
    else:
        chans = linear(x, mixer.channel_mix.weight, None, mixer.fast_path)
        # sums, then one division of the small result: a mean's backward would write a divided full-size map
        means = (rows.sum(dim=(1, 2)) + cols.sum(dim=(1, 2)) + chans.sum(dim=(1, 2))) / (rows.shape[1] * rows.shape[2])
        if bias_row is not None:
            means = means + (bias_row + bias_col)
        weights = softmax(mixer.reweight(means).view(-1, C, 3))  # per channel, over 3 branches
        if mixer.fast_path.cpu_kernels and _eager_cpu(rows) and cpu_mix.usable(rows):  # one pass, one back
            return cpu_mix.reweight(rows, cols, chans, weights, bias_row, bias_col)
        # in the branches' precision: under autocast the (tiny) fp32 weights would make every pass over the
        # maps fp32, and the output projection casts the sum back anyway
        weights = weights.to(rows.dtype)
        # branch order (column, row, channel) as in the official code
        w_col, w_row, w_chan = [w[:, None, None, :] for w in weights.unbind(-1)]
        if bias_row is None:
            x = rows * w_row
        else:  # the branch biases, weighted, enter with the first product
            x = torch.addcmul((w_row * bias_row + w_col * bias_col).to(rows.dtype), rows, w_row)
        x = x.addcmul_(cols, w_col).addcmul_(chans, w_chan)
    return x
