"""The model library: exact to the official architecture, timm-native, any input size, clear errors.

The timm API checks mirror timm's own tests/test_models.py.
"""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import dynamixer
from dynamixer.models.reference import reference_model
from dynamixer.convert import convert_official_state_dict, resample_op_state
from dynamixer.models import DynaMixer

torch.manual_seed(0)

# A small model with the structure of the official ones: four stages, a stride-2 transition.
TINY = dict(img_size=56, patch_size=7, depths=(1, 1, 2, 1), embed_dims=(16, 32, 32, 32),
            stage_strides=(1, 2, 1, 1), num_segments=(4, 8, 8, 8), reduced_dims=2, num_classes=5)


def tiny(**kwargs) -> DynaMixer:
    return DynaMixer(**dict(TINY, **kwargs)).eval()


def macs(model: torch.nn.Module, x: torch.Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    return counter.get_total_flops() / 2


# ---------------------------------------------------------------- exact to the official numbers

@pytest.mark.parametrize('name,params,gmacs', [
    ('dynamixer_s', 26_265_960, 7.302),
    ('dynamixer_m', 57_128_264, 16.981),
    ('dynamixer_l', 97_818_088, 27.343),
])
def test_official_params_and_gmacs(name, params, gmacs):
    with torch.device('meta'):  # no memory, no init: counts only
        model = timm.create_model(name)
        assert sum(p.numel() for p in model.parameters()) == params
        assert round(macs(model, torch.empty(1, 3, 224, 224)) / 1e9, 3) == gmacs


def test_official_line_lengths():
    with torch.device('meta'):
        for name, lengths in [('dynamixer_s', (32, 16, 16, 16)), ('dynamixer_m', (32, 32, 16, 16))]:
            model = timm.create_model(name)
            got = [stage.blocks[0].token_mixer.row_mix.seq_len for stage in model.stages]
            assert tuple(got) == lengths


def _official_forward(sd, x, segments, reduced_dim):
    """The official model's equations applied to an official-layout state dict (the spec, step by step)."""
    lin = lambda t, p, bias=True: F.linear(t, sd[p + '.weight'], sd[p + '.bias'] if bias else None)

    def op(t, p, S):
        B, L, C = t.shape
        w = lin(t, p + '.compress').reshape(B, L, S, reduced_dim).permute(0, 2, 1, 3).reshape(B, S, -1)
        w = lin(w, p + '.generate').reshape(B, S, L, L).softmax(dim=-2)  # (N_in, N_out), normalised over N_in
        t = t.reshape(B, L, S, C // S).permute(0, 2, 3, 1) @ w
        return lin(t.permute(0, 3, 1, 2).reshape(B, L, C), p + '.out')

    def block(t, p, S):
        B, H, W, C = t.shape
        h = op(t.permute(0, 2, 1, 3).reshape(-1, H, C), p + '.mix_h', S).reshape(B, W, H, C).permute(0, 2, 1, 3)
        w = op(t.reshape(-1, W, C), p + '.mix_w', S).reshape(B, H, W, C)
        c = lin(t, p + '.mlp_c', bias=False)
        a = lin(F.gelu(lin((h + w + c).mean((1, 2)), p + '.reweight.fc1')), p + '.reweight.fc2')
        a = a.reshape(B, C, 3).permute(2, 0, 1).softmax(dim=0)[:, :, None, None, :]
        return lin(h * a[0] + w * a[1] + c * a[2], p + '.proj')

    ln = lambda t, p: F.layer_norm(t, t.shape[-1:], sd[p + '.weight'], sd[p + '.bias'])
    x = F.conv2d(x, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], stride=7).permute(0, 2, 3, 1)
    stage = 0
    for i in range(len({k.split('.')[1] for k in sd if k.startswith('network.')})):
        if f'network.{i}.proj.weight' in sd:
            x = F.conv2d(x.permute(0, 3, 1, 2), sd[f'network.{i}.proj.weight'], sd[f'network.{i}.proj.bias'],
                         stride=2).permute(0, 2, 3, 1)
            continue
        j = 0
        while f'network.{i}.{j}.norm1.weight' in sd:
            p = f'network.{i}.{j}'
            x = x + block(ln(x, p + '.norm1'), p + '.attn', segments[stage])
            x = x + lin(F.gelu(lin(ln(x, p + '.norm2'), p + '.mlp.fc1')), p + '.mlp.fc2')
            j += 1
        stage += 1
    return lin(ln(x, 'norm').flatten(1, 2).mean(1), 'head')


def _official_state_dict(depths, dims, strides, segments, N, d, num_classes, scale=0.2):
    """Random weights in the official layout: network.{i} = blocks or a downsample, mix_h/mix_w/mlp_c/..."""
    g = torch.Generator().manual_seed(1)
    r = lambda *shape: torch.randn(*shape, generator=g) * scale
    sd = {'patch_embed.proj.weight': r(dims[0], 3, 7, 7), 'patch_embed.proj.bias': r(dims[0])}
    i = 0
    for s, (depth, D) in enumerate(zip(depths, dims)):
        if strides[s] > 1:
            sd[f'network.{i}.proj.weight'], sd[f'network.{i}.proj.bias'] = r(D, dims[s - 1], 2, 2), r(D)
            i += 1
        n, S = N[s], segments[s]
        for j in range(depth):
            p = f'network.{i}.{j}'
            for norm in ('norm1', 'norm2'):
                sd[f'{p}.{norm}.weight'], sd[f'{p}.{norm}.bias'] = 1 + r(D), r(D)
            for mix in ('mix_h', 'mix_w'):
                sd[f'{p}.attn.{mix}.out.weight'], sd[f'{p}.attn.{mix}.out.bias'] = r(D, D), r(D)
                sd[f'{p}.attn.{mix}.compress.weight'], sd[f'{p}.attn.{mix}.compress.bias'] = r(S * d, D), r(S * d)
                sd[f'{p}.attn.{mix}.generate.weight'] = r(n * n, n * d) * 5
                sd[f'{p}.attn.{mix}.generate.bias'] = r(n * n) * 5
            sd[f'{p}.attn.mlp_c.weight'] = r(D, D)
            sd[f'{p}.attn.reweight.fc1.weight'], sd[f'{p}.attn.reweight.fc1.bias'] = r(D // 4, D), r(D // 4)
            sd[f'{p}.attn.reweight.fc2.weight'], sd[f'{p}.attn.reweight.fc2.bias'] = r(3 * D, D // 4), r(3 * D)
            sd[f'{p}.attn.proj.weight'], sd[f'{p}.attn.proj.bias'] = r(D, D), r(D)
            sd[f'{p}.mlp.fc1.weight'], sd[f'{p}.mlp.fc1.bias'] = r(3 * D, D), r(3 * D)
            sd[f'{p}.mlp.fc2.weight'], sd[f'{p}.mlp.fc2.bias'] = r(D, 3 * D), r(D)
        i += 1
    sd['norm.weight'], sd['norm.bias'] = 1 + r(dims[-1]), r(dims[-1])
    sd['head.weight'], sd['head.bias'] = r(num_classes, dims[-1]), r(num_classes)
    return sd


@pytest.fixture(scope='module')
def official_tiny():
    """An official-layout checkpoint for TINY-like configs (one with a width-only transition too)."""
    sd = _official_state_dict(TINY['depths'], TINY['embed_dims'], TINY['stage_strides'], TINY['num_segments'],
                              (8, 4, 4, 4), 2, TINY['num_classes'])
    return sd


@pytest.mark.parametrize('wrap', ['plain', 'state_dict', 'state_dict_ema', 'module'])
def test_official_checkpoint_gives_official_logits(official_tiny, wrap):
    x = torch.randn(3, 3, 56, 56)
    expected = _official_forward(official_tiny, x, TINY['num_segments'], 2)
    ckpt = official_tiny
    if wrap == 'module':
        ckpt = {'module.' + k: v for k, v in official_tiny.items()}
    elif wrap != 'plain':
        ckpt = {wrap: official_tiny, 'epoch': 7}
    model = tiny()
    model.load_state_dict(convert_official_state_dict(ckpt), strict=True)
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5, rtol=0)


def test_converted_names_are_ours(official_tiny):
    names = convert_official_state_dict(official_tiny)
    assert not any(k.startswith(('network.', 'patch_embed.')) or '.attn.' in k or 'mix_h' in k for k in names)
    assert 'stages.1.downsample.proj.weight' in names
    assert 'stages.0.blocks.0.token_mixer.row_mix.generate.weight' in names


def test_convert_command_writes_safetensors(official_tiny, tmp_path):
    from safetensors.torch import load_file
    from dynamixer.cli import main
    src = tmp_path / 'official.pth'
    torch.save({'state_dict': official_tiny}, src)
    assert main(['convert', str(src), str(tmp_path / 'ours.safetensors')]) == 0
    model = tiny()
    model.load_state_dict(load_file(tmp_path / 'ours.safetensors'), strict=True)
    assert not list(tmp_path.glob('.*.tmp'))  # atomic write leaves no temporary behind


def test_convert_command_rejects_bad_files(tmp_path, capsys):
    from dynamixer.cli import main
    assert main(['convert', str(tmp_path / 'missing.pth'), str(tmp_path / 'out.safetensors')]) == 2
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'not a checkpoint')
    assert main(['convert', str(bad), str(tmp_path / 'out.safetensors')]) == 2
    err = capsys.readouterr().err
    assert 'does not exist' in err and 'could not read' in err and 'Traceback' not in err


# ---------------------------------------------------------------- the design knobs

@pytest.mark.parametrize('generation', ['dynamic', 'static', 'dense'])
@pytest.mark.parametrize('share_row_col', [False, True])
@pytest.mark.parametrize('fusion', ['reweight', 'sum'])
def test_knobs_forward_and_backward(generation, share_row_col, fusion):
    model = tiny(generation=generation, share_row_col=share_row_col, fusion=fusion).train()
    out = model(torch.randn(2, 3, 56, 56))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters()), 'every parameter must get a gradient'
    mixer = model.stages[0].blocks[0].token_mixer
    assert (mixer.col_mix is None) == share_row_col
    assert (mixer.reweight is None) == (fusion == 'sum')


