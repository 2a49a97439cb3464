"""The CamVid peers table of docs/segmentation.md, from committed run records.

Each peer is a group of runs named ``<peer>_s<seed>`` in one folder (run folders of ``dynamixer train``, or their
committed records: ``args.yaml`` and ``metrics.jsonl`` are all it reads). For every peer it gives the parameters and
multiply-adds of the segmentation model at 360 x 480 (sliding windows where the peer validated so), its training and
inference images/s measured here with the peers' steps interleaved (the runs' own img/s depend on what else ran),
the epochs each seed got in the budget, and the last epoch's val mIoU and pixel accuracy over the seeds.

    python benchmarks/seg_peers.py benchmarks/results/camvid_peers15_intel --throughput --output table.json
    python benchmarks/seg_peers.py runs/peers15 --order dynamixer_pyramid_t vip_pyramid_t resnet10t
"""
import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import yaml

CAMVID_CLASSES = 11
RUN_NAME = re.compile(r'^(?P<peer>.+)_s(?P<seed>\d+)$')


def read_runs(folder: Path) -> Dict[str, List[Dict[str, Any]]]:
    """Runs grouped by peer, each with its settings and the last epoch's record (runs without a validated
    last epoch are left out with a warning)."""
    peers: Dict[str, List[Dict[str, Any]]] = {}
    for run in sorted(p for p in folder.iterdir() if p.is_dir()):
        match = RUN_NAME.match(run.name)
        if not match or not (run / 'metrics.jsonl').is_file():
            continue
        rows = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines() if line.strip()]
        args = yaml.safe_load((run / 'args.yaml').read_text())
        if not rows or 'val_miou' not in rows[-1] or rows[-1]['epoch'] != args['epochs']:
            print(f'warning: {run} has not finished (no validated last epoch); left out', file=sys.stderr)
            continue
        peers.setdefault(match['peer'], []).append(dict(seed=int(match['seed']), args=args, last=rows[-1]))
    return peers


def build(args: Dict[str, Any]) -> nn.Module:
    """The run's segmentation model with fresh weights (what dynamixer train built)."""
    from dynamixer.models.segmentation import Segmenter
    return Segmenter(args['model'], num_classes=CAMVID_CLASSES, decoder_channels=args['decoder_channels'],
                     backbone_args=dict(drop_path_rate=args['drop_path'], **(args.get('model_kwargs') or {})))


class WholeImage(nn.Module):
    """Inference as the run validated: the whole image, or sliding windows of the training crop."""

    def __init__(self, model: nn.Module, slide: Optional[List[int]]):
        super().__init__()
        self.model, self.slide = model, tuple(slide) if slide else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from dynamixer.tasks.segmentation import segment
        return segment(self.model, x, slide=self.slide)


def throughput(peers: Dict[str, List[Dict[str, Any]]], size: List[int], train_batch: int, infer_batch: int,
               warmup: int, iters: int) -> Dict[str, Dict[str, float]]:
    """Training images/s (the recipe's crops and batch, bf16 autocast) and inference images/s (whole images of
    ``size``, as validated), every peer's steps interleaved in this process."""
    from dynamixer.bench import StepRunner, time_interleaved
    speeds: Dict[str, Dict[str, float]] = {name: {} for name in peers}
    for mode in ('train', 'inference'):
        runners = {}
        for name, runs in peers.items():
            args = runs[0]['args']
            torch.manual_seed(0)
            model = build(args)
            if mode == 'train':
                x = torch.randn(train_batch, 3, *args['crop_size'])
                runners[name] = StepRunner(model, mode, x, 'bf16', compile=False, fused_optimizer=True)
            else:
                x = torch.randn(infer_batch, 3, *size)
                runners[name] = StepRunner(WholeImage(model, args['crop_size'] if args['slide'] else None),
                                           mode, x, 'bf16', compile=False)
            runners[name].prepare_state()
        print(f'timing {mode}: {len(runners)} peers, {warmup} warm-up and {iters} timed steps each, interleaved',
              file=sys.stderr)
        batch = train_batch if mode == 'train' else infer_batch
        for name, times in time_interleaved(runners, warmup, iters, label=mode).items():
            speeds[name][mode] = batch / statistics.median(times)
    return speeds


