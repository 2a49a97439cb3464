"""CPU kernels for the token mixing of DynaMixer's fast path (``cpu_mix.cpp``): each segment of each row or
column of an NHWC map mixed by its own N x N matrix, read and written in the map's layout, fp32 or bf16.

They are built at first use with the C++ compiler that ``torch.compile`` needs anyway (about 10 seconds, once
per machine and version, in torch's extensions cache: ``$TORCH_EXTENSIONS_DIR`` or
``~/.cache/torch_extensions``). Where that fails, :func:`available` is False and
the fast path keeps torch's ops. The ops are registered with torch (``torch.ops.dynamixer_cpu``) with their
shapes for the compiler and their gradient, so a compiled training step calls them as opaque kernels.
"""
import hashlib
import logging
import os
import platform
import threading
import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch

_SOURCE = Path(__file__).with_name('cpu_mix.cpp')
# reassociation lets the compiler vectorise the dot products over a segment's channels; OpenMP is what
# at::parallel_for runs on in torch's own builds (without the flag the header's loop runs on one thread)
_CFLAGS = ['-O3', '-march=native', '-fno-math-errno', '-fno-trapping-math', '-fassociative-math',
           '-fno-signed-zeros', '-fopenmp']
_LDFLAGS = ['-fopenmp']
_lock = threading.Lock()
_loaded: Optional[bool] = None


@torch._dynamo.assume_constant_result  # under torch.compile: decided (and built) once, outside the graph
def available() -> bool:
    """Whether the kernels are built and loaded (builds them on the first call)."""
    global _loaded
    if _loaded is None:
        with _lock:
            if _loaded is None:
                _loaded = _build()
    return _loaded


def _build() -> bool:
    logger = logging.getLogger('torch.utils.cpp_extension')
    level = logger.level
    logger.setLevel(logging.ERROR)  # its import warns that a CPU-only machine has no CUDA: not news here
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    # keyed by what goes into the library, so that a warm start loads it without asking the build tool
    # (and by the CPU's features: -march=native code must not be loaded on an older CPU sharing the cache)
    key = hashlib.sha256('\0'.join([_SOURCE.read_text(), *_CFLAGS, *_LDFLAGS, torch.__version__,
                                     platform.machine(), _cpu_features()]).encode()).hexdigest()[:16]
    name = f'dynamixer_cpu_mix_{key}'
    root = os.environ.get('TORCH_EXTENSIONS_DIR') or cpp_extension.get_default_build_root()  # as torch's builds
    library = Path(root) / name / f'{name}.so'
    try:
        if library.is_file():
            torch.ops.load_library(str(library))
        else:
            library.parent.mkdir(parents=True, exist_ok=True)
            cpp_extension.load(name=name, sources=[str(_SOURCE)], extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS,
                               build_directory=str(library.parent), is_python_module=False, verbose=False)
    except Exception as error:  # no compiler, no headers, ...: the torch ops do the same work
        message = str(error).strip().splitlines()
        warnings.warn(f'dynamixer: the CPU mixing kernels could not be built, so the fast path uses torch ops '
                      f'({type(error).__name__}{": " + message[0] if message else ""})')
        return False
    _register()
    return True


def _cpu_features() -> str:
    try:
        with open('/proc/cpuinfo') as info:
            return next((line for line in info if line.startswith(('flags', 'Features'))), '')
    except OSError:
        return platform.processor()


def usable(x: torch.Tensor, mix: Optional[torch.Tensor] = None) -> bool:
    """Whether :func:`mix_lines` takes a map ``x`` (and ``mix``): CPU, fp32 or bf16 (alike), kernels built.
    Under autocast ``x`` is checked in the dtype the mixing will run in."""
    autocast = torch.get_autocast_dtype('cpu') if torch.is_autocast_enabled('cpu') else None
    dtype = autocast or x.dtype
    return (x.device.type == 'cpu' and dtype in (torch.float32, torch.bfloat16)
            and (mix is None or (mix.device.type == 'cpu' and (autocast or mix.dtype) == dtype)) and available())


