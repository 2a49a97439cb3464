"""One model made of real modules: hooks fire on every layer, wrapped layers are honoured, quantization and LoRA
work, and the fast path is a per-instance setting (in the style of timm's own model tests)."""
import copy

import pytest
import timm
import torch
import torch.nn as nn

import dynamixer  # noqa: F401  registers the variants
from dynamixer.models import DynaMixerOp, DynaMixerTokenMixer, FastPath
from dynamixer.models.reference import reference_model

TINY = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32), num_segments=(2, 4, 4, 4), num_classes=5)


def tiny(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model('dynamixer_cifar_t', **{**TINY, **kwargs})


def linears(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize('mode', ['eval', 'train'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_hooks_fire_on_every_linear(mode, dtype):
    model = tiny().train(mode == 'train')
    fired = set()
    for name, layer in linears(model):
        layer.register_forward_hook(lambda module, args, out, name=name: fired.add(name))
    x = torch.randn(2, 3, 32, 32)
    with torch.set_grad_enabled(mode == 'train'), torch.autocast('cpu', dtype=dtype, enabled=dtype != torch.float32):
        model(x)
    assert fired == {name for name, _ in linears(model)} and len(fired) > 40


class Doubled(nn.Module):
    """A stand-in for a wrapped layer (LoRA, an adapter, an observer): it changes the output, and still shows
    the inner layer's ``weight`` and ``bias``, which a shortcut that reads them would silently use."""

    def __init__(self, inner: nn.Linear):
        super().__init__()
        self.inner = inner

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    @property
    def bias(self) -> torch.Tensor:
        return self.inner.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.inner(x)


KINDS = ['row_mix.compress', 'row_mix.generate', 'row_mix.proj', 'col_mix.compress', 'col_mix.generate',
         'col_mix.proj', 'channel_mix', 'token_mixer.proj', 'reweight.fc1', 'reweight.fc2', 'mlp.fc1', 'mlp.fc2']


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('grad', [False, True])
def test_a_wrapped_linear_changes_the_output_as_the_wrapper_says(kind, grad):
    model = tiny(weight_init='fan_in').eval()  # std 0.02 would leave the logits nearly blind to the change
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    name = next(n for n, _ in linears(model) if n.startswith('stages.1.') and n.endswith(kind))
    parent, _, child = name.rpartition('.')
    setattr(model.get_submodule(parent), child, Doubled(model.get_submodule(name)))
    with torch.set_grad_enabled(grad):
        got = model(x)
        expected = reference_model(model)(x)  # the plain modules, the same wrapper
    assert (got - before).abs().max() > 1e-3 * before.abs().max()
    assert torch.allclose(got, expected, atol=1e-5 * before.abs().max().item())


def test_quantize_dynamic_runs_and_stays_close_to_fp32():
    model = tiny(weight_init='fan_in').eval()
    x = torch.randn(4, 3, 32, 32)
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    assert sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in quantized.modules()) == len(
        linears(model)) and not linears(quantized)
    with torch.no_grad():
        exact, got = model(x), quantized(x)
    assert (got - exact).norm() / exact.norm() < 0.05
    assert (got.argmax(-1) == exact.argmax(-1)).all()


def test_lora_through_peft_trains_a_step_and_merges_back_to_the_same_outputs():
    peft = pytest.importorskip('peft')
    model = tiny(weight_init='fan_in')
    targets = ['compress', 'generate', 'row_mix.proj', 'col_mix.proj']
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    lora = peft.get_peft_model(model, config)
    trainable = [p for p in lora.parameters() if p.requires_grad]
    assert trainable and all('lora_' in n for n, p in lora.named_parameters() if p.requires_grad)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    before = [p.detach().clone() for p in trainable]
    nn.functional.cross_entropy(lora(x), y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable))
    lora.eval()
    with torch.no_grad():
        adapted = lora(x)
        merged = lora.merge_and_unload()
        assert not any('lora' in n for n, _ in merged.named_modules())
        assert torch.allclose(merged(x), adapted, atol=1e-5)
        merged.set_fast_path(enabled=False)
        assert torch.allclose(merged(x), adapted, atol=1e-5)


def test_fast_path_settings_are_per_model():
    a, b = tiny(), tiny()
    a.set_fast_path(enabled=False, onednn_linears=False)
    settings = lambda m: [x.fast_path for x in m.modules()  # noqa: E731
                          if isinstance(getattr(x, 'fast_path', None), FastPath)]
    assert all(not s.enabled and not s.onednn_linears for s in settings(a))
    assert all(s == FastPath() for s in settings(b))  # the other model is untouched
    assert len({id(s) for s in settings(a)}) == len(settings(a))  # every module holds its own copy
    c = copy.deepcopy(b).set_fast_path(triton=False)
    assert all(s.triton for s in settings(b)) and not any(s.triton for s in settings(c))
    assert not timm.create_model('dynamixer_cifar_t', fast_path=False).fast_path.enabled
    with pytest.raises(ValueError, match='unknown fast-path option'):
        a.set_fast_path(onednn=False)


def test_the_fast_kernels_are_taken_only_for_plain_unhooked_layers(monkeypatch):
    from dynamixer.models import fused
    calls = []
    real = fused.generate_mix_project
    monkeypatch.setattr(fused, 'generate_mix_project', lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny().train()
    x = torch.randn(2, 3, 32, 32)
    model(x)
    mixers = sum(isinstance(m, DynaMixerTokenMixer) for m in model.modules())
    assert len(calls) == mixers  # fused everywhere
    op = next(m for m in model.modules() if isinstance(m, DynaMixerOp))
    handle = op.generate.register_forward_pre_hook(lambda *args: None)
    calls.clear()
    model(x)
    assert len(calls) == mixers - 1  # the hooked mixer ran its modules
    handle.remove()
    calls.clear()
    model.set_fast_path(enabled=False)(x)
    assert not calls
