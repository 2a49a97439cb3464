"""The fast path on a CUDA GPU: equal to the reference (fp32, TF32 off), close in bf16 autocast, and the
keep / recompute settings of the mixing matrices agree. Runs only where a GPU is (CI has none; the GPU
results are recorded in docs/benchmarks.md)."""
import pytest
import timm
import torch

import dynamixer  # noqa: F401  (registers the models)
from test_reference import TINY, _compare, bf16_errors, check_autocast_fusion_dtype

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 matmuls and convs would put both implementations ~1e-3 apart; the oracle compares true fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize('recompute', [True, False])
def test_paper_variant_on_cuda(recompute):
    torch.manual_seed(0)
    model = timm.create_model('dynamixer_s', depths=(1, 1, 1, 1), img_size=56, num_classes=10).cuda()
    model.set_fast_path(recompute_mixing=recompute)
    _compare(model, torch.randn(2, 3, 56, 56, device='cuda'))


@pytest.mark.parametrize('kwargs', [dict(generation='static'), dict(generation='dense', share_row_col=True),
                                    dict(fusion='sum'), dict(img_size=(40, 24)), dict(dynamic_img_size=True)])
def test_options_on_cuda(kwargs):
    torch.manual_seed(0)
    model = timm.create_model('dynamixer_cifar_t', **{**TINY, **kwargs}).cuda()
    size = (48, 40) if kwargs.get('dynamic_img_size') else kwargs.get('img_size', (32, 32))
    _compare(model, torch.randn(2, 3, *size, device='cuda'))


def test_bf16_autocast_on_cuda():
    """On CUDA autocast puts LayerNorm and softmax in fp32; the fast path writes them in bf16 (see
    ``fused.layer_norm`` / ``fused.softmax``) and must stay as accurate as the reference under autocast."""
    torch.manual_seed(0)
    model = timm.create_model('dynamixer_cifar_t', weight_init='fan_in', **TINY).cuda()
    fast_out, ref_out, fast_grad, ref_grad = bf16_errors(model, torch.randn(4, 3, 32, 32, device='cuda'))
    assert 0 < fast_out < 0.02 and fast_out < 1.5 * ref_out
    assert 0 < fast_grad < 0.02 and fast_grad < 1.5 * ref_grad


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_triton_mixing_kernel_on_cuda(dtype):
    """The Triton kernel against the torch path (bmm), both branches, a line length that fills no 16-block."""
    from dynamixer.models import fused, triton_mix
    pytest.importorskip('triton')
    torch.manual_seed(0)
    for B, H, W, C, S in [(3, 32, 32, 192, 8), (2, 12, 7, 48, 4)]:
        x = torch.randn(B, H, W, C, device='cuda', dtype=dtype)
        for branches in ([(False, True)] if H == W else []) + [(False,), (True,)]:
            mix = torch.stack([torch.randn(B, W if col else H, S, H if col else W, H if col else W,
                                           device='cuda').softmax(-1) for col in branches]).to(dtype)
            assert triton_mix.usable(mix, x)
            out = fused._mixed_tokens(mix, x, branches)
            expected = torch.stack([torch.einsum('blsni,blisc->blnsc', m.float(), fused._segments(
                x.float(), S, col).transpose(2, 3)).flatten(-2).flatten(0, 2) for m, col in zip(mix, branches)])
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            assert (out.float() - expected).abs().max().item() <= tol * max(1.0, expected.abs().max().item())


def test_autocast_fusion_dtype_on_cuda():
    """CUDA autocast makes the fusion weights' softmax fp32; the fusion must still run in bf16."""
    check_autocast_fusion_dtype('cuda')


def test_compile_has_no_graph_breaks_on_cuda():
    """On CUDA the fast path's Triton checks run (on CPU they short-circuit): they must not break the graph."""
    torch._dynamo.reset()
    model = timm.create_model('dynamixer_cifar_t', **TINY).cuda()
    compiled = torch.compile(model, backend='eager', fullgraph=True)  # fullgraph: a graph break raises
    x = torch.randn(2, 3, 32, 32, device='cuda')
    with torch.autocast('cuda', dtype=torch.bfloat16):
        compiled(x).float().sum().backward()
    compiled.eval()
    with torch.no_grad():
        assert (compiled(x) - model(x)).abs().max().item() < 1e-4