def test_knob_parameter_shapes():
    op = tiny(generation='dynamic').stages[0].blocks[0].token_mixer.row_mix
    assert op.compress.weight.shape == (4 * 2, 16) and op.generate.weight.shape == (8 * 8, 8 * 2)
    op = tiny(generation='static').stages[0].blocks[0].token_mixer.row_mix
    assert op.compress is None and op.logits.shape == (4, 8, 8)
    op = tiny(generation='dense', reduced_dims=3).stages[0].blocks[0].token_mixer.row_mix
    assert op.generate.weight.shape == (8, 3)
    op = tiny(num_segments=2, reduced_dims=(1, 2, 4, 8)).stages[3].blocks[0].token_mixer.row_mix
    assert op.num_segments == 2 and op.reduced_dim == 8


def test_static_matrices_do_not_depend_on_input_but_dynamic_do():
    for generation, same in [('static', True), ('dynamic', False), ('dense', False)]:
        op = tiny(generation=generation).stages[0].blocks[0].token_mixer.row_mix
        a, b = op.mixing_matrix(torch.randn(1, 8, 16)), op.mixing_matrix(torch.randn(1, 8, 16))
        assert torch.allclose(a.sum(-1), torch.ones(1, 4, 8), atol=1e-6)  # rows are distributions
        assert torch.allclose(a, b) == same, generation


def test_dense_row_depends_only_on_its_own_token():
    op = tiny(generation='dense').stages[0].blocks[0].token_mixer.row_mix
    x = torch.randn(1, 8, 16)
    y = x.clone()
    y[0, 5] += 1.0
    changed = (op.mixing_matrix(x) - op.mixing_matrix(y)).abs().amax(dim=(0, 1, 3)) > 0
    assert changed.tolist() == [i == 5 for i in range(8)]


