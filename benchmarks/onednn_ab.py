"""The fast path with and without its oneDNN linears, against the reference: one process, interleaved.

    python benchmarks/onednn_ab.py --mode train --batch-size 16 --iters 8
"""
import argparse
import copy

import torch

from dynamixer.bench import _Runner, build_models, time_interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='dynamixer_s', help='variant name')
    parser.add_argument('--mode', default='train', choices=['train', 'inference'])
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--iters', type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = build_models(args.model, args.img_size, {}, torch.device('cpu'))
    without = copy.deepcopy(models['fast']).set_fast_path(onednn_linears=False)
    models = {'fast': models['fast'], 'fast, no oneDNN': without, 'reference': models['reference']}
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    runners = {name: _Runner(m, args.mode, x, 'fp32', compile=False) for name, m in models.items()}
    times = time_interleaved(runners, args.warmup, args.iters)
    medians = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    print(f'{args.model} {args.mode} b{args.batch_size} {args.img_size}px fp32 cpu, {args.threads} threads, '
          f'torch {torch.__version__}')
    for name, t in times.items():
        print(f'{name:16s} median {medians[name]:.3f} s  vs reference {medians["reference"] / medians[name]:.2f}x'
              f'  runs: {" ".join(f"{s:.2f}" for s in t)}')


if __name__ == '__main__':
    main()
