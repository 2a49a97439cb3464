"""The conv stem's layers as opaque CPU ops (dynamixer/models/cpu_stem.py): the fused BatchNorm + GELU kernel
against float64 torch, the whole stem against its modules (eager and compiled, fp32 and bf16 autocast, values,
gradients and running statistics), and the cases that must run the modules instead."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dynamixer.models import cpu_mix, cpu_stem
from dynamixer.models.dynamixer import ConvStem

if not cpu_mix.available():
    pytest.fail('the CPU kernels did not build here (a C++ compiler is needed, as for torch.compile)',
                pytrace=False)

batch_norm_gelu = torch.ops.dynamixer_cpu.batch_norm_gelu


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def norm_inputs(C: int, shape=(3, 5, 7), dtype=torch.float32, seed: int = 0):
    """A channels-last map with per-channel offsets and scales (as a conv's output has), and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(*shape, C, generator=g) * torch.rand(C, generator=g) * 3 + torch.randn(C, generator=g) * 2
    weight, bias = torch.randn(C, generator=g), torch.randn(C, generator=g)
    return y.to(dtype), weight, bias, torch.randn(*shape, C, generator=g).to(dtype)


def torch_batch_norm_gelu(y, weight, bias, eps=1e-5):
    """The modules' sum on an NHWC map: ``nn.BatchNorm2d`` in training, then the exact GELU."""
    z = F.batch_norm(y.movedim(-1, 1), None, None, weight, bias, training=True, eps=eps)
    return F.gelu(z).movedim(1, -1)


@pytest.mark.parametrize('C', [10, 24, 48])  # 10: a partial vector of channels
@pytest.mark.parametrize('shape', [(3, 5, 7), (2, 16, 16)])  # 105 rows (not whole 64-row blocks), 512
def test_fp32_values_statistics_and_gradients_equal_float64_torch(C, shape):
    y, weight, bias, grad = norm_inputs(C, shape)
    y64, w64, b64 = (t.double().requires_grad_() for t in (y, weight, bias))
    expected = torch_batch_norm_gelu(y64, w64, b64)
    expected_grads = torch.autograd.grad(expected, (y64, w64, b64), grad.double())
    y, weight, bias = (t.clone().requires_grad_() for t in (y, weight, bias))
    out, mean, invstd = batch_norm_gelu(y, weight, bias, 1e-5)
    grads = torch.autograd.grad(out, (y, weight, bias), grad)
    dims = tuple(range(y.dim() - 1))
    var = y64.detach().var(dims, unbiased=False)
    assert rel(mean, y64.detach().mean(dims)) < 1e-6
    assert rel(invstd, (var + 1e-5).rsqrt()) < 1e-6
    assert rel(out, expected) < 1e-5
    for got, want in zip(grads, expected_grads):
        assert rel(got, want) < 1e-5
    assert not mean.requires_grad and not invstd.requires_grad


@pytest.mark.parametrize('C', [10, 24])
def test_bf16_is_as_accurate_as_torchs_own_bf16_batch_norm_and_gelu(C):
    """In bf16 (autocast's stem: the conv's output in bf16, the norm's parameters fp32) the kernel's error against
    float64 stays within twice that of torch's kernels on the same bf16 inputs, forward and backward."""
    y, weight, bias, grad = norm_inputs(C, (4, 16, 16), torch.bfloat16)
    y64, w64, b64 = (t.double().requires_grad_() for t in (y, weight, bias))
    expected = torch_batch_norm_gelu(y64, w64, b64)
    expected_grads = torch.autograd.grad(expected, (y64, w64, b64), grad.double())
    y_t, w_t, b_t = (t.clone().requires_grad_() for t in (y, weight, bias))
    theirs = torch_batch_norm_gelu(y_t, w_t, b_t)
    their_grads = torch.autograd.grad(theirs, (y_t, w_t, b_t), grad)
    y_k, w_k, b_k = (t.clone().requires_grad_() for t in (y, weight, bias))
    ours = batch_norm_gelu(y_k, w_k, b_k, 1e-5)[0]
    our_grads = torch.autograd.grad(ours, (y_k, w_k, b_k), grad)
    assert ours.dtype == torch.bfloat16 and our_grads[0].dtype == torch.bfloat16
    assert our_grads[1].dtype == torch.float32
    assert rel(ours, expected) <= 2 * rel(theirs, expected) + 1e-4
    for got, their, want in zip(our_grads, their_grads, expected_grads):
        assert rel(got, want) <= 2 * rel(their, want) + 1e-4


def test_results_do_not_depend_on_the_thread_count():
    """Per-channel sums are added per block of rows in a fixed order, so 1 and 2 threads give the same bits."""
    y, weight, bias, grad = norm_inputs(24, (4, 32, 32))
    y, weight, bias = (t.requires_grad_() for t in (y, weight, bias))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out, mean, invstd = batch_norm_gelu(y, weight, bias, 1e-5)
            results.append((out, mean, invstd, *torch.autograd.grad(out, (y, weight, bias), grad)))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


def test_bad_inputs_get_a_message_naming_what_is_expected():
    y, weight, bias, _ = norm_inputs(8)
    with pytest.raises(RuntimeError, match='contiguous float32 or bfloat16'):
        batch_norm_gelu(y.transpose(1, 2), weight, bias, 1e-5)
    with pytest.raises(RuntimeError, match='contiguous float32 or bfloat16'):
        batch_norm_gelu(y.half(), weight, bias, 1e-5)
    with pytest.raises(RuntimeError, match=r'float32 \(C\) for C = 8'):
        batch_norm_gelu(y, weight[:4], bias, 1e-5)
    with pytest.raises(RuntimeError, match=r'float32 \(C\) for C = 8'):
        batch_norm_gelu(y, weight, bias.double(), 1e-5)


def stems(full_resolution: bool = True, patch_size: int = 4, dim: int = 48):
    """A ConvStem running its modules, and a copy running the ops."""
    torch.manual_seed(0)
    modules = ConvStem(3, dim, patch_size, full_resolution=full_resolution)
    with torch.no_grad():  # away from the initial statistics, so that a missed update shows
        for m in modules.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    modules.fast_path.cpu_stem_ops = False
    ops = copy.deepcopy(modules)
    ops.fast_path.cpu_stem_ops = True
    return modules, ops


@pytest.fixture
def calls(monkeypatch):
    """How often ConvStem took the ops path (counted when run or traced)."""
    counted, conv_stem = [], cpu_stem.conv_stem
    monkeypatch.setattr(cpu_stem, 'conv_stem', lambda *args: counted.append(1) or conv_stem(*args))
    return counted


def run(stem, x, dtype, compiled):
    forward = torch.compile(stem) if compiled else stem
    x = x.clone().requires_grad_()
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = forward(x)
    out.float().square().mean().backward()
    return out, x.grad, [p.grad for p in stem.parameters()], [b.clone() for b in stem.buffers()]


@pytest.mark.parametrize('compiled', [False, True], ids=['eager', 'compiled'])
@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize('full_resolution', [True, False])
def test_the_ops_path_equals_the_modules(calls, compiled, dtype, tol, full_resolution):
    """Outputs, input and parameter gradients, running statistics and batch counts after two steps; the images
    are 30 x 36, so the stem crops them to whole patches first."""
    modules, ops = stems(full_resolution)
    torch._dynamo.reset()
    x = torch.randn(3, 3, 30, 36)
    for _ in range(2):
        expected, got = run(modules, x, dtype, compiled), run(ops, x, dtype, compiled)
    assert calls, 'the ops path was not taken'
    out, grad_x, grads, buffers = got
    assert out.shape == expected[0].shape == (3, 7, 9, 48) and out.is_contiguous() and out.dtype == expected[0].dtype
    assert rel(out, expected[0]) < tol
    assert rel(grad_x, expected[1]) < tol
    for got_grad, want in zip(grads, expected[2]):
        assert rel(got_grad, want) < tol
    for got_buffer, want in zip(buffers, expected[3]):
        assert got_buffer.dtype == want.dtype
        torch.testing.assert_close(got_buffer, want, atol=tol, rtol=tol)


def test_running_statistics_follow_batch_norm_exactly_on_small_maps(calls):
    """On 8 x 8 images the first norm averages 2 x 64 values, where the unbiased variance's n / (n - 1) is 1.6%."""
    modules, ops = stems(patch_size=2, dim=16)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        modules(x), ops(x)
    assert calls
    for (name, got), want in zip(ops.named_buffers(), modules.buffers()):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, msg=name)