def test_dynamic_row_depends_on_whole_line():
    op = tiny().stages[0].blocks[0].token_mixer.row_mix
    x = torch.randn(1, 8, 16)
    y = x.clone()
    y[0, 5] += 1.0
    changed = (op.mixing_matrix(x) - op.mixing_matrix(y)).abs().amax(dim=(0, 1, 3)) > 0
    assert changed.all()


def test_bad_knobs_raise_value_error():
    with pytest.raises(ValueError, match='generation must be one of'):
        tiny(generation='random')
    with pytest.raises(ValueError, match='fusion must be one of'):
        tiny(fusion='max')
    with pytest.raises(ValueError, match='not divisible by num_segments'):
        tiny(num_segments=3)
    with pytest.raises(ValueError, match='has 2 entries but the model has 4 stages'):
        tiny(num_segments=(4, 8))
    with pytest.raises(ValueError, match='share_row_col'):
        tiny(share_row_col=True, img_size=(56, 28))


# ---------------------------------------------------------------- timm-native

@pytest.mark.parametrize('name', dynamixer.list_models())
def test_timm_create_model_and_pretrained_cfg(name):
    with torch.device('meta'):  # configuration only: skip allocating and initialising 100M parameters
        model = timm.create_model(name, num_classes=10)
    cfg = model.pretrained_cfg
    assert cfg['input_size'][1:] == model.img_size and cfg['interpolation'] == 'bicubic'
    assert len(cfg['mean']) == 3 and len(cfg['std']) == 3 and 0 < cfg['crop_pct'] <= 1
    assert isinstance(model.get_submodule(cfg['first_conv']), torch.nn.Conv2d)
    assert model.get_submodule(cfg['classifier']) is model.get_classifier()
    assert model.get_classifier().out_features == 10
    assert name in timm.list_models(module='dynamixer')


def test_crop_pct_per_variant():
    assert timm.get_pretrained_cfg('dynamixer_s').crop_pct == 0.9
    assert timm.get_pretrained_cfg('dynamixer_l').crop_pct == 0.875


def test_dynamixer_s_forward_api():
    model = timm.create_model('dynamixer_s', num_classes=10).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (1, 16, 16, 384)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (1, model.num_features) == (1, model.head_hidden_size)
        assert torch.allclose(model.forward_head(feats), model(x))


def test_reset_classifier():
    model = tiny()
    x = torch.randn(2, 3, 56, 56)
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.num_classes == 7
    model.reset_classifier(0)
    assert model(x).shape == (2, 32)
    model.reset_classifier(0, global_pool='')
    assert model(x).shape == (2, 4, 4, 32)
    with pytest.raises(ValueError, match='global_pool'):
        model.reset_classifier(3, global_pool='max')


def test_forward_intermediates_match_feature_info():
    model = tiny()
    x = torch.randn(2, 3, 56, 56)
    final, inter = model.forward_intermediates(x)
    assert len(inter) == len(model.feature_info) == 4
    for feat, info in zip(inter, model.feature_info):
        assert feat.shape == (2, info['num_chs'], 56 // info['reduction'], 56 // info['reduction'])
    assert torch.allclose(final, model.forward_features(x))
    only = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True, stop_early=True)
    assert [torch.allclose(a, b) for a, b in zip(only, inter[1:3])] == [True, True]
    nhwc = model.forward_intermediates(x, indices=1, output_fmt='NHWC', intermediates_only=True)
    assert torch.allclose(nhwc[0].permute(0, 3, 1, 2), inter[-1])


def test_prune_intermediate_layers():
    model = tiny()
    x = torch.randn(1, 3, 56, 56)
    inter = model.forward_intermediates(x, intermediates_only=True)
    assert model.prune_intermediate_layers([0, 1]) == [0, 1]
    assert len(model.stages) == 2
    pruned = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert torch.allclose(pruned[1], inter[1])


