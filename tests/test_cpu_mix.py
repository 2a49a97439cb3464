"""The C++ mixing kernels (dynamixer/models/cpu_mix.cpp) against the same sums in float64 einsum: every
segment width path, rows and columns, strided and broadcast inputs, accumulation, gradients, bad inputs, and
the fast path's fallback when the kernels cannot be built."""
import warnings

import pytest
import timm
import torch

import dynamixer  # noqa: F401  (registers the models)
from dynamixer.models import compile_model, cpu_mix

if not cpu_mix.available():
    pytest.fail('the CPU kernels did not build here (a C++ compiler is needed, as for torch.compile)',
                pytrace=False)


def einsum_mix(mix, x, columns):
    xs = x.unflatten(-1, (mix.shape[2], -1))
    if columns:
        return torch.einsum('bwsji,biwsc->bjwsc', mix, xs).flatten(-2)
    return torch.einsum('bhsji,bhisc->bhjsc', mix, xs).flatten(-2)


def inputs(columns, c, S=3, shape=(2, 5, 7), dtype=torch.float64):
    B, H, W = shape
    L1, N = (W, H) if columns else (H, W)
    x = torch.randn(B, H, W, S * c, dtype=dtype)
    mix = torch.randn(B, L1, S, N, N, dtype=dtype).softmax(-1)
    return mix, x


@pytest.mark.parametrize('c', [5, 8, 24, 64])  # 5: the general loop; the others whole 8-lane vectors
@pytest.mark.parametrize('columns', [False, True])
@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_values_and_gradients_equal_einsum(c, columns, dtype, tol):
    torch.manual_seed(0)
    mix, x = inputs(columns, c)
    mix.requires_grad_(), x.requires_grad_()
    expected = einsum_mix(mix, x, columns)
    grad = torch.randn_like(expected)
    grad_mix, grad_x = torch.autograd.grad(expected, (mix, x), grad)
    mix_k, x_k = mix.detach().to(dtype).requires_grad_(), x.detach().to(dtype).requires_grad_()
    out = cpu_mix.mix_lines(mix_k, x_k, columns)
    assert out.dtype == dtype and out.shape == x.shape
    got_mix, got_x = torch.autograd.grad(out, (mix_k, x_k), grad.to(dtype))
    rel = lambda a, b: ((a.double() - b).abs().max() / b.abs().max()).item()  # noqa: E731
    assert rel(out, expected) <= tol
    assert rel(got_mix, grad_mix) <= tol
    assert rel(got_x, grad_x) <= tol
    transposed = einsum_mix(mix.detach().transpose(-1, -2), x.detach(), columns)  # a swapped index would pass?
    assert rel(out, transposed) > 10 * tol


def test_strided_maps_broadcast_matrices_and_accumulation():
    """``x`` as a crop of a wider map (not contiguous), ``out`` as a transposed view, a matrix shared by every
    line (stride 0, as the static generation) whose gradient sums over the lines, and ``accumulate``."""
    torch.manual_seed(0)
    B, H, W, S, c = 2, 4, 6, 2, 8
    x = torch.randn(B, H, W + 3, S * c)[:, :, 1:W + 1]  # (B, H, W, C) with unit channel stride, not contiguous
    assert not x.is_contiguous()
    shared = torch.randn(S, W, W).softmax(-1).requires_grad_()
    mix = shared.expand(B, H, S, W, W)
    out = cpu_mix.mix_lines(mix, x, False)
    assert torch.allclose(out, einsum_mix(mix.detach(), x, False), atol=1e-5)
    out.square().sum().backward()
    expected = torch.autograd.grad(einsum_mix(shared.expand(B, H, S, W, W), x, False).square().sum(), shared)[0]
    assert torch.allclose(shared.grad, expected, atol=1e-4)
    into = torch.ones(B, W, H, S * c).transpose(1, 2)  # a (B, H, W, C) view of a (B, W, H, C) buffer
    cpu_mix.mix_lines_into(mix.detach(), x, False, into, accumulate=True)
    assert torch.allclose(into, 1 + out.detach(), atol=1e-5)
    grad_x = torch.ones(B, H, W, S * c)
    grad_mix = torch.empty(B, H, S, W, W)
    g = torch.randn(B, H, W, S * c)
    cpu_mix.mix_lines_backward_into(g, mix.detach(), x, False, grad_mix, grad_x, accumulate=True)
    x_ = x.clone().requires_grad_()
    mix_ = mix.detach().clone().requires_grad_()
    e_mix, e_x = torch.autograd.grad(einsum_mix(mix_, x_, False), (mix_, x_), g)
    assert torch.allclose(grad_x, 1 + e_x, atol=1e-5) and torch.allclose(grad_mix, e_mix, atol=1e-5)


