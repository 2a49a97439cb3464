"""A held-out figure against wall-clock minutes for time-budgeted training runs (docs/cifar10.md's and
docs/segmentation.md's plots).

    python benchmarks/time_plot.py runs/cifar10_s0='seed 0' runs/cifar10_s1='seed 1' --output docs/images/cifar10_time.png
    python benchmarks/time_plot.py runs/camvid_s0 --metric val_miou --target 52 --ylim 0 80 \
        --title 'dynamixer_pyramid_t + FPN, dynamixer train --recipe camvid, 2-core CPU' --output docs/images/camvid_time.png

Each run folder's metrics.jsonl gives one curve (its ``wall_min`` is measured from the start of the run, so
data loading and compilation are on the x axis too); a star marks the last epoch's TTA accuracy where the run
measured it (``--tta flip`` or ``flip-shift``). Epochs without a validation (``--val-every``) are skipped.
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from dynamixer.io import atomic_write  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('runs', nargs='+', help='run folders (OUTPUT of dynamixer train), each optionally '
                                                'followed by =LABEL for its legend entry')
    parser.add_argument('--output', default='docs/images/cifar10_time.png', help='PNG to write')
    parser.add_argument('--metric', default='val_top1', help='record key to plot (val_top1, val_miou, ...)')
    parser.add_argument('--target', type=float, default=85., help='line to draw at this value (%%)')
    parser.add_argument('--ylim', type=float, nargs=2, default=(40., 100.), help='y-axis range (%%)')
    parser.add_argument('--title', default='dynamixer_cifar_xs, dynamixer train --recipe cifar, 2-core CPU')
    parser.add_argument('--budget', type=float, default=60., help='time budget line to draw (minutes)')
    args = parser.parse_args()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    metric = args.metric
    for spec in args.runs:
        run, _, label = spec.partition('=')
        rows = [json.loads(line) for line in (Path(run) / 'metrics.jsonl').read_text().splitlines()]
        rows = [r for r in rows if metric in r]
        settings = (Path(run) / 'args.yaml').read_text()
        seed = next((line.split(':')[1].strip() for line in settings.splitlines() if line.startswith('seed:')), '?')
        tta, views = rows[-1].get(f'{metric}_tta'), rows[-1].get('tta', 'flip')  # runs before --tta: flip
        line, = ax.plot([r['wall_min'] for r in rows], [r[metric] for r in rows], marker='.',
                        label=f'{label or "seed " + seed}: {rows[-1][metric]:.2f}%'
                              + (f' ({tta:.2f}% {views} TTA)' if tta is not None else '')
                              + f' after {rows[-1]["wall_min"]:.1f} min')
        if tta is not None:  # the recipe's last validation with TTA, inside the budget
            ax.plot([rows[-1]['wall_min']], [tta], marker='*', ms=10, color=line.get_color(), ls='none')
    ax.axhline(args.target, color='grey', ls='--', lw=0.8)
    ax.axvline(args.budget, color='grey', ls=':', lw=0.8)
    ax.set_xlabel('wall-clock minutes (data loading and compilation included)')
    ax.set_ylabel(f'held-out {metric.replace("val_", "")} (%)')
    ax.set_ylim(*args.ylim)
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend(loc='lower right')
    fig.tight_layout()
    atomic_write(Path(args.output), lambda tmp: fig.savefig(tmp, format='png', dpi=110))
    print(f'wrote {args.output}')


if __name__ == '__main__':
    main()