def test_features_only():
    model = timm.create_model('dynamixer_cifar_t', features_only=True, out_indices=(1, 3)).eval()
    outs = model(torch.randn(2, 3, 32, 32))
    assert [o.shape[1] for o in outs] == model.feature_info.channels() == [128, 128]
    assert [32 // o.shape[-1] for o in outs] == model.feature_info.reduction() == [4, 4]


def test_group_matcher_covers_all_parameters():
    from timm.models import group_parameters
    model = tiny()
    for coarse in (False, True):
        groups = group_parameters(model, model.group_matcher(coarse=coarse))
        names = [n for g in groups.values() for n in g]
        assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    fine = group_parameters(model, model.group_matcher())
    assert len(fine) > len(group_parameters(model, model.group_matcher(coarse=True)))


def test_grad_checkpointing_keeps_outputs_and_gradients():
    model = tiny(drop_path_rate=0.).train()
    x = torch.randn(2, 3, 56, 56)
    out = model(x)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    assert all(s.grad_checkpointing for s in model.stages)
    out2 = model(x)
    out2.sum().backward()
    assert torch.allclose(out, out2, atol=1e-6)
    assert all(torch.allclose(grads[n], p.grad, atol=1e-5) for n, p in model.named_parameters())


@pytest.mark.parametrize('kwargs', [{}, {'dynamic_img_size': True}])
def test_torch_compile_has_no_graph_breaks(kwargs):
    torch._dynamo.reset()
    model = tiny(**kwargs)
    x = torch.randn(2, 3, 56, 56)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(model, backend='eager', fullgraph=True)
    assert torch.allclose(compiled(x), model(x), atol=1e-6)


def test_drop_path_grows_linearly():
    model = tiny(drop_path_rate=0.4)
    rates = [b.drop_path1.drop_prob if hasattr(b.drop_path1, 'drop_prob') else 0.
             for s in model.stages for b in s.blocks]
    assert rates == pytest.approx([0.4 * i / 4 for i in range(5)])


def test_init_follows_the_paper():
    model = tiny()
    linear = model.stages[0].blocks[0].token_mixer.row_mix.generate
    assert abs(linear.weight.std().item() - 0.02) < 0.004  # timm's trunc_normal_ cuts at +-2 (absolute)
    assert (linear.bias == 0).all() and (model.norm.weight == 1).all()


def test_fan_in_init_scales_with_width():
    model = tiny(weight_init='fan_in')
    for linear in (model.stages[0].blocks[0].token_mixer.proj, model.stages[0].blocks[0].mlp.fc2):
        assert abs(linear.weight.std().item() * linear.in_features ** 0.5 - 1) < 0.15
    assert model.weight_init == 'fan_in'
    with pytest.raises(ValueError, match='weight_init'):
        tiny(weight_init='xavier')


@pytest.mark.parametrize('n', [1, 4, 7, 8, 14, 16])
def test_cpu_softmax_equals_torch_softmax(n):
    from dynamixer.models.fused import _use_whole_tensor_softmax, softmax
    x = torch.randn(3, 5, n, n, dtype=torch.float64) * 4
    x[0, 0, 0, :n // 2] = float('-inf')  # masked padding
    assert _use_whole_tensor_softmax(x) == (n % 16 != 0)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = softmax(a), torch.softmax(b, -1)
    assert torch.allclose(ya, yb, atol=1e-12)
    g = torch.randn_like(ya)
    ya.backward(g), yb.backward(g)
    assert torch.allclose(a.grad, b.grad, atol=1e-12)
    torch.autograd.gradcheck(softmax, (torch.randn(2, n, dtype=torch.float64, requires_grad=True),))


# ---------------------------------------------------------------- any input size

@pytest.mark.parametrize('img_size,lines', [(32, (4, 2)), (160, (22, 11)), ((84, 140), ((12, 20), (6, 10)))])
def test_builds_for_any_img_size(img_size, lines):
    model = tiny(img_size=img_size)
    first, later = [model.stages[i].blocks[0].token_mixer for i in (0, 1)]
    expect_first, expect_later = [(n, n) if isinstance(n, int) else n for n in lines]
    assert (first.column_op.seq_len, first.row_mix.seq_len) == expect_first
    assert (later.column_op.seq_len, later.row_mix.seq_len) == expect_later
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    assert model(torch.randn(1, 3, h, w)).shape == (1, 5)


def test_gmacs_grow_with_the_cube_of_line_length_in_the_generator():
    with torch.device('meta'):
        small, large = timm.create_model('dynamixer_s', img_size=112), timm.create_model('dynamixer_s')
        a, b = macs(small, torch.empty(1, 3, 112, 112)), macs(large, torch.empty(1, 3, 224, 224))
    assert 4 < b / a < 8  # more than linear in pixels (4x): the N*N generator and N^3 terms


@pytest.mark.parametrize('generation', ['dynamic', 'static', 'dense'])
def test_dynamic_img_size_is_identical_at_the_trained_size(generation):
    fixed = tiny(generation=generation)
    dynamic = tiny(generation=generation, dynamic_img_size=True)
    dynamic.load_state_dict(fixed.state_dict())
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(fixed(x), dynamic(x))


@pytest.mark.parametrize('size', [(56, 100), (40, 40), (61, 75), (120, 33)])
def test_dynamic_img_size_runs_at_any_size(size):
    model = tiny(dynamic_img_size=True, share_row_col=True)
    out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_windows_mix_only_within_themselves():
    """A line twice the trained length is mixed as two independent windows of the trained length."""
    op = tiny(dynamic_img_size=True).stages[0].blocks[0].token_mixer.row_mix
    x = torch.randn(3, 16, 16)
    with torch.no_grad():
        out = op.mix_lines(x, allow_windows=True)
        assert torch.allclose(out[:, :8], op(x[:, :8]), atol=1e-6)
        assert torch.allclose(out[:, 8:], op(x[:, 8:]), atol=1e-6)


def test_padding_is_masked():
    """Short lines are padded to the trained length, and the padding never leaks into real tokens."""
    op = tiny(dynamic_img_size=True).stages[0].blocks[0].token_mixer.row_mix
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        out = op.mix_lines(x, allow_windows=True)
        mix = op.mixing_matrix(F.pad(x, (0, 0, 0, 3)), torch.arange(8).expand(3, 8) < 5)
    assert out.shape == x.shape
    assert (mix[..., 5:] == 0).all()  # no weight on padded inputs
    # the real tokens ignore whatever values sit in the padding
    valid = torch.arange(8).expand(3, 8) < 5
    junk = torch.cat([x, torch.randn(3, 3, 16) * 100], dim=1)
    zero = F.pad(x, (0, 0, 0, 3))
    with torch.no_grad():
        assert torch.allclose(op(junk, valid)[:, :5], op(zero, valid)[:, :5], atol=1e-5)


def test_checkpoint_resamples_to_another_size():
    source = tiny()
    target = tiny(img_size=112)
    dynamixer.load_checkpoint(target, source.state_dict())
    src_op = source.stages[0].blocks[0].token_mixer.row_mix
    dst_op = target.stages[0].blocks[0].token_mixer.row_mix
    assert dst_op.seq_len == 16 and dst_op.generate.weight.shape == (256, 32)
    assert torch.equal(src_op.compress.weight, dst_op.compress.weight)  # size-free weights carried as they are
    assert torch.isfinite(target(torch.randn(1, 3, 112, 112))).all()


def test_resampling_keeps_logits_of_a_uniform_line():
    """Weights over generator input tokens are scaled by N_old/N_new, so a line of identical tokens yields the
    same logits at the new length, and smooth weights stay smooth."""
    n, m, d = 8, 12, 2
    weight, bias = torch.full((n * n, n * d), 0.3), torch.linspace(0, 1, n * n)
    new_w = resample_op_state(weight, 'weight', 'dynamic', m)
    new_b = resample_op_state(bias, 'bias', 'dynamic', m)
    assert new_w.shape == (m * m, m * d) and new_b.shape == (m * m,)
    z_old, z_new = torch.ones(n * d), torch.ones(m * d)
    assert torch.allclose(weight @ z_old, torch.full((n * n,), 0.3 * n * d))
    assert torch.allclose(new_w @ z_new, torch.full((m * m,), 0.3 * n * d), atol=1e-5)
    static = resample_op_state(torch.randn(4, n, n), 'logits', 'static', m)
    dense = resample_op_state(torch.randn(n, d), 'weight', 'dense', m)
    assert static.shape == (4, m, m) and dense.shape == (m, d)


def test_resample_through_timm_pretrained_loading(tmp_path):
    from safetensors.torch import save_file
    source = timm.create_model('dynamixer_cifar_t', num_classes=10)
    save_file(source.state_dict(), tmp_path / 'w.safetensors')
    model = timm.create_model('dynamixer_cifar_t', img_size=48, num_classes=10, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'w.safetensors')))
    assert model.stages[0].blocks[0].token_mixer.row_mix.seq_len == 24
    assert torch.equal(model.stem.proj.weight, source.stem.proj.weight)