@pytest.mark.parametrize('bad,message', [
    (lambda mix, x: (mix[:, :-1], x), 'mix must be (B, L1, S, N, N)'),
    (lambda mix, x: (mix.transpose(-1, -2), x), "mix's last three dimensions must be contiguous"),
    (lambda mix, x: (mix.double(), x.double()), 'x must be float32 or bfloat16'),
    (lambda mix, x: (mix.bfloat16(), x), "mix must have x's dtype"),
    (lambda mix, x: (mix, x.transpose(-1, -2)), 'unit stride over channels'),
])
def test_bad_inputs_say_what_was_expected(bad, message):
    mix, x = inputs(False, 8, dtype=torch.float32)
    mix, x = bad(mix, x)
    with pytest.raises(RuntimeError, match=message.replace('(', r'\(').replace(')', r'\)')):
        torch.ops.dynamixer_cpu.mix_lines(mix, x, False)


def test_without_a_compiler_the_fast_path_falls_back_to_torch_ops(monkeypatch, tmp_path):
    from torch.utils import cpp_extension
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path))  # nothing built there yet

    def no_compiler(**kwargs):
        raise RuntimeError('Error building extension: g++ not found')
    monkeypatch.setattr(cpp_extension, 'load', no_compiler)
    monkeypatch.setattr(cpu_mix, '_loaded', None)
    with pytest.warns(UserWarning, match='could not be built.*g\\+\\+ not found'):
        assert not cpu_mix.available()
    torch.manual_seed(0)
    model = timm.create_model('dynamixer_cifar_t', depths=(1,), embed_dims=(16,), num_segments=(2,),
                              stage_strides=(1,), num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # warned once, not on every call
        fast = model(x)
    model.set_fast_path(False)
    assert torch.allclose(fast, model(x), atol=1e-5)


def test_flop_counter_counts_the_kernels_as_the_matmuls_they_replace():
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    model = timm.create_model('dynamixer_cifar_t', depths=(1,), embed_dims=(16,), num_segments=(2,),
                              stage_strides=(1,), num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    flops = []
    for kernels in (True, False):
        model.set_fast_path(cpu_kernels=kernels)
        with FlopCounterMode(display=False) as counter:
            model(x).sum().backward()
        flops.append(counter.get_total_flops())
    assert flops[0] == flops[1] > 0


@pytest.mark.parametrize('bias', [False, True])
@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_reweight_equals_the_weighted_sum_and_its_gradients(bias, dtype, tol):
    """The fusion ``w_row (rows + b_row) + w_col (cols + b_col) + w_chan chans`` with the columns as a transposed
    view (as the fast path passes them), against float64 autograd."""
    torch.manual_seed(0)
    B, H, W, C = 3, 4, 5, 24
    rows = torch.randn(B, H, W, C, dtype=torch.float64)
    cols = torch.randn(B, W, H, C, dtype=torch.float64).transpose(1, 2)
    chans = torch.randn(B, H, W, C, dtype=torch.float64)
    weights = torch.randn(B, C, 3, dtype=torch.float64).softmax(-1)
    biases = [torch.randn(C, dtype=torch.float64) if bias else None for _ in range(2)]
    inputs = [rows, cols, chans, weights, *biases]
    leaves = [t.clone().requires_grad_() if t is not None else None for t in inputs]

    def expected(rows, cols, chans, weights, bias_row, bias_col):
        w_col, w_row, w_chan = [w[:, None, None, :] for w in weights.unbind(-1)]
        return (w_row * (rows + (0 if bias_row is None else bias_row)) + w_col * (cols + (0 if bias_col is None
                else bias_col)) + w_chan * chans)
    out = expected(*leaves)
    grad = torch.randn_like(out)
    wanted = torch.autograd.grad(out, [t for t in leaves if t is not None], grad)
    mine = [t.detach().to(dtype if i < 3 else torch.float32).requires_grad_() if t is not None else None
            for i, t in enumerate(inputs)]
    got = cpu_mix.reweight(*mine)
    assert got.dtype == dtype and got.shape == (B, H, W, C)
    rel = lambda a, b: ((a.double() - b).abs().max() / b.abs().max()).item()  # noqa: E731
    assert rel(got, out) <= tol
    grads = torch.autograd.grad(got, [t for t in mine if t is not None], grad.to(dtype))
    assert len(grads) == len(wanted)
    for g, w in zip(grads, wanted):
        assert g.shape == w.shape and rel(g, w) <= tol
    assert grads[1].stride() == mine[1].stride()  # the columns' gradient in the columns' own layout


@pytest.mark.parametrize('columns', [False, True])
def test_from_logits_the_kernels_normalise_and_give_the_logits_gradient(columns):
    """``softmax=True``: the matrices come as logits, normalised as they are loaded, and the backward gives the
    logits' gradient (what the eager fast path uses, so that no probabilities are written or read back)."""
    torch.manual_seed(0)
    _, x = inputs(columns, 8)
    B, H, W, C = x.shape
    L1, N = (W, H) if columns else (H, W)
    logits = (3 * torch.randn(B, L1, 3, N, N, dtype=torch.float64)).requires_grad_()
    xd = x.clone().requires_grad_()
    expected = einsum_mix(logits.softmax(-1), xd, columns)
    grad = torch.randn_like(expected)
    grad_logits, grad_x = torch.autograd.grad(expected, (logits, xd), grad)
    out = torch.empty(B, H, W, C)
    cpu_mix.mix_lines_into(logits.detach().float(), x.float(), columns, out, softmax=True)
    got_logits, got_x = torch.empty(logits.shape), torch.empty(B, H, W, C)
    cpu_mix.mix_lines_backward_into(grad.float(), logits.detach().float(), x.float(), columns, got_logits, got_x,
                                    softmax=True)
    assert torch.allclose(out.double(), expected, atol=1e-5)
    assert torch.allclose(got_logits.double(), grad_logits, atol=1e-5)
    assert torch.allclose(got_x.double(), grad_x, atol=1e-5)
    assert not torch.allclose(got_logits.double(), torch.einsum('bljsc,blisc->blsji', grad.unflatten(-1, (3, -1))
                              if not columns else grad.transpose(1, 2).unflatten(-1, (3, -1)),
                              x.unflatten(-1, (3, -1)) if not columns else x.transpose(1, 2).unflatten(-1, (3, -1))),
                              atol=1e-3)  # that would be the probabilities' gradient, not the logits'


@pytest.mark.parametrize('N', [4, 7, 8, 16])  # the lengths with their own softmax loops, and the general one
def test_the_kernels_softmax_is_exact_over_any_logit_range_and_gives_masked_inputs_nothing(N):
    """The kernels' own exp (vectorised, not libm's) against float64 softmax: logits spread over +-80, and -inf
    for the padding of a last window (:func:`fused._mask_padding`), which must get exactly zero weight and zero
    gradient, whatever the padded tokens hold."""
    torch.manual_seed(0)
    B, H, W, S, c = 2, 3, N, 2, 8
    x = torch.randn(B, H, W, S * c, dtype=torch.float64)
    logits = 25 * torch.randn(B, H, S, N, N, dtype=torch.float64)
    logits[0, 0, 0, 0, 0] = 80.  # one dominant input
    logits[1, 0, 0, 0] = -80.  # a row of tiny values alike
    valid = max(1, N - 3)
    logits[..., valid:] = float('-inf')
    expected = einsum_mix(logits.softmax(-1), x, False)
    grad = torch.randn_like(expected)
    out = torch.empty(B, H, W, S * c)
    cpu_mix.mix_lines_into(logits.float(), x.float(), False, out, softmax=True)
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5)
    noisy = x.clone()
    noisy[:, :, valid:] = 1e6  # what padding holds is never mixed in
    cpu_mix.mix_lines_into(logits.float(), noisy.float(), False, out, softmax=True)
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5)
    got_logits = torch.empty(logits.shape)
    cpu_mix.mix_lines_backward_into(grad.float(), logits.float(), x.float(), False, got_logits, None, softmax=True)
    want_logits, = torch.autograd.grad(einsum_mix(logits.requires_grad_().softmax(-1), x, False), logits, grad)
    assert torch.equal(got_logits[..., valid:], torch.zeros_like(got_logits[..., valid:]))
    assert torch.allclose(got_logits.double()[..., :valid], want_logits[..., :valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('generation', ['dynamic', 'static'])
def test_inductor_compiles_the_kernels_into_a_bf16_training_step(generation, monkeypatch):
    """The recipe's mode for real (inductor, bf16 autocast, training and inference): the kernels' layouts hold up
    under the compiler (the static matrices come broadcast, stride 0), and the step stays close to the plain
    modules in fp32."""
    from dynamixer.models.reference import reference_model
    calls, mix_lines = [], cpu_mix.mix_lines
    monkeypatch.setattr(cpu_mix, 'mix_lines', lambda *a, **k: calls.append(1) or mix_lines(*a, **k))
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model('dynamixer_cifar_t', patch_size=4, depths=(1, 1), embed_dims=(48, 96),
                              stage_strides=(1, 2), num_segments=(4, 8), num_classes=10, generation=generation)
    ref = reference_model(model)
    x = torch.randn(4, 3, 32, 32)
    compiled = compile_model(model)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = compiled(x)
    out.float().sum().backward()
    assert calls  # traced into the graph
    expected = ref(x)
    expected.sum().backward()
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(out, expected) < 0.03
    grads = [rel(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters()) if q.grad.norm() > 0]
    assert len(grads) > 10 and max(grads) < 0.1
    model.eval(), ref.eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert rel(compiled(x), ref(x)) < 0.03


def _channels_last_nodes(monkeypatch) -> list:
    """The nodes inductor's layout optimisation stores channels-last, per lowered graph (recorded)."""
    from torch._inductor.graph import GraphLowering
    recorded, find = [], GraphLowering.find_nodes_prefer_channels_last

    def recording_find(self):
        nodes = find(self)
        recorded.append([str(n.target) for n in nodes])
        return nodes
    monkeypatch.setattr(GraphLowering, 'find_nodes_prefer_channels_last', recording_find)
    return recorded


@pytest.mark.parametrize('stem,stem_ops', [('patch', True), ('conv', True), ('conv', False)])
def test_plain_torch_compile_keeps_the_nhwc_maps_out_of_inductors_channels_last_layout(monkeypatch, stem, stem_ops):
    """Inductor's layout optimisation (on for graphs with convolutions) stores every 4-D tensor upstream of a
    graph's last convolution channels-last: for our (B, H, W, C) maps that puts H innermost and C strided under
    every LayerNorm. The strided convs between stages run as linears, so a bare torch.compile reaches the conv
    stem at most (its modules; as opaque ops, cpu_stem, no convolution is left in the graphs): no LayerNorm,
    mixing or residual add of the blocks is laid out channels-last, forward or backward, and the outputs are the
    eager ones."""
    recorded = _channels_last_nodes(monkeypatch)
    torch.manual_seed(0)
    model = timm.create_model('dynamixer_cifar_t', patch_size=4, depths=(1, 1), embed_dims=(48, 96), stem=stem,
                              stage_strides=(1, 2), num_segments=(4, 8), num_classes=10)
    model.set_fast_path(cpu_stem_ops=stem_ops)
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    expected.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    # a cached compilation skips the lowering, and with it the decision
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(
            enable_autograd_cache=False):
        out = torch.compile(model)(x)
        out.sum().backward()
    if stem == 'patch' or stem_ops:
        assert recorded == []  # no convolution in the graphs: inductor keeps the eager layouts
    else:
        assert recorded and all(recorded), recorded  # the conv stem is laid out channels-last ...
        flat = [t for graph in recorded for t in graph]
        assert 'aten.convolution.default' in flat
        assert not [t for t in flat if 'layer_norm' in t or 'bmm' in t or 'dynamixer' in t], recorded  # ... only
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, atol=1e-4, rtol=1e-3)


def test_compile_model_is_torch_compile(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, 'compile', lambda model, **kwargs: seen.append(kwargs) or model)
    model = torch.nn.Linear(2, 2)
    assert compile_model(model) is model
    compile_model(model, mode='max-autotune', dynamic=False)
    assert seen == [{}, {'mode': 'max-autotune', 'dynamic': False}]
