"""The Triton mixing kernel (CUDA fast path) equals the torch path. Here it runs in Triton's CPU interpreter, in
a subprocess (``TRITON_INTERPRET=1`` must be set before triton is imported); tests/test_cuda.py runs it on a GPU.
The interpreter cannot do bf16 dots, so these checks are fp32 (the GPU tests cover bf16)."""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip('triton')

CHECK = textwrap.dedent('''
    import timm, torch
    from dynamixer.models import fused, triton_mix
    from test_reference import TINY, _compare
    assert triton_mix._INTERPRET
    torch.manual_seed(0)
    calls, backward_calls = [], []
    kernel, backward_kernel = triton_mix.mixed_tokens, triton_mix.mixed_tokens_backward
    triton_mix.mixed_tokens = lambda *args: calls.append(args[2]) or kernel(*args)
    triton_mix.mixed_tokens_backward = lambda *args: backward_calls.append(args[3]) or backward_kernel(*args)

    # the kernels alone (forward; backward for mix and x, for x only): square (both branches at once) and
    # non-square maps, lines shorter than a 16-wide block, segment widths not a power of two, a strided input
    for B, H, W, C, S in [(2, 8, 8, 16, 2), (1, 6, 10, 24, 4), (2, 20, 4, 12, 2)]:
        x = torch.randn(B, W, H, C).transpose(1, 2)
        for branches in ([(False, True)] if H == W else []) + [(False,), (True,)]:
            mix = torch.stack([torch.randn(B, W if col else H, S, H if col else W, H if col else W).softmax(-1)
                               for col in branches])
            grad = torch.randn(len(branches), mix[0].numel() // S // mix.shape[-1], C)
            weight = torch.randn(len(branches), C, C) / C ** 0.5
            results = []
            for enabled in (True, False):  # the Triton kernels, then torch's ops
                kernels = (enabled, False)
                results.append((fused._mixed_tokens(mix, x, branches, kernels),
                                *fused._mix_project_backward(grad, mix, x, weight, branches, True, True, False,
                                                             None, kernels)[:2],
                                fused._mix_project_backward(grad, mix, x, weight, branches, False, True, False,
                                                            None, kernels)[1]))
            for out, expected in zip(*results):
                assert out.shape == expected.shape, (out.shape, expected.shape)
                assert (out - expected).abs().max().item() < 1e-4 * max(1, expected.abs().max().item())
    assert len(calls) == 7 and len(backward_calls) == 14

    # a dispatch mode watching (FLOP counting) sees torch's matmul, not an opaque kernel
    from torch.utils.flop_counter import FlopCounterMode
    model = timm.create_model('dynamixer_cifar_t', **TINY).eval()
    flops = []
    for enabled in (True, False):
        model.set_fast_path(triton=enabled)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.randn(1, 3, 32, 32))
        flops.append(counter.get_total_flops())
    assert flops[0] == flops[1] > 0 and len(calls) == 7

    # the whole fast path through the kernel against the reference: outputs 1e-5, gradients 1e-4
    calls.clear(), backward_calls.clear()
    for kwargs, size in [(dict(), (32, 32)), (dict(img_size=(40, 24)), (40, 24))]:
        model = timm.create_model('dynamixer_cifar_t', **{**TINY, **kwargs})
        _compare(model, torch.randn(2, 3, *size))
    assert len(calls) > 8 and len(backward_calls) > 4  # forward, backward, non-square models' separate branches

    # torch.compile sees torch ops, and the kernel's checks must not break its graph (fullgraph raises on a
    # break), forward and backward, in fp32 and under autocast
    calls.clear(), backward_calls.clear()
    model = timm.create_model('dynamixer_cifar_t', **TINY)
    compiled = torch.compile(model, backend='eager', fullgraph=True)
    for enabled in (False, True):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=enabled):
            compiled(torch.randn(2, 3, 32, 32)).float().sum().backward()
    assert not calls and not backward_calls
    print('ok')
''')


def test_triton_kernel_in_interpreter_matches_torch_path_and_reference():
    env = dict(os.environ, TRITON_INTERPRET='1')
    tests_dir = os.path.dirname(__file__)
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [tests_dir, env.get('PYTHONPATH')]))
    out = subprocess.run([sys.executable, '-c', CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith('ok'), out.stderr[-3000:]