def test_a_model_with_the_conv_stem_takes_the_ops_path_in_training_only(calls):
    import timm
    model = timm.create_model('dynamixer_cifar_xs', num_classes=10, depths=(1, 1))
    x = torch.randn(2, 3, 32, 32)
    model.eval()(x)
    assert not calls
    model.train()(x).sum().backward()
    assert len(calls) == 1
    model.set_fast_path(cpu_stem_ops=False)(x)
    model.set_fast_path(enabled=False, cpu_stem_ops=True)(x)
    assert len(calls) == 1


class ConvWithLoRA(nn.Conv2d):
    """A stand-in of another type (as a LoRA or quantized layer would be)."""


@pytest.mark.parametrize('case', ['forward hook on a norm', 'forward pre-hook on the sequence', 'backward hook',
                                  'global hook', 'fp16 autocast', 'fp64', 'tanh GELU', 'ReLU', 'conv subclass',
                                  'dilated conv', 'no running stats'])
def test_the_modules_run_where_the_ops_would_skip_or_change_something(calls, case):
    stem = stems()[1]
    layers = stem.convs
    seen, x, dtype = [], torch.randn(2, 3, 16, 16), None
    handles = []
    if case == 'forward hook on a norm':
        handles.append(layers[1].register_forward_hook(lambda *args: seen.append(1)))
    elif case == 'forward pre-hook on the sequence':
        handles.append(layers.register_forward_pre_hook(lambda *args: seen.append(1)))
    elif case == 'backward hook':
        handles.append(layers[0].register_full_backward_hook(lambda *args: seen.append(1)))
    elif case == 'global hook':
        handles.append(nn.modules.module.register_module_forward_hook(lambda *args: seen.append(1)))
    elif case == 'fp16 autocast':
        dtype = torch.float16
    elif case == 'fp64':
        stem.double()
        x = x.double()
    elif case == 'tanh GELU':
        layers[2].approximate = 'tanh'
    elif case == 'ReLU':
        layers[2] = nn.ReLU()
    elif case == 'conv subclass':
        conv = ConvWithLoRA(3, layers[0].out_channels, 3, 1, 1, bias=False)
        conv.load_state_dict(layers[0].state_dict())
        layers[0] = conv
    elif case == 'dilated conv':
        layers[0].dilation = (2, 2)
    elif case == 'no running stats':
        layers[1].track_running_stats = False
    try:
        with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = stem(x.requires_grad_())
        out.float().sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    assert not calls
    if 'hook' in case:
        assert seen