def mix_lines(mix: torch.Tensor, x: torch.Tensor, columns: bool) -> torch.Tensor:
    """Rows (``columns=False``) or columns of the map ``x`` ``(B, H, W, C)`` mixed segment by segment:
    ``mix`` ``(B, L1, S, N, N)`` (broadcast first two dimensions allowed), result ``(B, H, W, C)``;
    differentiable and traceable by ``torch.compile``."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return torch.ops.dynamixer_cpu.mix_lines(mix, x, columns)


def mix_lines_into(mix: torch.Tensor, x: torch.Tensor, columns: bool, out: torch.Tensor,
                   accumulate: bool = False, softmax: bool = False) -> None:
    """:func:`mix_lines` written into (or, ``accumulate``, added to) ``out``, a map of ``x``'s shape with any
    strides but unit channel stride; no gradient. ``softmax``: ``mix`` holds logits, normalised on the fly."""
    torch.ops.dynamixer_cpu.mix_lines_out(mix, x, columns, accumulate, out, softmax)


def mix_lines_backward_into(grad: torch.Tensor, mix: torch.Tensor, x: torch.Tensor, columns: bool,
                            grad_mix: Optional[torch.Tensor], grad_x: Optional[torch.Tensor],
                            accumulate: bool = False, softmax: bool = False) -> None:
    """Gradients of :func:`mix_lines` for ``grad`` (a map of ``x``'s shape): ``grad_mix`` (contiguous, ``mix``'s
    shape) written, ``grad_x`` written or (``accumulate``) added to; either may be None. ``softmax``: ``mix``
    holds logits, and ``grad_mix`` gets their gradient."""
    torch.ops.dynamixer_cpu.mix_lines_backward_out(grad, mix, x, columns, grad_mix, grad_x, accumulate, softmax)


class _Reweight(torch.autograd.Function):
    """:func:`reweight`'s gradient: an autograd Function (eager only) costs less Python per call than the op's
    registered autograd formula."""

    @staticmethod
    def forward(ctx, rows, cols, chans, weights, bias_row, bias_col):
        ctx.save_for_backward(rows, cols, chans, weights, bias_row, bias_col)
        return torch.ops.dynamixer_cpu.reweight(rows, cols, chans, weights, bias_row, bias_col)

    @staticmethod
    def backward(ctx, grad):
        rows, cols, chans, weights, bias_row, bias_col = ctx.saved_tensors
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        grad_rows, grad_cols, grad_chans, grad_weights, grad_sum = torch.ops.dynamixer_cpu.reweight_backward(
            grad, rows, cols, chans, weights, bias_row, bias_col)
        grad_bias_row = None if bias_row is None else (weights[..., 1] * grad_sum).sum(0)
        grad_bias_col = None if bias_col is None else (weights[..., 0] * grad_sum).sum(0)
        return grad_rows, grad_cols, grad_chans, grad_weights, grad_bias_row, grad_bias_col


def reweight(rows: torch.Tensor, cols: torch.Tensor, chans: torch.Tensor, weights: torch.Tensor,
             bias_row: Optional[torch.Tensor], bias_col: Optional[torch.Tensor]) -> torch.Tensor:
    """The re-weighting fusion in one pass (differentiable, one pass back too; eager): ``w_row (rows + bias_row)
    + w_col (cols + bias_col) + w_chan chans`` for maps ``(B, H, W, C)`` (any strides, unit channel stride), with
    ``weights`` ``(B, C, 3)`` in the official branch order (column, row, channel) and optional biases ``(C)``."""
    as_float = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
    return _Reweight.apply(rows, cols, chans, as_float(weights), as_float(bias_row), as_float(bias_col))


def _register() -> None:
    @torch.library.register_fake('dynamixer_cpu::mix_lines')
    def _mix_lines_fake(mix, x, columns):
        return x.new_empty(x.shape)

    @torch.library.register_fake('dynamixer_cpu::mix_lines_backward')
    def _mix_lines_backward_fake(grad, mix, x, columns):
        return mix.new_empty(mix.shape), x.new_empty(x.shape)

    def setup_context(ctx, inputs, output):
        mix, x, columns = inputs
        ctx.save_for_backward(mix, x)
        ctx.columns = columns

    def backward(ctx, grad) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], None]:
        mix, x = ctx.saved_tensors
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        grad_mix, grad_x = torch.ops.dynamixer_cpu.mix_lines_backward(grad, mix, x, ctx.columns)
        return grad_mix, grad_x, None

    torch.library.register_autograd('dynamixer_cpu::mix_lines', backward, setup_context=setup_context)
    _register_batch_norm_gelu()
    _register_flops()


def _register_batch_norm_gelu() -> None:
    """``batch_norm_gelu(y, weight, bias, eps) -> (gelu(batch_norm(y)), mean, invstd)`` for a contiguous map ``y``
    with channels last (the conv stem's, models/cpu_stem.py): shapes for the compiler and the gradient of y,
    weight and bias (mean and invstd are statistics, not differentiated)."""
    @torch.library.register_fake('dynamixer_cpu::batch_norm_gelu')
    def _forward_fake(y, weight, bias, eps):
        return torch.empty_like(y), weight.new_empty(y.shape[-1]), weight.new_empty(y.shape[-1])

    @torch.library.register_fake('dynamixer_cpu::batch_norm_gelu_backward')
    def _backward_fake(grad, y, mean, invstd, weight, bias):
        return torch.empty_like(y), torch.empty_like(weight), torch.empty_like(weight)

    def setup_context(ctx, inputs, output):
        y, weight, bias, _ = inputs
        _, mean, invstd = output
        ctx.save_for_backward(y, mean, invstd, weight, bias)
        ctx.mark_non_differentiable(mean, invstd)

    def backward(ctx, grad, *statistics):
        y, mean, invstd, weight, bias = ctx.saved_tensors
        grad_y, grad_weight, grad_bias = torch.ops.dynamixer_cpu.batch_norm_gelu_backward(
            grad.contiguous(), y, mean, invstd, weight, bias)
        return grad_y, grad_weight, grad_bias, None

    torch.library.register_autograd('dynamixer_cpu::batch_norm_gelu', backward, setup_context=setup_context)


def _register_flops() -> None:
    """Let ``FlopCounterMode`` (``dynamixer bench``'s GFLOP/s) count the kernels as the matmuls they replace:
    2 N multiply-adds per channel of every token for the mixing, as much again for each gradient."""
    from torch.utils.flop_counter import register_flop_formula

    def mixing_flops(mix_shape, x_shape) -> int:
        return 2 * mix_shape[-1] * x_shape[0] * x_shape[1] * x_shape[2] * x_shape[3]

    ops = torch.ops.dynamixer_cpu
    register_flop_formula(ops.mix_lines)(lambda mix, x, *args, **kwargs: mixing_flops(mix, x))
    register_flop_formula(ops.mix_lines_out)(lambda mix, x, *args, **kwargs: mixing_flops(mix, x))
    register_flop_formula(ops.mix_lines_backward)(lambda grad, mix, x, *args, **kwargs: 2 * mixing_flops(mix, x))

    @register_flop_formula(ops.mix_lines_backward_out)
    def _(grad, mix, x, columns, grad_mix, grad_x, *args, **kwargs) -> int:
        return ((grad_mix is not None) + (grad_x is not None)) * mixing_flops(mix, x)
