"""The fast path equals the plain modules (same model, same weights, fast path off): outputs and gradients."""
import pytest
import timm
import torch

import dynamixer  # noqa: F401  (registers the models)
from dynamixer.models.dynamixer import DynaMixerTokenMixer, FastPath
from dynamixer.models.fused import fuse_branches
from dynamixer.models.reference import reference_model

OUT_TOL, GRAD_TOL = 1e-5, 1e-4
# a small model with the structure of the paper's variants (four stages, a transition after stage 1)
TINY = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32), num_segments=(2, 4, 4, 4), num_classes=7)


def _compare(model, x, grads: bool = True):
    """Outputs (eval) and gradients of parameters and input (train, no dropout) of model vs its reference."""
    ref = reference_model(model)
    settings = lambda m: [x.fast_path.enabled for x in m.modules() if isinstance(getattr(x, 'fast_path', None),
                                                                                  FastPath)]  # noqa: E731
    assert all(settings(model)) and not any(settings(ref)) and len(settings(ref)) > 3
    assert ref.state_dict().keys() == model.state_dict().keys()
    model.eval(), ref.eval()
    with torch.no_grad():
        out, expected = model(x), ref(x)
    assert out.shape == expected.shape
    assert (out - expected).abs().max().item() <= OUT_TOL
    if not grads:
        return
    model.train(), ref.train()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    (model(xa).square().sum()).backward()
    (ref(xb).square().sum()).backward()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        q = ref_params[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            err, scale = (p.grad - q.grad).abs().max().item(), q.grad.abs().max().item()
            assert err <= GRAD_TOL * max(1.0, scale), f'{name}: {err}'
            assert err <= 1e-3 * scale + 1e-7, f'{name}: {err} against gradients up to {scale}'  # small ones too
    assert (xa.grad - xb.grad).abs().max().item() <= GRAD_TOL


@pytest.mark.parametrize('name,img_size', [('dynamixer_s', 56), ('dynamixer_m', 56), ('dynamixer_l', 56)])
def test_paper_variant_structure(name, img_size):
    """S / M / L widths, segments and reduced dims, one layer per stage, at a small input size."""
    torch.manual_seed(0)
    model = timm.create_model(name, depths=(1, 1, 1, 1), img_size=img_size, num_classes=10)
    _compare(model, torch.randn(2, 3, img_size, img_size))


@pytest.mark.parametrize('name', ['dynamixer_cifar_t', 'dynamixer_cifar_s'])
def test_cifar_variants(name):
    torch.manual_seed(0)
    model = timm.create_model(name)
    _compare(model, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize('generation', ['dynamic', 'static', 'dense'])
@pytest.mark.parametrize('share_row_col', [False, True])
@pytest.mark.parametrize('fusion', ['reweight', 'sum'])
@pytest.mark.parametrize('cpu_kernels', [False, True])
def test_strategies_sharing_fusion(generation, share_row_col, fusion, cpu_kernels):
    torch.manual_seed(0)
    model = timm.create_model('dynamixer_cifar_t', generation=generation, share_row_col=share_row_col,
                              fusion=fusion, reduced_dims=3, **TINY)
    _compare(model.set_fast_path(cpu_kernels=cpu_kernels), torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize('generation', ['dynamic', 'static'])
@pytest.mark.parametrize('keep', [False, True])
@pytest.mark.parametrize('onednn', [False, True])
@pytest.mark.parametrize('cpu_kernels', [False, True])
def test_backward_with_and_without_kept_tokens_and_onednn(monkeypatch, generation, keep, onednn, cpu_kernels):
    """Both backward variants of the fused mixing (mixed tokens kept, as on CPU, or recomputed, as on CUDA), of
    the input gradient (oneDNN or torch's bmm) and of the mixing (C++ kernels or torch's ops)."""
    from dynamixer.models import fused
    monkeypatch.setattr(fused, '_keep_mixed_tokens', lambda x: keep)
    torch.manual_seed(0)
    model = timm.create_model('dynamixer_cifar_t', generation=generation, **TINY)
    model.set_fast_path(onednn_linears=onednn, onednn_min_macs=0, cpu_kernels=cpu_kernels)
    _compare(model, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize('img_size', [(48, 48), (40, 24), (24, 56)])
def test_other_and_non_square_sizes(img_size):
    torch.manual_seed(0)
    model = timm.create_model('dynamixer_cifar_t', img_size=img_size, **TINY)
    _compare(model, torch.randn(2, 3, *img_size))


@pytest.mark.parametrize('input_size', [(48, 40), (20, 24), (32, 58), (64, 64)])
def test_dynamic_img_size_windows(input_size):
    """Built at 32, run larger and smaller (padded, masked windows); the last case is exact multiples."""
    torch.manual_seed(0)
    model = timm.create_model('dynamixer_cifar_t', dynamic_img_size=True, **TINY)
    _compare(model, torch.randn(2, 3, *input_size))


def test_dynamic_img_size_with_sharing_and_static():
    torch.manual_seed(0)
    for kwargs in (dict(share_row_col=True), dict(generation='static', fusion='sum')):
        model = timm.create_model('dynamixer_cifar_t', dynamic_img_size=True, **kwargs, **TINY)
        _compare(model, torch.randn(2, 3, 40, 28))


def test_token_mixer_alone_and_mixing_matrices():
    """The block on its own, and the batched mixing matrices equal each op's own ``mixing_matrix``."""
    torch.manual_seed(0)
    mixer = DynaMixerTokenMixer(24, (6, 6), num_segments=4, reduced_dim=2)
    ref = reference_model(mixer)
    assert mixer.fast_path.enabled and not ref.fast_path.enabled and not ref.row_mix.fast_path.enabled
    x = torch.randn(3, 6, 6, 24)
    with torch.no_grad():
        assert (mixer(x) - ref(x)).abs().max().item() <= OUT_TOL
        rows, cols = mixer.mixing_matrices(x)
        expect_rows = mixer.row_mix.mixing_matrix(x.reshape(-1, 6, 24)).view(3, 6, 4, 6, 6)
        expect_cols = mixer.col_mix.mixing_matrix(x.transpose(1, 2).reshape(-1, 6, 24)).view(3, 6, 4, 6, 6)
    assert (rows - expect_rows).abs().max().item() <= 1e-6
    assert (cols - expect_cols).abs().max().item() <= 1e-6


def test_compile_fullgraph_matches_reference():
    torch.manual_seed(0)
    model = timm.create_model('dynamixer_cifar_t', **TINY).eval()
    ref = reference_model(model).eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend='eager')  # fullgraph: any graph break raises
    with torch.no_grad():
        assert (compiled(x) - ref(x)).abs().max().item() <= OUT_TOL
    compiled(x.requires_grad_()).sum().backward()


@pytest.mark.parametrize('kernels', [False, True])
@pytest.mark.parametrize('size,kwargs', [((6, 6), {}), ((6, 4), {}), ((6, 6), dict(generation='static')),
                                         ((6, 6), dict(generation='dense')), ((6, 6), dict(share_row_col=True)),
                                         ((4, 6), dict(fusion='sum'))])
def test_compiled_mixing_matches_reference(size, kwargs, kernels, monkeypatch):
    """Under torch.compile on CPU the branches run as plain ops around the mixing (``_compiler_branches``): the
    token mixer's outputs and gradients are the plain modules', in every generation strategy, with shared ops,
    either fusion and on non-square maps. The mixing is the C++ kernel where allowed (training and inference),
    otherwise a broadcast product in training and the batched matmul in inference."""
    from dynamixer.models import cpu_mix, fused
    if kernels and not cpu_mix.available():
        pytest.fail('the CPU kernels did not build here (a C++ compiler is needed, as for torch.compile)')
    taken, mixed = [], []
    compiler_branches, mix_lines = fused._compiler_branches, cpu_mix.mix_lines
    monkeypatch.setattr(fused, '_compiler_branches', lambda *a: taken.append(1) or compiler_branches(*a))
    monkeypatch.setattr(cpu_mix, 'mix_lines', lambda *a, **k: mixed.append(1) or mix_lines(*a, **k))
    torch._dynamo.reset()  # each case compiles afresh (dynamo caps recompilations of one function)
    torch.manual_seed(0)
    mixer = DynaMixerTokenMixer(24, size, num_segments=4, reduced_dim=2, **kwargs)
    mixer.fast_path.cpu_kernels = kernels
    ref = reference_model(mixer)
    x = torch.randn(3, *size, 24)
    compiled = torch.compile(mixer, fullgraph=True, backend='aot_eager')  # dynamo traces, autograd differentiates
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = compiled(xa), ref(xb)
    assert taken and bool(mixed) == kernels
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    assert rel(out, expected) <= 1e-5
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    assert rel(xa.grad, xb.grad) <= 1e-5
    ref_params = dict(ref.named_parameters())
    for name, p in mixer.named_parameters():
        assert rel(p.grad, ref_params[name].grad) <= 1e-5, name
    taken.clear()
    with torch.no_grad():  # inference: the kernel, or else the batched matmul (faster there than the product)
        assert rel(compiled(x), ref(x)) <= 1e-5
    assert bool(taken) == kernels


def bf16_errors(model, x):
    """Relative errors (outputs in eval, parameter gradients in train) of the fast model and of its reference
    under bf16 autocast, both against the reference in fp32."""
    ref = reference_model(model)
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
    model.eval(), ref.eval()
    with torch.no_grad():
        exact = ref(x)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            fast_out, ref_out = model(x), ref(x)
    assert fast_out.dtype == ref_out.dtype == torch.bfloat16
    model.train(), ref.train()
    ref(x).square().sum().backward()
    exact_grads = [p.grad.clone() for p in ref.parameters()]
    ref.zero_grad()
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        model(x).float().square().sum().backward()
        ref(x).float().square().sum().backward()
    flat = lambda grads: torch.cat([g.double().flatten() for g in grads])  # noqa: E731
    exact_grads = flat(exact_grads)
    return (rel(fast_out, exact), rel(ref_out, exact), rel(flat(p.grad for p in model.parameters()), exact_grads),
            rel(flat(p.grad for p in ref.parameters()), exact_grads))


def test_bf16_autocast_costs_no_accuracy_beyond_autocast():
    """The fast path's low-precision shortcuts (norms, softmax, fusion in bf16) stay as accurate as plain autocast
    on the reference: both within 2% of fp32, the fast path's error at most 1.5x the reference's."""
    torch.manual_seed(0)
    model = timm.create_model('dynamixer_cifar_t', weight_init='fan_in', **TINY)
    fast_out, ref_out, fast_grad, ref_grad = bf16_errors(model, torch.randn(4, 3, 32, 32))
    assert 0 < fast_out < 0.02 and fast_out < 1.5 * ref_out
    assert 0 < fast_grad < 0.02 and fast_grad < 1.5 * ref_grad


def test_autocast_norms_write_the_low_precision():
    from dynamixer.models.dynamixer import MixerLayer
    torch.manual_seed(0)
    model = timm.create_model('dynamixer_cifar_t', **TINY)
    layer = next(m for m in model.modules() if isinstance(m, MixerLayer))
    ref_layer = next(m for m in reference_model(model).modules() if isinstance(m, MixerLayer))
    x = torch.randn(2, 8, 8, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer._norm(layer.norm1, x)
        assert ref_layer._norm(ref_layer.norm1, x).dtype == torch.float32
    assert out.dtype == torch.bfloat16
    assert (out.float() - layer.norm1(x)).abs().max().item() < 0.02
    with torch.autocast('cpu', dtype=torch.bfloat16), torch.no_grad():
        assert layer._norm(layer.norm1, x).dtype == torch.bfloat16
    assert layer._norm(layer.norm1, x).dtype == torch.float32  # no autocast: untouched
    seen = []  # a hook on the norm must still fire: the layer then calls the module itself
    handle = layer.norm1.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    mixer = layer.token_mixer
    with torch.autocast('cpu', dtype=torch.bfloat16), torch.no_grad():
        layer(torch.randn(2, mixer.column_op.seq_len, mixer.row_mix.seq_len, 16))
    handle.remove()
    assert seen == [torch.float32]


def check_autocast_fusion_dtype(device: str = 'cpu') -> None:
    """Under autocast the per-channel fusion weights (softmax, bias terms) must not pull the fused map to fp32."""
    torch.manual_seed(0)
    mixer = DynaMixerTokenMixer(24, (6, 6), num_segments=4, reduced_dim=2).to(device)
    x = torch.randn(2, 6, 6, 24, dtype=torch.bfloat16, device=device)
    with torch.autocast(device, dtype=torch.bfloat16), torch.no_grad():
        fused = fuse_branches(mixer, x)
    assert fused.dtype == torch.bfloat16
    with torch.no_grad():
        expected = fuse_branches(mixer, x.float())
    assert (fused.float() - expected).abs().max().item() < 0.05 * expected.abs().max().item()


def test_autocast_fusion_stays_in_the_low_precision():
    check_autocast_fusion_dtype('cpu')
