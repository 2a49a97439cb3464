"""The conv stem's layers as opaque CPU kernels, for training: oneDNN's convolutions and a fused BatchNorm + GELU.

Under ``torch.compile`` inductor decomposes a BatchNorm in training into reductions of its own and stores the
stem's maps channels-last around its convolutions; for the narrow maps of a small model's stem (24 or 48 channels
at full or half resolution) its kernels reduce over one or two vector chunks of channels, with transposes between
the convolution's layout and the norm's, and a quarter of a CIFAR training step went there. Here every layer is an
op the compiler does not look into, all on one channels-last layout: each convolution (forward and backward ops of
its own, ATen's kernels) and each BatchNorm with the GELU after it (``batch_norm_gelu`` of ``cpu_mix.cpp``: two
passes over the map forward, two back). The values are the modules' up to rounding (tests/test_cpu_stem.py), and the
running statistics are updated as ``nn.BatchNorm2d`` updates them. Measurements: docs/benchmarks.md.
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from dynamixer.models import cpu_mix

CHANNELS_LAST = torch.channels_last


def _conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, padding: int) -> Tensor:
    return torch.ops.aten.convolution(x, weight, bias, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1)


@torch.library.custom_op('dynamixer_stem::conv', mutates_args=())
def stem_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, padding: int) -> Tensor:
    """A 3 x 3 convolution of the channels-last map ``x``, to a channels-last map."""
    return _conv(x, weight, bias, stride, padding).contiguous(memory_format=CHANNELS_LAST)


@stem_conv.register_fake
def _(x, weight, bias, stride, padding):
    size = [(n + 2 * padding - k) // stride + 1 for n, k in zip(x.shape[2:], weight.shape[2:])]
    return torch.empty((x.shape[0], weight.shape[0], *size), dtype=x.dtype, device=x.device,
                       memory_format=CHANNELS_LAST)


@torch.library.custom_op('dynamixer_stem::conv_backward', mutates_args=())
def stem_conv_backward(grad: Tensor, x: Tensor, weight: Tensor, input_grad: bool, bias_grad: bool, stride: int,
                       padding: int) -> Tuple[Tensor, Tensor, Tensor]:
    grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad, x, weight, [weight.shape[0]] if bias_grad else None, [stride] * 2, [padding] * 2, [1, 1], False,
        [0, 0], 1, [input_grad, True, bias_grad])
    return (grad_x.contiguous(memory_format=CHANNELS_LAST) if input_grad else x.new_empty(0),
            grad_weight.contiguous(), grad_bias if bias_grad else weight.new_empty(0))


@stem_conv_backward.register_fake
def _(grad, x, weight, input_grad, bias_grad, stride, padding):
    return (torch.empty_like(x, memory_format=CHANNELS_LAST) if input_grad else x.new_empty(0),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            weight.new_empty(weight.shape[0] if bias_grad else 0))


def _stem_conv_setup(ctx, inputs, output) -> None:
    x, weight, bias, ctx.stride, ctx.padding = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _stem_conv_grad(ctx, grad):
    x, weight = ctx.saved_tensors
    input_grad, bias_grad = ctx.needs_input_grad[0], ctx.has_bias and ctx.needs_input_grad[2]
    grad_x, grad_weight, grad_bias = stem_conv_backward(grad.contiguous(memory_format=CHANNELS_LAST), x, weight,
                                                        input_grad, bias_grad, ctx.stride, ctx.padding)
    return grad_x if input_grad else None, grad_weight, grad_bias if bias_grad else None, None, None


stem_conv.register_autograd(_stem_conv_grad, setup_context=_stem_conv_setup)


def _plain_conv(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and not m._parameters.keys() - {'weight', 'bias'} and m.groups == 1
            and m.dilation == (1, 1) and m.padding_mode == 'zeros' and isinstance(m.padding, tuple)
            and m.stride[0] == m.stride[1] and m.padding[0] == m.padding[1])


def _plain_norm(m: nn.Module) -> bool:
    return (type(m) is nn.BatchNorm2d and not m._parameters.keys() - {'weight', 'bias'} and m.affine
            and m.track_running_stats and m.momentum is not None and m.weight.dtype == torch.float32)


def supported(layers: Sequence[nn.Module]) -> bool:
    """Whether ``layers`` are (conv, BatchNorm, GELU)* conv of exactly these torch modules, as ``ConvStem`` builds
    them, and the C++ kernels are built (a LoRA, quantized or parametrized stand-in, the tanh GELU or another
    activation runs the modules)."""
    *groups, last = layers
    if len(groups) % 3 or not _plain_conv(last):
        return False
    return cpu_mix.available() and all(
        _plain_conv(conv) and _plain_norm(norm) and type(act) is nn.GELU and act.approximate == 'none'
        for conv, norm, act in zip(groups[0::3], groups[1::3], groups[2::3]))


def _update_running_stats(norm: nn.BatchNorm2d, mean: Tensor, invstd: Tensor, count: int) -> None:
    """As ``nn.BatchNorm2d`` in training: an exponential average of the batch's mean and unbiased variance."""
    with torch.no_grad():
        var = (invstd.pow(-2) - norm.eps) * (count / max(count - 1, 1))
        norm.running_mean.lerp_(mean, norm.momentum)
        norm.running_var.lerp_(var, norm.momentum)
        norm.num_batches_tracked.add_(1)


def conv_stem(layers: Sequence[nn.Module], x: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
    """``layers`` (see :func:`supported`, in training mode) on the NCHW images ``x``, as one channels-last chain
    of the ops above; returns the contiguous NHWC map. ``dtype``: autocast's lower precision, which the modules'
    convolutions would cast to, or None."""
    *groups, last = layers
    cast = (lambda t: t if t is None else t.to(dtype)) if dtype is not None else (lambda t: t)  # noqa: E731
    x = cast(x).contiguous(memory_format=CHANNELS_LAST)
    for conv, norm, act in zip(groups[0::3], groups[1::3], groups[2::3]):
        y = stem_conv(x, cast(conv.weight), cast(conv.bias), conv.stride[0], conv.padding[0]).permute(0, 2, 3, 1)
        out, mean, invstd = torch.ops.dynamixer_cpu.batch_norm_gelu(y, norm.weight, norm.bias, norm.eps)
        _update_running_stats(norm, mean, invstd, y.numel() // y.shape[-1])
        x = out.permute(0, 3, 1, 2)
    x = stem_conv(x, cast(last.weight), cast(last.bias), last.stride[0], last.padding[0])
    return x.permute(0, 2, 3, 1).contiguous()