# ---------------------------------------------------------------- bad input

def test_wrong_input_size_names_expected_and_fix():
    with pytest.raises(ValueError, match=r'built for 56x56 inputs but got 64x64.*dynamic_img_size=True'):
        tiny()(torch.randn(1, 3, 64, 64))


def test_wrong_channel_count():
    with pytest.raises(ValueError, match=r'\(batch, 3, H, W\).*in_chans=1'):
        tiny()(torch.randn(1, 1, 56, 56))
    with pytest.raises(ValueError, match='expected images shaped'):
        tiny()(torch.randn(3, 56, 56))


def test_unknown_variant_is_key_error_with_suggestion():
    with pytest.raises(KeyError, match="did you mean 'dynamixer_s'"):
        dynamixer.create_model('dynamixer_ss')
    with pytest.raises(KeyError, match='choose one of'):
        dynamixer.create_model('resnet50')


def test_checkpoint_of_another_architecture():
    other = tiny(embed_dims=(16, 64, 64, 64), num_segments=(4, 8, 8, 8))
    with pytest.raises(ValueError, match='does not fit this DynaMixer.*another shape.*same variant'):
        dynamixer.load_checkpoint(tiny(), other.state_dict())
    with pytest.raises(ValueError, match='missing'):
        dynamixer.load_checkpoint(tiny(), tiny(depths=(1, 1, 1, 1)).state_dict())
    with pytest.raises(ValueError, match='unexpected|missing'):
        dynamixer.load_checkpoint(tiny(), tiny(generation='static').state_dict())


def test_checkpoint_with_another_class_count():
    with pytest.raises(ValueError, match='classifies 7 classes.*num_classes=7'):
        dynamixer.load_checkpoint(tiny(), tiny(num_classes=7).state_dict())
    model = dynamixer.load_checkpoint(tiny(), tiny(num_classes=7).state_dict(), reset_head=True)
    assert model.head.out_features == 5


def test_too_small_inputs():
    with pytest.raises(ValueError, match='smaller than one patch'):
        tiny(img_size=4)
    with pytest.raises(ValueError, match='too small to downsample'):
        tiny(dynamic_img_size=True)(torch.randn(1, 3, 7, 7))


def test_verify_against_an_official_test_vector(official_tiny, tmp_path):
    """The same file format as the official test vector (weights, input, logits, constructor config)."""
    import json
    from safetensors.torch import save_file
    from dynamixer.cli import main
    x = torch.randn(2, 3, 56, 56)
    config = dict(layers=list(TINY['depths']), embed_dims=list(TINY['embed_dims']), patch_size=7,
                  transitions=[True, False, False, False], resolutions=[8, 4, 4, 4],
                  num_heads=list(TINY['num_segments']), reduced_dims=[2] * 4, mlp_ratios=[3] * 4, num_classes=5)
    tensors = {f'state_dict.{k}': v for k, v in official_tiny.items()}
    tensors.update(input=x, logits=_official_forward(official_tiny, x, TINY['num_segments'], 2))
    save_file(tensors, tmp_path / 'ref.safetensors', metadata={'config': json.dumps(config)})
    assert main(['convert', '--verify', str(tmp_path / 'ref.safetensors')]) == 0
    tensors['logits'] = tensors['logits'] + 1e-3
    save_file(tensors, tmp_path / 'bad.safetensors', metadata={'config': json.dumps(config)})
    assert main(['convert', '--verify', str(tmp_path / 'bad.safetensors')]) == 1


def test_local_dir_folder_loads_its_weights_without_pretrained_flag(tmp_path):
    from dynamixer.model_dir import save_model_dir
    trained = timm.create_model('dynamixer_cifar_t', num_classes=3, img_size=16)
    save_model_dir(trained, tmp_path / 'model', ['a', 'b', 'c'])
    loaded = timm.create_model(f'local-dir:{tmp_path / "model"}').eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), trained.eval()(x))


def test_cpu_inference_runs_big_batches_in_slices_with_the_same_outputs():
    model = tiny()
    stem_batches = []
    model.stem.register_forward_hook(lambda module, args, out: stem_batches.append(args[0].shape[0]))
    x = torch.randn(5, 3, 56, 56)
    per_image = model._elems_per_image * 4  # fp32 bytes of the largest temporary of one image
    model.set_fast_path(inference_slice_bytes=2 * per_image)
    with torch.no_grad():
        sliced = model(x)
    assert stem_batches == [2, 2, 1]
    stem_batches.clear()
    with torch.no_grad():
        model.set_fast_path(inference_slice_bytes=0)  # per model: never slice
        whole = model(x)
    assert stem_batches == [5]
    assert torch.allclose(sliced, whole, atol=1e-5)
    model.set_fast_path(inference_slice_bytes=2 * per_image)
    stem_batches.clear()
    model(x)  # autograd on: slicing would not save memory there, so the batch runs whole
    with torch.no_grad():
        torch.jit.trace(model, x, check_trace=False)  # traced graphs must keep a dynamic batch
    assert stem_batches == [5, 5]
    from dynamixer.models.reference import reference_model
    stem_batches.clear()
    with torch.no_grad():
        reference_model(model)(x)  # the plain model runs the batch whole
    assert stem_batches == [5]


