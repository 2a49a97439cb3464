"""Stem A/B for the recipe's model: dynamixer_cifar_xs with each stem, training steps in the recipe's mode (bf16
autocast + torch.compile), one process, steps interleaved (docs/cifar10.md, "The variant").

    python benchmarks/stem_ab.py --batch-size 128 --threads 2
"""
import argparse
import statistics

import timm
import torch

import dynamixer.models  # noqa: F401  registers the variants
from dynamixer.bench import StepRunner, time_interleaved
from dynamixer.models.dynamixer import STEMS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--iters', type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32)
    models = {stem: timm.create_model('dynamixer_cifar_xs', num_classes=10, stem=stem) for stem in STEMS}
    runners = {stem: StepRunner(m, 'train', x, 'bf16', compile=True) for stem, m in models.items()}
    times = time_interleaved(runners, args.warmup, args.iters)
    print('| stem | params | ms a step | images/s |\n|---|---|---|---|')
    for stem, t in times.items():
        median = statistics.median(t)
        params = sum(p.numel() for p in models[stem].parameters())
        print(f'| `{stem}` | {params:,} | {median * 1000:.1f} | {args.batch_size / median:.0f} |')


if __name__ == '__main__':
    main()
