"""Fast-path settings A/B: the same weights under several ``FastPath`` settings and the plain reference, one
process, steps interleaved, each arm in its own precision and compile mode.

    python benchmarks/fast_path_ab.py --model dynamixer_s --mode train --batch-size 16 \
        --arm fast --arm 'fast:onednn_linears=False' --arm reference
    python benchmarks/fast_path_ab.py --model dynamixer_cifar_t --img-size 32 --batch-size 128 \
        --model-args '{"patch_size": 4, "depths": [2, 4], "embed_dims": [96, 192], "stage_strides": [1, 2], "num_segments": [4, 8], "num_classes": 10}' \
        --arm reference --arm fast --arm 'fast:recompute_mixing=False' --arm 'fast@bf16+compile'

An arm is ``fast`` or ``reference``, optionally ``:FIELD=VALUE,...`` (``FastPath`` fields, fast arms only) and
``@PRECISION[+compile|+torchcompile][+fused]`` (default: fp32 eager; ``compile``: ``dynamixer.models.compile_model``,
as ``dynamixer train --compile``; ``torchcompile``: a bare ``torch.compile``, inductor's layout optimisation as torch
decides; ``fused``: the fused AdamW of ``dynamixer train`` instead of torch's default). Speed-ups are against the
first arm.
"""
import argparse
import ast
import copy
import json
import statistics

import torch

from dynamixer.bench import StepRunner, build_models, time_interleaved


def parse_arm(text: str):
    """'fast:recompute_mixing=False@bf16+compile' -> ('fast', {'recompute_mixing': False}, 'bf16', 'compile', False)."""
    text, _, mode = text.partition('@')
    impl, _, fields = text.partition(':')
    if impl not in ('fast', 'reference'):
        raise SystemExit(f'an arm starts with fast or reference, got {impl!r}')
    options = {}
    for item in filter(None, fields.split(',')):
        key, _, value = item.partition('=')
        options[key.strip()] = ast.literal_eval(value.strip())
    precision, *flags = (mode or 'fp32').split('+')
    if set(flags) - {'compile', 'torchcompile', 'fused'} or {'compile', 'torchcompile'} <= set(flags):
        raise SystemExit(f'after @PRECISION come +compile or +torchcompile, and/or +fused, got {mode!r}')
    compiler = next((flag for flag in flags if flag in ('compile', 'torchcompile')), None)
    return impl, options, precision, compiler, 'fused' in flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='dynamixer_s', help='variant name')
    parser.add_argument('--model-args', default='{}', help='JSON constructor overrides')
    parser.add_argument('--mode', default='train', choices=['train', 'inference'])
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--iters', type=int, default=8)
    parser.add_argument('--arm', action='append', default=[], help='see above; repeat (default: reference, fast)')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    arms = args.arm or ['reference', 'fast']
    models = build_models(args.model, args.img_size, json.loads(args.model_args), torch.device('cpu'))
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    runners = {}
    for arm in arms:
        impl, options, precision, compiler, fused = parse_arm(arm)
        model = copy.deepcopy(models[impl])
        if options:
            model.set_fast_path(**options)
        runners[arm] = StepRunner(model, args.mode, x, precision, compile=compiler == 'compile', fused_optimizer=fused)
        if compiler == 'torchcompile':
            runners[arm].fn = torch.compile(model)
    times = time_interleaved(runners, args.warmup, args.iters)
    medians = {arm: statistics.median(t) for arm, t in times.items()}
    print(f'{args.model} {args.mode} b{args.batch_size} {args.img_size}px cpu, {args.threads} threads, '
          f'torch {torch.__version__}')
    for arm, t in times.items():
        print(f'{arm:40s} median {medians[arm] * 1000:7.1f} ms  {args.batch_size / medians[arm]:7.1f} img/s  '
              f'vs {arms[0]} {medians[arms[0]] / medians[arm]:.2f}x  runs: {" ".join(f"{s:.3f}" for s in t)}')


if __name__ == '__main__':
    main()