def summarise(peers: Dict[str, List[Dict[str, Any]]], size: List[int],
              speeds: Optional[Dict[str, Dict[str, float]]]) -> List[Dict[str, Any]]:
    from dynamixer.bench import count_macs
    table = []
    for name, runs in peers.items():
        args = runs[0]['args']
        model = build(args)
        slide = args['crop_size'] if args['slide'] else None
        miou = [r['last']['val_miou'] for r in runs]
        table.append(dict(
            peer=name, model=args['model'], model_kwargs=args.get('model_kwargs'), slide=bool(slide),
            params_m=sum(p.numel() for p in model.parameters()) / 1e6,
            gmacs=count_macs(WholeImage(model, slide), (3, *size)) / 1e9,
            seeds=[r['seed'] for r in runs], epochs=[r['last']['epoch'] for r in runs],
            minutes=[r['last'].get('wall_min') for r in runs], time_budget=args.get('time_budget'),
            miou=miou, miou_mean=statistics.mean(miou), miou_min=min(miou), miou_max=max(miou),
            pixel_acc_mean=statistics.mean(r['last']['val_pixel_acc'] for r in runs),
            iou_mean={c: statistics.mean(r['last']['val_iou'][c] for r in runs) for c in runs[0]['last']['val_iou']},
            **({f'{mode}_img_s': v for mode, v in speeds[name].items()} if speeds else {})))
    return table


def markdown(table: List[Dict[str, Any]], size: List[int]) -> str:
    speed = 'train_img_s' in table[0]
    head = (['peer', 'params', f'GMACs at {size[0]}x{size[1]}']
            + (['train img/s', 'inference img/s'] if speed else [])
            + ['epochs (each seed)', 'val mIoU, mean (min-max)', 'pixel acc'])
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for row in table:
        name = f"`{row['model']}`" + (' window 8' if (row['model_kwargs'] or {}).get('window_size') == 8 else '')
        name += ' (slide)' if row['slide'] else ''
        cells = [name, f"{row['params_m']:.1f}M", f"{row['gmacs']:.1f}"]
        if speed:
            cells += [f"{row['train_img_s']:.1f}", f"{row['inference_img_s']:.1f}"]
        cells += [' / '.join(str(e) for e in row['epochs']),
                  f"**{row['miou_mean']:.2f}** ({row['miou_min']:.2f}-{row['miou_max']:.2f})",
                  f"{row['pixel_acc_mean']:.2f}"]
        lines.append('| ' + ' | '.join(cells) + ' |')
    classes = list(table[0]['iou_mean'])
    lines += ['', '| peer | ' + ' | '.join(classes) + ' |', '|---|' + '---|' * len(classes)]
    for row in table:
        lines.append(f"| {row['peer']} | " + ' | '.join(f"{row['iou_mean'][c]:.1f}" for c in classes) + ' |')
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('folder', type=Path, help='folder of runs or records named <peer>_s<seed>')
    parser.add_argument('--order', nargs='+', default=None, help='peers in this order (default: by name)')
    parser.add_argument('--size', type=int, nargs=2, default=[360, 480], metavar=('H', 'W'),
                        help='input size of the multiply-adds and the inference timing')
    parser.add_argument('--throughput', action='store_true', help='also time the peers here (a quiet machine!)')
    parser.add_argument('--train-batch', type=int, default=8)
    parser.add_argument('--infer-batch', type=int, default=4)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--iters', type=int, default=6)
    parser.add_argument('--output', type=Path, default=None, help='also write the table as JSON here')
    args = parser.parse_args(argv)
    import dynamixer  # noqa: F401  registers the backbones
    peers = read_runs(args.folder)
    if not peers:
        parser.error(f'no finished runs named <peer>_s<seed> in {args.folder}')
    if args.order:
        missing = [p for p in args.order if p not in peers]
        if missing:
            parser.error(f'no finished runs of {", ".join(missing)} in {args.folder} (found {", ".join(peers)})')
        peers = {p: peers[p] for p in args.order}
    speeds = (throughput(peers, args.size, args.train_batch, args.infer_batch, args.warmup, args.iters)
              if args.throughput else None)
    table = summarise(peers, args.size, speeds)
    if args.output:
        from dynamixer.bench import machine_info
        record = dict(machine=machine_info(torch.device('cpu')), size=args.size, train_batch=args.train_batch,
                      infer_batch=args.infer_batch, precision='bf16 autocast', peers=table)
        args.output.write_text(json.dumps(record, indent=1) + '\n')
    print(markdown(table, args.size))
    return 0


if __name__ == '__main__':
    sys.exit(main())
