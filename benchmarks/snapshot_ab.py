"""The CIFAR recipe's training step, this checkout against an earlier commit of the package, in one process.

    python benchmarks/snapshot_ab.py --base f70c7af
    python benchmarks/snapshot_ab.py --base f70c7af --model dynamixer_cifar_t --model-args \
        '{"patch_size": 4, "depths": [2, 4], "embed_dims": [96, 192], "stage_strides": [1, 2], "num_segments": [4, 8]}'

The earlier commit is exported with ``git archive`` and imported as a second package (``dynamixer_base``, its C++
ops under their own namespace), so both run side by side with the same weights, steps interleaved. Each side
trains as ``dynamixer train --recipe cifar`` does: ``dynamixer_cifar_xs`` (drop path 0.05; ``--model`` and
``--model-args`` for another variant or shape), batch 128 of 32 x 32 images, bf16 autocast (``--precision``),
cross-entropy with 0.1 label smoothing, fused AdamW, and the side's own compiled model: the base's
``compile_model`` when it has one (what its ``train --compile`` used), this checkout's plain ``torch.compile``.
Data loading and augmentation are left out (the same code on both sides).
"""
import argparse
import copy
import importlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def export_base(commit: str, into: Path) -> Path:
    """``src/dynamixer`` of ``commit`` as the package ``dynamixer_base`` under ``into``."""
    archive = subprocess.run(['git', '-C', str(REPO), 'archive', commit, 'src/dynamixer'], check=True,
                             capture_output=True).stdout
    subprocess.run(['tar', '-x', '-C', str(into)], input=archive, check=True)
    package = into / 'dynamixer_base'
    (into / 'src' / 'dynamixer').rename(package)
    for path in package.rglob('*'):
        if path.suffix in ('.py', '.cpp'):
            text = path.read_text()
            text = re.sub(r'\b(from|import) dynamixer\b', r'\1 dynamixer_base', text)
            text = re.sub(r'\bdynamixer_cpu\b', 'dynamixer_cpu_base', text)  # its ops beside ours, not over them
            path.write_text(text)
    return into


def import_base(root: Path):
    # the base's variants must not replace ours in timm's registry: its builders are called directly
    import timm.models
    import timm.models._registry as registry
    keep = registry.register_model
    timm.models.register_model = registry.register_model = lambda fn: fn
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module('dynamixer_base.models')
    finally:
        timm.models.register_model = registry.register_model = keep


def make_step(model, compiler, precision, batch):
    model.train()
    compiled = compiler(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05, fused=True)
    x, y = batch
    autocast = dict(device_type='cpu', dtype=precision, enabled=precision != torch.float32)

    def step():
        with torch.autocast(**autocast):
            loss = F.cross_entropy(compiled(x), y, label_smoothing=0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--base', required=True, help='the earlier commit (any git revision)')
    parser.add_argument('--model', default='dynamixer_cifar_xs', help='variant, built by both packages')
    parser.add_argument('--model-args', default='{}', type=json.loads,
                        help='JSON constructor overrides for both sides, e.g. the official small shape')
    parser.add_argument('--precision', default='bf16', choices=['bf16', 'fp32'])
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--rounds', type=int, default=30, help='timed steps per side, interleaved')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    precision = dict(bf16=torch.bfloat16, fp32=torch.float32)[args.precision]

    import dynamixer.models as ours
    with tempfile.TemporaryDirectory() as tmp:
        base = import_base(export_base(args.base, Path(tmp)))
        if not (hasattr(ours.dynamixer, args.model) and hasattr(base.dynamixer, args.model)):
            parser.error(f'--model {args.model}: not a variant of both this checkout and {args.base}; '
                         f'choose one that both register, e.g. dynamixer_cifar_xs.')
        model_args = {'num_classes': 10, 'drop_path_rate': 0.05, **args.model_args}
        new = getattr(ours.dynamixer, args.model)(**model_args)
        old = getattr(base.dynamixer, args.model)(**model_args)
        old.load_state_dict(copy.deepcopy(new.state_dict()))
        batch = (torch.randn(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,)))
        base_compiler = getattr(base, 'compile_model', torch.compile)
        steps = {f'base {args.base}': make_step(old, base_compiler, precision, batch),
                 'this checkout': make_step(new, torch.compile, precision, batch)}
        for name, step in steps.items():
            for _ in range(args.warmup):
                step()
        times = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    first = next(iter(medians.values()))
    print(f'| side | ms a step (median of {args.rounds}) | min-max | speed-up |')
    print('|---|---|---|---|')
    for name, median in medians.items():
        print(f'| {name} | {1e3 * median:.1f} | {1e3 * min(times[name]):.1f}-{1e3 * max(times[name]):.1f} '
              f'| {first / median:.2f}x |')


if __name__ == '__main__':
    main()