def test_cpu_fp32_inference_uses_fused_onednn_linears_only_where_it_may(monkeypatch):
    import dynamixer.models.dynamixer as dm
    from dynamixer.models import fused
    from dynamixer.models.reference import reference_model
    if not fused._HAS_ONEDNN_LINEAR:
        pytest.skip('this torch build has no oneDNN linear kernels')
    calls = []

    def counted(x, weight, bias):
        calls.append(x.shape[0])
        return fused.linear_gelu(x, weight, bias)

    monkeypatch.setattr(dm, 'linear_gelu', counted)
    torch.manual_seed(0)
    model = tiny()
    layers = sum(isinstance(m, dm.MixerLayer) for m in model.modules())
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        fused_out = model(x)
        assert len(calls) == layers  # one fc1 + GELU per layer
        model.set_fast_path(cpu_fused_inference=False)
        plain = model(x)
        assert len(calls) == layers
        model.set_fast_path(cpu_fused_inference=True)
        assert (fused_out - plain).abs().max().item() <= 1e-5
        reference_model(model)(x)  # the plain oracle never fuses
        assert len(calls) == layers
        seen = []
        handle = model.stages[0].blocks[0].token_mixer.register_forward_hook(lambda *args: seen.append(1))
        hooked = model(x)
        handle.remove()
        assert seen == [1]  # the hooked layer ran its modules one by one ...
        assert len(calls) == 2 * layers - 1  # ... and the others stayed fused
        assert (hooked - fused_out).abs().max().item() <= 1e-5
        with torch.autocast('cpu', dtype=torch.bfloat16):
            model(x)
        model.train()(x)  # dropout / drop-path layers would be skipped
        torch.jit.trace(model.eval(), x, check_trace=False)  # exported graphs keep plain ops
        model.double()(x.double())
    model.float()(x)  # autograd on
    assert len(calls) == 2 * layers - 1
    with torch.no_grad():  # FlopCounterMode's module tracker hooks every module: module by module, same count
        assert macs(model, x) == macs(model, x.requires_grad_()) > 0
    assert len(calls) == 2 * layers - 1
    w, rows = torch.randn(6, 4), torch.randn(3, 5, 4)
    counter = FlopCounterMode(display=False)
    with counter:  # the fused linears themselves count as the linears they replace
        fused.linear_gelu(rows, w, None), fused.linear_add(rows, w, torch.zeros(6), torch.zeros(3, 5, 6))
    assert counter.get_total_flops() == 2 * (2 * 15 * 4 * 6)


