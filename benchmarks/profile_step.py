"""Where one step's time goes, fast vs reference: torch.profiler's top operators by self device time.

    python benchmarks/profile_step.py --device cuda --precision bf16 --mode train --batch-size 64
    python benchmarks/profile_step.py --task segmentation --model dynamixer_pyramid_t --img-size 360 480 --batch-size 8
"""
import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

from dynamixer.bench import StepRunner, build_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='dynamixer_s', help='variant name')
    parser.add_argument('--model-args', default='{}', help='JSON constructor overrides')
    parser.add_argument('--threads', type=int, default=None, help='CPU threads (default: torch\'s choice)')
    parser.add_argument('--device', default='cpu', help='cpu or cuda[:N]')
    parser.add_argument('--precision', default='fp32', choices=['fp32', 'bf16', 'fp16'],
                        help='fp32, or bf16 / fp16 autocast')
    parser.add_argument('--mode', default='train', choices=['train', 'inference'],
                        help='train: forward + backward + AdamW step')
    parser.add_argument('--batch-size', type=int, default=16, help='images per step')
    parser.add_argument('--img-size', type=int, nargs='+', default=[224], metavar='SIZE',
                        help='input size H [W]')
    parser.add_argument('--task', default='classification', choices=['classification', 'segmentation'],
                        help='segmentation: the Segmenter dynamixer train builds on --model (as dynamixer bench)')
    parser.add_argument('--steps', type=int, default=3, help='profiled steps (after 3 untimed ones)')
    parser.add_argument('--top', type=int, default=25, help='operators listed per implementation')
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    H, W = args.img_size if len(args.img_size) == 2 else args.img_size * 2
    models = build_models(args.model, H if H == W and args.task == 'classification' else (H, W),
                          json.loads(args.model_args), device, task=args.task)
    x = torch.randn(args.batch_size, 3, H, W, device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    sort = 'self_cuda_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    for impl, model in models.items():
        runner = StepRunner(model, args.mode, x, args.precision, compile=False)
        for _ in range(3):
            runner.step()
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                runner.step()
        print(f'\n### {impl}: {args.model} {args.mode} b{args.batch_size} {args.precision} {args.device}, '
              f'{args.steps} steps')
        print(prof.key_averages().table(sort_by=sort, row_limit=args.top, max_name_column_width=60))


if __name__ == '__main__':
    main()
