"""The fast path on a CUDA GPU: equal to the reference (fp32, TF32 off), close in bf16 autocast, and the
keep / recompute settings of the mixing matrices agree. Runs only where a GPU is (CI has none; the GPU
results are recorded in docs/benchmarks.md)."""
import pytest
import timm
import torch

import dynamixer  # noqa: F401  (registers the models)
from dynamixer.models import dynamixer as dm
from dynamixer.models.reference import reference_model
from test_reference import TINY, _compare, bf16_errors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 matmuls and convs would put both implementations ~1e-3 apart; the oracle compares true fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize('recompute', [True, False])
def test_paper_variant_on_cuda(recompute, monkeypatch):
    monkeypatch.setattr(dm, 'RECOMPUTE_MIXING', recompute)
    torch.manual_seed(0)
    model = timm.create_model('dynamixer_s', depths=(1, 1, 1, 1), img_size=56, num_classes=10).cuda()
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