class _CountOneDnnLinears(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the oneDNN linear calls (forward and backward) that run while it is active."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func.overloadpacket is torch.ops.mkldnn._linear_pointwise
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('bias', [True, False])
def test_onednn_linear_gives_f_linear_values_and_gradients(monkeypatch, bias):
    from dynamixer.models import fused
    if not fused._HAS_ONEDNN_LINEAR:
        pytest.skip('this torch build has no oneDNN linear kernels')
    fast = fused.FastPath(onednn_min_macs=0)  # these matrices are far too small to be worth it
    x = torch.randn(3, 5, 7, requires_grad=True)
    w = torch.randn(4, 7, requires_grad=True)
    b = torch.randn(4, requires_grad=True) if bias else None
    g = torch.randn(3, 5, 4)
    with _CountOneDnnLinears() as counter:
        out = fused.linear(x, w, b, fast)
        out.mul_(2)  # callers add to the result in place (the 'sum' fusion does)
        grads = torch.autograd.grad(out, [t for t in (x, w, b) if t is not None], g)
    assert counter.calls == 2  # the forward and the input gradient
    expected = torch.autograd.grad(2 * F.linear(x, w, b), [t for t in (x, w, b) if t is not None], g)
    assert torch.allclose(out, 2 * F.linear(x, w, b), atol=1e-5)
    for got, want in zip(grads, expected):
        assert torch.allclose(got, want, atol=1e-5)
    first = torch.autograd.grad(fused.linear(x, w, b, fast).pow(2).sum(), x, create_graph=True)[0]
    expected = torch.autograd.grad(F.linear(x, w, b).pow(2).sum(), x, create_graph=True)[0]
    assert torch.allclose(torch.autograd.grad(first.sum(), w)[0], torch.autograd.grad(expected.sum(), w)[0],
                          atol=1e-4)  # double backward (e.g. gradient penalties) works too
    with _CountOneDnnLinears() as counter:
        torch.autograd.grad(fused.linear(x.detach(), w, b, fast).sum(), w)  # no input gradient asked: one call
        with torch.autocast('cpu', dtype=torch.bfloat16):
            fused.linear(x, w, b, fast)
        fused.linear(x.double(), w.double(), None, fast)
        fused.linear(x, w, b, fused.FastPath(onednn_min_macs=x.numel() * w.shape[0] + 1)).sum().backward()  # too small
        fused.linear(x, w, b, fused.FastPath(onednn_min_macs=0, onednn_linears=False)).sum().backward()  # turned off
        fused.linear(x, w, b).sum().backward()  # no fast path given: F.linear
    assert counter.calls == 1


def test_cpu_fp32_training_runs_its_linears_through_onednn_with_the_reference_gradients(monkeypatch):
    import dynamixer.models.dynamixer as dm
    from dynamixer.models import fused
    from dynamixer.models.reference import reference_model
    if not fused._HAS_ONEDNN_LINEAR:
        pytest.skip('this torch build has no oneDNN linear kernels')
    torch.manual_seed(0)
    model = tiny().train().set_fast_path(onednn_min_macs=0)  # a tiny model's linears are all below the threshold
    ref = reference_model(model)
    x = torch.randn(2, 3, 56, 56)

    def grads(m):
        m.zero_grad()
        with _CountOneDnnLinears() as counter:
            m(x).logsumexp(-1).sum().backward()
        return counter.calls, {k: p.grad.clone() for k, p in m.named_parameters()}

    calls, fast = grads(model)
    layers = sum(isinstance(m, dm.MixerLayer) for m in model.modules())
    # per layer: fc1, fc2, channel, compress (rows and columns share one call), output projection, each forward
    # and input gradient, and the two mixed-token projections' input gradient
    assert calls == layers * (5 * 2 + 2)
    ref_calls, expected = grads(ref)
    assert ref_calls == 0  # the plain oracle stays plain
    for name, grad in expected.items():
        assert torch.allclose(fast[name], grad, atol=1e-4), name
    calls, plain = grads(model.set_fast_path(onednn_linears=False))
    assert calls == 0
    for name, grad in expected.items():
        assert torch.allclose(plain[name], grad, atol=1e-4), name


@pytest.mark.parametrize('stem, first_stride, num_convs', [('conv', 1, 3), ('conv_strided', 2, 2)])
def test_conv_stems_reach_the_patch_grid_with_overlapping_convs(stem, first_stride, num_convs):
    """Both conv stems end on the patch stem's grid; 'conv' starts at full resolution, 'conv_strided' does not."""
    patch = timm.create_model('dynamixer_cifar_xs', stem='patch')
    model = timm.create_model('dynamixer_cifar_xs', stem=stem)
    convs = [m for m in model.stem.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == num_convs and convs[0].stride == (first_stride, first_stride)
    assert all(c.kernel_size == (3, 3) for c in convs)
    x = torch.randn(2, 3, 34, 35)  # edge pixels beyond whole patches are dropped, as by the patch stem
    assert model.stem(x).shape == patch.stem(x).shape == (2, 8, 8, 96)
    with pytest.raises(ValueError, match="stem must be 'patch'"):
        timm.create_model('dynamixer_cifar_xs', stem='conv_overlap')


# ---------------------------------------------------------------- a timm backbone in full (timm's own suite: test_timm_suite.py)

SHIPPED = 'dynamixer_cifar_xs.cifar10_1h'


def fx_trace(model: torch.nn.Module) -> torch.fx.GraphModule:
    """``model`` symbolically traced as timm traces it: its notrace modules and functions kept whole."""
    from timm.models import get_notrace_functions, get_notrace_modules
    leaves = tuple(get_notrace_modules())

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: torch.nn.Module, name: str) -> bool:
            return isinstance(m, leaves) or super().is_leaf_module(m, name)

    return torch.fx.GraphModule(model, Tracer(autowrap_functions=tuple(get_notrace_functions())).trace(model))


@pytest.mark.parametrize('name', list(dynamixer.MODEL_ARGS))
def test_every_variant_describes_its_features_to_timm(name):
    """features_only with default arguments gives every stage; the NHWC format, the channel axis and the cfg's
    pool_size say where the channels and the grid are; device and dtype reach every tensor."""
    features = timm.create_model(name, features_only=True, device='meta', dtype=torch.bfloat16)
    stages = len(dynamixer.MODEL_ARGS[name]['depths'])
    assert features.feature_info.out_indices == tuple(range(stages))
    size = features.pretrained_cfg['input_size']
    x = torch.empty(1, *size, device='meta', dtype=torch.bfloat16)
    info = features.feature_info
    assert [tuple(o.shape) for o in features(x)] == [
        (1, c, size[1] // r, size[2] // r) for c, r in zip(info.channels(), info.reduction())]
    model = timm.create_model(name, device='meta', dtype=torch.bfloat16)
    assert {(t.device.type, t.dtype) for t in model.state_dict().values() if t.is_floating_point()} == {
        ('meta', torch.bfloat16)}
    feats = model.forward_features(x)
    assert model.output_fmt == 'NHWC' and feats.shape[model.feature_dim] == model.num_features
    assert tuple(feats.shape[1:3]) == model.pretrained_cfg['pool_size']
    model.reset_classifier(7)  # a new head where the model is, in its precision and mode
    assert (model.head.weight.device.type, model.head.weight.dtype, model.head.training) == (
        'meta', torch.bfloat16, model.training)


def test_feature_hooks_give_the_getters_features_channels_last():
    torch.manual_seed(0)
    getter = timm.create_model('dynamixer_cifar_xs', features_only=True).eval()
    torch.manual_seed(0)
    hooks = timm.create_model('dynamixer_cifar_xs', features_only=True, feature_cls='hook').eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, got = getter(x), hooks(x)
    assert hooks.output_fmt == 'NHWC' and len(got) == len(expected) == 2
    for a, b in zip(got, expected):
        assert torch.allclose(a.permute(0, 3, 1, 2), b, atol=1e-6)


def test_shipped_weights_adapt_to_one_channel_and_five_classes_and_train():
    from safetensors.torch import load_file
    model = timm.create_model(SHIPPED, pretrained=True, in_chans=1, num_classes=5)
    stored = load_file(model.pretrained_cfg['file'])
    # timm's adapt_input_conv: the colour channels summed (in fp32, stored back in the file's fp16)
    first = stored['stem.convs.0.weight']
    assert torch.equal(model.stem.convs[0].weight.detach(), first.float().sum(1, keepdim=True).half().float())
    kept = {k: v for k, v in model.state_dict().items() if k in stored and k != 'stem.convs.0.weight'}
    assert len(kept) > 50 and all(torch.equal(v, stored[k].to(v.dtype)) for k, v in kept.items() if
                                  not k.startswith('head.'))
    assert model.head.weight.shape == (5, 192)
    x, y = torch.randn(8, 1, 32, 32), torch.arange(8) % 5
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(model.train()(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    headless = timm.create_model(SHIPPED, pretrained=True, in_chans=1, num_classes=0).eval()
    assert headless(x[:2]).shape == (2, 192)
    features = timm.create_model(SHIPPED, pretrained=True, features_only=True).eval()
    assert [o.shape[1] for o in features(torch.randn(1, 3, 32, 32))] == [96, 192]


def test_load_errors_blame_the_weights_file_only_for_what_is_the_files(tmp_path):
    with pytest.raises(AssertionError, match='out of range'):  # features_only's own error, not the file's
        timm.create_model(SHIPPED, pretrained=True, features_only=True, out_indices=(0, 3))
    with pytest.raises(ValueError) as info:  # a good file, another architecture: the arguments
        timm.create_model(SHIPPED, pretrained=True, embed_dims=(64, 128))
    message = str(info.value)
    assert 'do not fit' in message and 'arguments' in message and 'damaged' not in message
    garbage = tmp_path / 'garbage.safetensors'
    garbage.write_bytes(b'\x00' * 64)
    with pytest.raises(ValueError, match='damaged') as info:
        timm.create_model(SHIPPED, pretrained=True, pretrained_cfg_overlay=dict(file=str(garbage)))
    assert str(garbage) in str(info.value)


def test_fx_and_torchscript_run_the_plain_modules_and_leave_the_eager_fast_path_on(monkeypatch):
    import copy
    import dynamixer.models.dynamixer as dm
    model = timm.create_model('dynamixer_cifar_xs').eval()
    plain = copy.deepcopy(model).set_fast_path(enabled=False)
    x = torch.randn(2, 3, 32, 32)
    graph = fx_trace(model)
    layers = [n.target for n in graph.graph.nodes if n.op == 'call_module']
    assert 'stages.0.blocks.0.norm1' in layers and 'stages.0.blocks.0.mlp.fc1' in layers  # traced as modules
    assert 'stages.0.blocks.0.token_mixer' in layers  # a leaf: lines or windows are decided at run time
    fast_functions = [n.target for n in graph.graph.nodes if n.op == 'call_function'
                      and getattr(n.target, '__module__', '') == 'dynamixer.models.fused']
    assert not fast_functions
    scripted = torch.jit.script(model)
    assert 'mkldnn' not in str(scripted.inlined_graph)
    calls = []
    real = dm.fuse_branches
    monkeypatch.setattr(dm, 'fuse_branches', lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        expected = plain(x)
        assert (scripted(x) - expected).abs().max() <= 1e-5
        assert not calls
        # the graph's token mixers are the model's own modules, with its setting
        assert (graph(x) - expected).abs().max() <= 1e-5
        calls.clear()
        assert (model(x) - expected).abs().max() <= 1e-5
    assert calls and model.fast_path.enabled  # the eager model still takes its kernels


def test_fx_backward_of_vip_pyramid_t_at_its_size():
    """timm's FX backward test skips vip_pyramid_t (its fixed 256 px input is above that test's limit)."""
    model = timm.create_model('vip_pyramid_t', num_classes=42).train()
    graph = fx_trace(model)
    out = graph(torch.randn(2, 3, 256, 256))
    out.mean().backward()
    assert out.shape == (2, 42) and all(p.grad is not None for p in graph.parameters())


@pytest.mark.parametrize('name', list(dynamixer.MODEL_ARGS))
def test_torch_export_gives_the_eager_outputs(name):
    model = timm.create_model(name).eval()
    x = torch.randn(1, *model.pretrained_cfg['input_size'])
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        assert (program.module()(x) - model(x)).abs().max() <= 1e-4


@pytest.mark.parametrize('name, kwargs, sizes', [
    # any size from 16 px: lines shorter and longer than the windows, padded or not
    ('dynamixer_cifar_t', dict(dynamic_img_size=True, depths=(1, 1, 1, 1)),
     [(32, 32), (16, 40), (50, 33), (96, 64)]),
    # sides that are multiples of its deepest stride (as the segmenter pads them)
    ('dynamixer_pyramid_t', dict(depths=(1, 1, 1, 1)), [(64, 96), (256, 256), (96, 64), (480, 352)]),
])
def test_torch_export_with_dynamic_height_and_width(name, kwargs, sizes):
    from torch.export import Dim
    model = timm.create_model(name, **kwargs).eval()
    h, w = sizes[0]
    if name == 'dynamixer_pyramid_t':
        height, width = 32 * Dim('h', min=2, max=32), 32 * Dim('w', min=2, max=32)
    else:
        height, width = Dim('h', min=16, max=512), Dim('w', min=16, max=512)
    program = torch.export.export(model, (torch.randn(2, 3, h, w),),
                                  dynamic_shapes=({0: Dim('batch', min=1, max=64), 2: height, 3: width},))
    for size in sizes:
        x = torch.randn(3, 3, *size)
        with torch.no_grad():
            assert (program.module()(x) - model(x)).abs().max() <= 1e-4, size


@pytest.mark.parametrize('size', [(32, 32), (35, 22)])
def test_strided_convs_run_as_linears_with_the_convs_values_and_gradients(size):
    """The patch stem and the downsampling are convs whose kernel is their stride; the fast path runs them as one
    linear over each patch's pixels (no convolution for inductor's layout optimisation to act on). Same values
    and gradients as the conv, edge pixels that fill no patch dropped alike; a hooked conv is called."""
    from dynamixer.models.dynamixer import patch_linear
    torch.manual_seed(0)
    for channels_last, stride, (cin, cout) in [(False, 4, (3, 24)), (True, 2, (24, 48)), (True, 1, (24, 32))]:
        conv = nn.Conv2d(cin, cout, stride, stride)
        x = torch.randn(2, cin, *size, requires_grad=True)
        expected = conv(x).permute(0, 2, 3, 1)
        grad = torch.randn_like(expected)
        expected_grads = torch.autograd.grad(expected, (x, conv.weight, conv.bias), grad)
        inp = x.permute(0, 2, 3, 1) if channels_last else x
        out = patch_linear(conv, inp, channels_last=channels_last)
        assert out.is_contiguous() and out.shape == expected.shape
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        for got, want in zip(torch.autograd.grad(out, (x, conv.weight, conv.bias), grad), expected_grads):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    model = timm.create_model('dynamixer_cifar_t', patch_size=4, depths=(1, 1), embed_dims=(24, 48), stem='patch',
                              stage_strides=(1, 2), num_segments=(4, 8), num_classes=10)
    ref = reference_model(model)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), ref(x), atol=1e-4, rtol=1e-4)
    calls = []
    for conv in (model.stem.proj, model.stages[1].downsample.proj):
        conv.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    model(x)
    assert calls == ['Conv2d', 'Conv2d']
