"""Run a grid of DynaMixer variants with the same data, budget and seeds, and tabulate what they reach.

A grid is a YAML file (``--grid``) and/or flags. It names one model and its base knobs, the training
settings every run shares, the seeds, and the variants: named overrides of the base
(``variants: {static: {generation: static}}``) and/or axes varied one at a time from the base
(``axes: {num_segments: [1, 2, 4, 8]}`` gives the variants ``S=1``, ``S=2``, ...; the base's own value is the
base run). Knobs are the model's constructor arguments (``S`` and ``d`` are short for ``num_segments`` and
``reduced_dims``). A variant may list its own ``seeds``, e.g. more seeds for the closest competitors, or
``seeds: []``: measured by ``--throughput`` but never trained (e.g. ``fast_path: false``, to compare plain
modules' speed). A variant
that names its own ``model`` is a peer: any timm model (``mixer_s16_224``, ``resmlp_12_224``, ...) built from
the variant's own arguments only (``img_size``, ``patch_size``, widths), trained under the same settings.

Every run gets the same budget: ``epochs``, or a wall-clock ``time_budget`` in minutes (``recipe: cifar`` sets
60; a run then plans its own epochs and is finished when it has run the epochs it planned).

Every (variant, seed) is an ordinary ``dynamixer train`` run in ``OUTPUT/runs/<variant>/seed<k>`` (its own
metrics.jsonl and model/, so it can be inspected, visualised or resumed), run seed by seed: every variant's first
seed, then every variant's second. Finished runs are reused, unfinished
ones resumed. The results go to ``OUTPUT/results.md``, ``results.csv`` (one row per variant: params, GMACs,
train img/s, best and final val top-1 with mean, std and min-max over seeds), ``runs.csv`` (one row per run)
and ``accuracy.png`` (final val top-1 against params, GMACs and controlled speed). ``--throughput`` measures
every variant's training and inference speed side by side in one process; the measurement is kept in
``throughput.json`` and reused by later tabulations. A grid may list ``claims`` to judge
against the noise floor of its runs (``judge_claims``); their verdicts close ``results.md``.

``grid.json``, ``runs.csv`` and ``throughput.json`` together are the record of a grid's results: small enough to
commit beside the docs they back. ``--records DIR`` tabulates from such a record the runs whose folders are not in
OUTPUT (another machine's runs, or a study whose run folders are gone), so that a documented table can be
regenerated, and extended with new runs, without training its runs again.

Example grid::

    model: dynamixer_cifar_t
    base: {patch_size: 4, embed_dims: 64, depths: [4], stage_strides: [1], num_segments: 8, reduced_dims: 2}
    train: {data: cifar10, val_split: 0.1, epochs: 3, batch_size: 128, lr: 0.002}
    seeds: [0]
    axes: {generation: [dynamic, static, dense], S: [1, 2, 4, 8]}
    variants: {shared: {share_row_col: true, seeds: [0, 1]}}

A real-budget grid with peers (docs/ablations.md)::

    model: dynamixer_cifar_xs
    train: {recipe: cifar, time_budget: 15, data: ../shared/data/cifar10, val_split: 0.1}
    seeds: [0, 1]
    axes: {generation: [static, dense]}
    variants:
      vip: {token_mixer: permute}
      mixer: {model: mixer_s16_224, img_size: 32, patch_size: 4, embed_dim: 160, num_blocks: 9}
    claims:
      - {claim: "content-dependent generation beats static matrices", better: base, worse: generation=static}
      - {claim: "DynaMixer trains 14-25% slower than ViP", slower: base, than: vip, by: [0.14, 0.25]}
"""
import argparse
import csv
import inspect
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ['load_grid', 'expand_grid', 'run_grid', 'is_finished', 'train_command', 'KNOB_ALIASES']

KNOB_ALIASES = {'S': 'num_segments', 'd': 'reduced_dims', 'segments': 'num_segments', 'reduced_dim': 'reduced_dims'}
SHORT_NAMES = {'num_segments': 'S', 'reduced_dims': 'd'}
GRID_KEYS = ('model', 'base', 'train', 'seeds', 'variants', 'axes', 'base_name', 'claims')
# The forms a claim can take in a grid's ``claims:`` list, besides its ``claim:`` text (``judge_claims``).
CLAIM_FORMS = (('better', 'worse'), ('loses_little', 'against'), ('slower', 'than', 'by'))
RUN_CONFIG = 'ablate_run.json'
RUN_FIELDS = ['variant', 'seed', 'status', 'best_top1', 'final_top1', 'final_top1_tta', 'final_top5', 'final_val_loss',
              'img_per_sec', 'epochs', 'wall_min', 'seconds', 'num_classes', 'val_images', 'run_dir']


# ----------------------------------------------------------------------------------------------- the grid

def _model_knobs() -> List[str]:
    from dynamixer.models import DynaMixer
    skip = ('self', 'num_classes', 'norm_layer', 'act_layer')  # layer classes cannot be written in a grid
    return [p for p in inspect.signature(DynaMixer.__init__).parameters if p not in skip]


def _model_defaults() -> Dict[str, Any]:
    from dynamixer.models import DynaMixer
    return {name: p.default for name, p in inspect.signature(DynaMixer.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _knob(name: str, where: str) -> str:
    knob = KNOB_ALIASES.get(name, name)
    known = _model_knobs()
    if knob not in known:
        import difflib
        close = difflib.get_close_matches(knob, known + list(KNOB_ALIASES), n=1)
        hint = f'did you mean {close[0]!r}? ' if close else ''
        raise ValueError(f'unknown knob {name!r} in {where}; {hint}knobs are the model\'s arguments: '
                         f'{", ".join(known)} (S and d for short).')
    return knob


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _parse_value(text: str) -> Any:
    """'4' -> 4, '[1,2]' -> [1, 2], 'true' -> True, 'static' -> 'static' (YAML scalars)."""
    import yaml
    return yaml.safe_load(text)


def _parse_assignments(items: Sequence[str], what: str) -> Dict[str, Any]:
    out = {}
    for item in items:
        if '=' not in item:
            raise ValueError(f'{what} takes KEY=VALUE, got {item!r}.')
        key, value = item.split('=', 1)
        out[key.strip()] = _parse_value(value)
    return out


def load_grid(path: Optional[str]) -> Dict[str, Any]:
    if path is None:
        return {}
    import yaml
    if not os.path.isfile(path):
        raise FileNotFoundError(f'grid file {path} does not exist.')
    try:
        with open(path) as f:
            grid = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ValueError(f'grid file {path} is not valid YAML: {str(e).splitlines()[0]}') from None
    if not isinstance(grid, dict):
        raise ValueError(f'grid file {path} must be a YAML mapping with keys {", ".join(GRID_KEYS)}.')
    unknown = [k for k in grid if k not in GRID_KEYS]
    if unknown:
        raise ValueError(f'grid file {path} has unknown key(s) {", ".join(map(repr, unknown))}; '
                         f'use {", ".join(GRID_KEYS)}.')
    return grid


def _variant_name(knob: str, value: Any) -> str:
    short = SHORT_NAMES.get(knob, knob)
    if isinstance(value, bool):
        return f'{short}={"on" if value else "off"}'
    if isinstance(value, (list, tuple)):
        value = ','.join(map(str, value))
    return f'{short}={value}'


def expand_grid(grid: Dict[str, Any]) -> Tuple[str, Dict[str, Any], List[Dict[str, Any]]]:
    """(model, base knobs, [{name, overrides, kwargs, seeds}]) with the base first; knobs checked."""
    model = grid.get('model')
    if not model:
        raise ValueError('the grid names no model; set model: (e.g. dynamixer_cifar_t) or pass --model.')
    from dynamixer.models import MODEL_ARGS
    if model not in MODEL_ARGS:
        raise KeyError(f'unknown model {model!r}; choose one of {", ".join(sorted(MODEL_ARGS))}.')
    base = {_knob(k, 'base'): _jsonable(v) for k, v in (grid.get('base') or {}).items()}
    seeds = grid.get('seeds', [0])
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    if not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f'seeds must be a list of integers, got {grid.get("seeds")!r}.')
    base_name = grid.get('base_name', 'base')
    resolved_base = {k: _jsonable(v) for k, v in {**_model_defaults(), **MODEL_ARGS[model], **base}.items()}
    variants: List[Dict[str, Any]] = [dict(name=base_name, overrides={}, kwargs=dict(base), seeds=list(seeds),
                                           model=model)]

    def add(name: str, overrides: Dict[str, Any], own_seeds: Optional[List[int]]) -> None:
        kwargs = dict(base, **overrides)
        effective = {k: v for k, v in overrides.items() if resolved_base.get(k) != v}
        target = next((v for v in variants if v['name'] == name), None)
        if not effective:  # the base itself
            target = variants[0]
        elif target is None:
            target = next((v for v in variants if dict(resolved_base, **v['overrides']) ==
                           dict(resolved_base, **effective)), None)
        if target is None:
            variants.append(dict(name=name, overrides=effective, kwargs=kwargs,
                                 seeds=list(seeds if own_seeds is None else own_seeds), model=model))
        elif own_seeds:
            target['seeds'] = sorted(set(target['seeds']) | set(own_seeds))

    for knob, values in (grid.get('axes') or {}).items():
        key = _knob(knob, 'axes')
        if not isinstance(values, list) or not values:
            raise ValueError(f'axis {knob!r} must list the values to try, got {values!r}.')
        for value in values:
            add(_variant_name(key, value), {key: _jsonable(value)}, None)
    for name, spec in (grid.get('variants') or {}).items():
        spec = dict(spec or {})
        own = spec.pop('seeds', None)
        if own is not None:
            own = [own] if isinstance(own, int) else list(own)
        if 'model' in spec:  # a peer: another model, from its own arguments only
            kwargs = {k: _jsonable(v) for k, v in spec.items() if k != 'model'}
            variants.append(dict(name=str(name), overrides={'model': spec['model'], **kwargs}, kwargs=kwargs,
                                 seeds=list(seeds if own is None else own), model=spec['model']))
            continue
        add(str(name), {_knob(k, f'variant {name!r}'): _jsonable(v) for k, v in spec.items()}, own)
    for v in variants:  # build each once on the meta device: bad values fail here, not after an hour
        _check_builds(v)
    return model, base, variants


def _check_builds(variant: Dict[str, Any]) -> None:
    import torch
    try:
        with torch.device('meta'):
            build_variant(variant)
    except (ValueError, TypeError, KeyError, AssertionError) as e:
        raise ValueError(f'variant {variant["name"]!r} does not build: {e}') from None


def build_variant(variant: Dict[str, Any], num_classes: Optional[int] = None) -> 'torch.nn.Module':
    """The variant's model as its runs train it (``num_classes`` of their data, where known)."""
    from dynamixer.catalog import create_any_model
    kwargs = dict(variant['kwargs'])
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
    return create_any_model(variant['model'], **kwargs)


def input_size(net: 'torch.nn.Module') -> Tuple[int, int, int]:
    from dynamixer.tasks.classification import model_img_size
    return (net.pretrained_cfg.get('input_size', (3,))[0], *model_img_size(net))


def count_params_macs(variant: Dict[str, Any], num_classes: Optional[int] = None) -> Tuple[int, float]:
    """Parameters and GMACs (batch 1, at the model's input size)."""
    from dynamixer.bench import count_macs
    net = build_variant(variant, num_classes)
    return sum(p.numel() for p in net.parameters()), count_macs(net, input_size(net)) / 1e9


# ----------------------------------------------------------------------------------------------- the runs

def read_metrics(run_dir: Path) -> List[Dict[str, Any]]:
    path = Path(run_dir) / 'metrics.jsonl'
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut short by an interrupted run
    return rows


def planned_epochs(run_dir: Path) -> Optional[int]:
    """The epochs a run is set to train (a time-budgeted run rewrites them in its args.yaml once it has planned)."""
    import yaml
    path = Path(run_dir) / 'args.yaml'
    if not path.is_file():
        return None
    try:
        return int((yaml.safe_load(path.read_text()) or {}).get('epochs'))
    except (yaml.YAMLError, TypeError, ValueError):
        return None


def is_finished(run_dir: Path, epochs: Optional[int] = None) -> bool:
    """A run is done when its metrics cover all epochs (None: the epochs the run planned for its time budget)
    and its model folder was written."""
    run_dir = Path(run_dir)
    if epochs is None:
        epochs = planned_epochs(run_dir)
        if epochs is None:
            return False
    rows = [r for r in read_metrics(run_dir) if 'val_top1' in r]
    done_epochs = {r.get('epoch') for r in rows}
    model = run_dir / 'model'
    return (len(done_epochs) >= epochs and (model / 'config.json').is_file()
            and any(model.glob('*.safetensors')))


def train_command(data: str, model: str, kwargs: Dict[str, Any], train: Dict[str, Any], seed: int,
                  run_dir: Path, resume: bool) -> List[str]:
    """The ``dynamixer train`` command line of one run."""
    cmd = [sys.executable, '-m', 'dynamixer.cli', 'train', '--data', str(data), '--model', model,
           '--seed', str(seed), '--output', str(run_dir), '--no-progress']  # progress bars would flood train.log
    for key, value in train.items():
        if key == 'data':
            continue
        flag = '--' + key.replace('_', '-')
        if isinstance(value, bool):
            if value:
                cmd.append(flag)
        elif isinstance(value, (list, tuple)):
            cmd += [flag, *map(str, value)]
        else:
            cmd += [flag, str(value)]
    if kwargs:  # parsed by train with ast.literal_eval, strings left as they are
        cmd += ['--model-kwargs', *(f'{k}={v if isinstance(v, str) else repr(v)}' for k, v in kwargs.items())]
    cmd.append('--resume' if resume else '--overwrite')  # a start that died before its first checkpoint
    return cmd


def _train(cmd: List[str], run_dir: Path, threads: int) -> int:
    """Run one training command, its output to RUN/train.log; the exit code."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / 'train.log', 'a') as log:
        log.write('$ ' + ' '.join(cmd) + '\n')
        log.flush()
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def _summarise_run(run_dir: Path) -> Dict[str, Any]:
    rows = [r for r in read_metrics(run_dir) if 'val_top1' in r]
    speeds = [r['img_per_sec'] for r in rows if r.get('img_per_sec')]
    if len(speeds) > 1:
        speeds = speeds[1:]  # the first epoch includes start-up
    config = Path(run_dir) / 'model' / 'config.json'
    num_classes = json.loads(config.read_text()).get('num_classes') if config.is_file() else None
    return dict(best_top1=max(r['val_top1'] for r in rows), final_top1=rows[-1]['val_top1'],
                final_top1_tta=rows[-1].get('val_top1_tta'),  # the recipe's last-epoch TTA, where it ran
                final_top5=rows[-1].get('val_top5'), final_val_loss=rows[-1].get('val_loss'),
                img_per_sec=statistics.mean(speeds) if speeds else float('nan'), epochs=len(rows),
                wall_min=rows[-1].get('wall_min'), num_classes=num_classes, val_images=rows[-1].get('val_images'))


def controlled_throughput(variants: List[Dict[str, Any]], num_classes: Optional[int] = None,
                          precision: str = 'fp32', compile: bool = False, batch_size: int = 128, warmup: int = 3,
                          iters: int = 10, log=print) -> Dict[str, Dict[str, float]]:
    """Training and inference images/s of every variant, measured in this process with the variants' steps
    interleaved (``bench.time_interleaved``), so that the machine's drift hits them all alike."""
    import torch
    import torch._dynamo
    from dynamixer.bench import StepRunner, time_interleaved
    speeds: Dict[str, Dict[str, float]] = {v['name']: {} for v in variants}
    # The variants of one model class compile the same forward: past dynamo's recompile limit (8 by default) the
    # later ones would silently run eager, so the limit covers every variant in both modes, with room to spare.
    limit = max(torch._dynamo.config.recompile_limit, 4 * len(variants) + 8)
    with torch._dynamo.config.patch(recompile_limit=limit):
        for mode in ('train', 'inference'):
            torch.manual_seed(0)
            runners = {}
            for v in variants:
                net = build_variant(v, num_classes)
                runners[v['name']] = StepRunner(net, mode, torch.randn(batch_size, *input_size(net)), precision,
                                                compile)
                runners[v['name']].prepare_state()
            log(f'throughput: {mode}, {len(runners)} models, batch {batch_size}, {precision}'
                f'{" compiled" if compile else " eager"}, {warmup} warm-up and {iters} timed steps each, interleaved')
            for name, times in time_interleaved(runners, warmup, iters, label=mode).items():
                speeds[name][mode] = batch_size / statistics.median(times)
    return speeds


def run_grid(grid: Dict[str, Any], output: str, jobs: int = 1, threads: int = 1, dry_run: bool = False,
             train_missing: bool = True, throughput: Optional[Dict[str, Any]] = None, records: Optional[str] = None,
             log=print) -> Dict[str, Any]:
    """Train every (variant, seed) not yet finished (``train_missing=False``: tabulate the finished ones only),
    measure the variants' throughput side by side if asked (``controlled_throughput``'s keyword arguments), then
    write the tables and the plot. ``records``: the folder of an earlier tabulation of this grid
    (``read_records``), whose runs stand in for the runs not finished in ``output``."""
    model, base, variants = expand_grid(grid)
    claims = check_claims(grid.get('claims'), variants)
    train = dict(grid.get('train') or {})
    data = train.get('data')
    if not data:
        raise ValueError('the grid names no data; set train: {data: ...} or pass --data.')
    epochs, minutes = run_budget(train)
    for key in ('seed', 'output', 'model', 'resume'):
        if key in train:
            raise ValueError(f'train: {key} is set by the ablation runner per run; remove it from the grid.')
    out = Path(output)
    # Round by round, every variant's k-th seed before any (k+1)-th: a grid filled over several sittings
    # compares all its variants early, on one seed, instead of some variants on all seeds.
    rounds = max(len(v['seeds']) for v in variants)
    runs = [(v, v['seeds'][k]) for k in range(rounds) for v in variants if k < len(v['seeds'])]
    budget = f'{minutes:g} minutes' if minutes else f'{epochs} epochs'
    log(f'{model}: {len(variants)} variants, {len(runs)} runs of {budget} -> {out}')
    if dry_run:
        for v, seed in runs:
            run_dir = out / 'runs' / _dirname(v['name']) / f'seed{seed}'
            log(' '.join(train_command(data, v['model'], v['kwargs'], train, seed, run_dir, False)))
        return dict(variants=variants, runs=[])
    recorded, recorded_speeds = read_records(records, grid_record(model, base, train, variants), log) \
        if records else ({}, None)
    out.mkdir(parents=True, exist_ok=True)

    def one(i_run: Tuple[int, Tuple[Dict[str, Any], int]]) -> Dict[str, Any]:
        i, (variant, seed) = i_run
        run_dir = out / 'runs' / _dirname(variant['name']) / f'seed{seed}'
        config = dict(model=variant['model'], kwargs=variant['kwargs'], train=train, seed=seed)
        tag = f'[{i + 1}/{len(runs)}] {variant["name"]} seed {seed}'
        config_path = run_dir / RUN_CONFIG
        if config_path.is_file() and json.loads(config_path.read_text()) != json.loads(json.dumps(config)):
            raise ValueError(f'{run_dir} holds a run with other settings than this grid asks for; '
                             f'remove it or choose another --output.')
        if is_finished(run_dir, epochs):
            result = dict(variant=variant['name'], seed=seed, run_dir=str(run_dir), status='reused',
                          **_summarise_run(run_dir))
            log(f'{tag}: reused (best top-1 {result["best_top1"]:.2f}, final {result["final_top1"]:.2f})')
            return result
        if (variant['name'], seed) in recorded:
            result = dict(recorded[variant['name'], seed], status='recorded')
            log(f'{tag}: recorded in {records} (final {result["final_top1"]:.2f})')
            return result
        if not train_missing:
            log(f'{tag}: not finished, left out')
            return dict(variant=variant['name'], seed=seed, run_dir=str(run_dir), status='missing')
        resume = (run_dir / 'checkpoint.pth').is_file()  # train's own checkpoint of the last finished epoch
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path.write_text(json.dumps(config, indent=1))
        start = time.time()
        code = _train(train_command(data, variant['model'], variant['kwargs'], train, seed, run_dir, resume),
                      run_dir, threads)
        took = time.time() - start
        if code != 0 or not is_finished(run_dir, epochs):
            log(f'{tag}: FAILED after {took:.0f} s (exit {code}); see {run_dir / "train.log"}')
            return dict(variant=variant['name'], seed=seed, run_dir=str(run_dir), status='failed')
        result = dict(variant=variant['name'], seed=seed, run_dir=str(run_dir),
                      status='resumed' if resume else 'trained', seconds=took, **_summarise_run(run_dir))
        log(f'{tag}: {result["status"]} in {took:.0f} s, best top-1 {result["best_top1"]:.2f}, '
            f'final {result["final_top1"]:.2f}, {result["img_per_sec"]:.0f} img/s')
        return result

    if jobs > 1:
        with ThreadPoolExecutor(jobs) as pool:
            results = list(pool.map(one, enumerate(runs)))
    else:
        results = [one(item) for item in enumerate(runs)]

    num_classes = next((r['num_classes'] for r in results if r.get('num_classes')), None)
    speeds, speed_note = measured_throughput(out, variants, num_classes, throughput, log, recorded_speeds)
    table = summarise(variants, results, num_classes, speeds)
    verdicts = judge_claims(claims, table)
    from dynamixer.io import write_text
    write_text(out / 'grid.json', json.dumps(grid_record(model, base, train, variants), indent=1) + '\n')
    write_results(out, model, base, train, table, [r for r in results if r['status'] != 'missing'], verdicts,
                  speed_note)
    failed = [r for r in results if r['status'] == 'failed']
    log(f'wrote {out / "results.md"}, {out / "results.csv"}, {out / "runs.csv"}, {out / "grid.json"}, {out / "accuracy.png"}'
        + (f'; {len(failed)} run(s) failed' if failed else ''))
    return dict(variants=variants, runs=results, table=table, claims=verdicts, failed=len(failed))


def grid_record(model: str, base: Dict[str, Any], train: Dict[str, Any],
                variants: List[Dict[str, Any]]) -> Dict[str, Any]:
    """What a grid's runs were trained under (``grid.json``): model, base knobs, training settings, and each
    variant's overrides."""
    return json.loads(json.dumps(dict(model=model, base=base, train=train,
                                      variants={v['name']: v['overrides'] for v in variants})))


def _record_value(key: str, text: str) -> Any:
    if text in ('', None):
        return None
    if key in ('seed', 'epochs', 'num_classes', 'val_images'):
        return int(float(text))
    if key in ('variant', 'status', 'run_dir'):
        return text
    return float(text)


def read_records(folder: str, expected: Dict[str, Any],
                 log=print) -> Tuple[Dict[Tuple[str, int], Dict[str, Any]], Optional[Path]]:
    """({(variant, seed): run summary} from ``FOLDER/runs.csv``, ``FOLDER/throughput.json`` or None): the runs of
    an earlier tabulation of the same grid. The record's ``grid.json`` must name the same model, base knobs and
    training settings; a variant whose overrides have changed since is left out of it."""
    folder = Path(folder)
    grid_path, runs_path = folder / 'grid.json', folder / 'runs.csv'
    if not (grid_path.is_file() and runs_path.is_file()):
        raise FileNotFoundError(f'--records {folder}: expected a folder with grid.json and runs.csv (written by '
                                f'dynamixer ablate); point it at an earlier --output.')
    saved = json.loads(grid_path.read_text())
    for key in ('model', 'base', 'train'):
        if saved.get(key) != expected[key]:
            raise ValueError(f'--records {folder} holds runs of another grid ({key}: {saved.get(key)!r}, this grid: '
                             f'{expected[key]!r}); records only stand in for runs of the same settings.')
    changed = sorted(name for name, overrides in expected['variants'].items()
                     if name in saved['variants'] and saved['variants'][name] != overrides)
    if changed:
        log(f'records: {", ".join(changed)} changed since {folder} was written; their records are left out')
    runs = {}
    with open(runs_path, newline='') as f:
        for row in csv.DictReader(f):
            run = {k: _record_value(k, row.get(k)) for k in RUN_FIELDS}
            if run['status'] in ('failed', 'missing') or run['final_top1'] is None:
                continue
            if run['variant'] in expected['variants'] and run['variant'] not in changed:
                runs[run['variant'], run['seed']] = run
    speeds = folder / 'throughput.json'
    return runs, (speeds if speeds.is_file() else None)


def measured_throughput(out: Path, variants: List[Dict[str, Any]], num_classes: Optional[int],
                        throughput: Optional[Dict[str, Any]], log=print,
                        recorded: Optional[Path] = None) -> Tuple[Optional[Dict[str, Any]], str]:
    """(speeds by variant, how they were measured): measured now when ``throughput`` asks (and kept in
    ``OUTPUT/throughput.json``), else the kept measurement (or the ``recorded`` one, when OUTPUT has none) for the
    variants whose overrides are unchanged, so that tabulating again does not lose a measurement that took
    minutes."""
    import torch
    from dynamixer.io import write_text
    path = out / 'throughput.json'
    if throughput is None and not path.is_file() and recorded is not None:
        path = recorded
    if throughput is not None:
        speeds = controlled_throughput(variants, num_classes, log=log, **throughput)
        defaults = {k: p.default for k, p in inspect.signature(controlled_throughput).parameters.items()
                    if k in ('precision', 'compile', 'batch_size', 'warmup', 'iters')}
        settings = dict(defaults, **throughput, measured=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
                        torch=torch.__version__, threads=torch.get_num_threads())
        saved = dict(settings=settings, variants={v['name']: dict(overrides=v['overrides'], **speeds[v['name']])
                                                  for v in variants})
        write_text(path, json.dumps(saved, indent=1) + '\n')
    elif path.is_file():
        saved = json.loads(path.read_text())
        settings = saved['settings']
        speeds = {v['name']: {k: saved['variants'][v['name']][k] for k in ('train', 'inference')} for v in variants
                  if saved['variants'].get(v['name'], {}).get('overrides') == json.loads(json.dumps(v['overrides']))}
        log(f'throughput: the measurement of {settings["measured"]} from {path} ({len(speeds)} of {len(variants)} '
            f'variants); --throughput measures again')
    else:
        return None, ''
    how = (f'{settings["precision"]}{", compiled" if settings["compile"] else ", eager"}, batch '
           f'{settings["batch_size"]}, {settings["threads"]} threads, torch {settings["torch"]}, '
           f'{settings["measured"]}')
    return speeds, how


def run_budget(train: Dict[str, Any]) -> Tuple[Optional[int], Optional[float]]:
    """(epochs, None) or (None, minutes): the budget every run of the grid gets (a time budget may come from the
    recipe)."""
    minutes = train.get('time_budget')
    if minutes is None and train.get('recipe'):
        from dynamixer.settings import RECIPES
        if train['recipe'] not in RECIPES:
            raise ValueError(f'train: recipe {train["recipe"]!r} is not one of {", ".join(RECIPES)}.')
        minutes = RECIPES[train['recipe']]('').get('time_budget')
    if minutes is not None:
        if not isinstance(minutes, (int, float)) or minutes <= 0:
            raise ValueError(f'train: time_budget must be a positive number of minutes, got {minutes!r}.')
        return None, float(minutes)
    epochs = train.get('epochs')
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f'train: give every run the same budget, epochs (a positive integer) or time_budget '
                         f'(minutes); got epochs={epochs!r}.')
    return epochs, None


def _dirname(name: str) -> str:
    return ''.join(ch if ch.isalnum() or ch in '-_.=' else '_' for ch in name)


# ----------------------------------------------------------------------------------------------- results

def _stats(values: List[float]) -> Dict[str, float]:
    if not values:
        return dict(mean=float('nan'), std=float('nan'), min=float('nan'), max=float('nan'))
    return dict(mean=statistics.mean(values), std=statistics.stdev(values) if len(values) > 1 else 0.,
                min=min(values), max=max(values))


def summarise(variants: List[Dict[str, Any]], results: List[Dict[str, Any]], num_classes: Optional[int] = None,
              speeds: Optional[Dict[str, Dict[str, float]]] = None) -> List[Dict[str, Any]]:
    table = []
    for v in variants:
        done = [r for r in results if r['variant'] == v['name'] and r['status'] not in ('failed', 'missing')]
        params, gmacs = count_params_macs(v, num_classes)
        # a record may lack a run's best epoch: no best column then, rather than one over some of the seeds
        best = _stats([r['best_top1'] for r in done] if all(r.get('best_top1') is not None for r in done) else [])
        final = _stats([r['final_top1'] for r in done])
        with_tta = [r['final_top1_tta'] for r in done if r.get('final_top1_tta') is not None]
        speed = _stats([r['img_per_sec'] for r in done if r.get('img_per_sec') is not None
                        and not math.isnan(r['img_per_sec'])])
        table.append(dict(
            variant=v['name'], overrides=json.dumps(v['overrides'], sort_keys=True) if v['overrides'] else '',
            seeds=' '.join(str(r['seed']) for r in done), runs=len(done), params=params, gmacs=gmacs,
            img_per_sec=speed['mean'],
            train_img_per_sec_controlled=(speeds or {}).get(v['name'], {}).get('train', float('nan')),
            inference_img_per_sec_controlled=(speeds or {}).get(v['name'], {}).get('inference', float('nan')),
            **{f'best_top1_{k}': x for k, x in best.items()}, **{f'final_top1_{k}': x for k, x in final.items()},
            tta_runs=len(with_tta), **{f'final_tta_top1_{k}': x for k, x in _stats(with_tta).items()},
            val_images=min((r['val_images'] for r in done if r.get('val_images')), default=None)))
    return table


def check_claims(claims: Any, variants: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The grid's ``claims:`` list, each checked: a known form (``CLAIM_FORMS``) naming variants of the grid."""
    if claims is None:
        return []
    forms = ', '.join('/'.join(form) for form in CLAIM_FORMS)
    if not isinstance(claims, list):
        raise ValueError(f'claims must be a list of mappings with claim: and one of {forms}; got {claims!r}.')
    names = {v['name'] for v in variants}
    checked = []
    for i, item in enumerate(claims):
        keys = set(item) - {'claim'} if isinstance(item, dict) else set()
        form = next((f for f in CLAIM_FORMS if set(f) == keys), None)
        if not isinstance(item, dict) or not item.get('claim') or form is None:
            raise ValueError(f'claim {i + 1} ({item!r}) needs claim: (its text) and one of {forms}.')
        unknown = [str(item[k]) for k in form if k != 'by' and str(item[k]) not in names]
        if unknown:
            raise ValueError(f'claim {i + 1} names {", ".join(map(repr, unknown))}, not a variant of this grid; '
                             f'variants: {", ".join(sorted(names))}.')
        if 'by' in form and not (isinstance(item['by'], list) and len(item['by']) == 2
                                 and 0 <= item['by'][0] <= item['by'][1] < 1):
            raise ValueError(f'claim {i + 1}: by: must be [low, high], fractions from 0 to 1, got {item["by"]!r}.')
        checked.append({k: (str(v) if k not in ('by', 'claim') else v) for k, v in item.items()})
    return checked


def run_noise(table: List[Dict[str, Any]]) -> Tuple[float, Optional[int]]:
    """(the seed variance of one run's final top-1 in points squared, pooled over the variants with several runs;
    the held-out images per run). Pooled robustly: the median over variants of each one's sample variance scaled
    by the median of its chi-square distribution per degree of freedom (0.455 for two seeds), so that one variant
    whose seeds trained very differently (4 epochs against 2 under a time budget) does not widen every floor."""
    from scipy.stats import chi2
    estimates = [r['final_top1_std'] ** 2 / (chi2.median(r['runs'] - 1) / (r['runs'] - 1))
                 for r in table if r['runs'] > 1]
    pooled = statistics.median(estimates) if estimates else 0.
    return pooled, min((r['val_images'] for r in table if r.get('val_images')), default=None)


def judge_claims(claims: List[Dict[str, Any]], table: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """A verdict per claim: ``holds``, ``reversed`` or ``not seen`` (``pending`` while a side has no runs).

    Accuracy claims compare mean final top-1 over seeds against a noise floor of two standard errors of the
    difference, where one run's variance is the binomial variance of its held-out accuracy plus the seed variance
    pooled over the grid (``run_noise``). ``better``/``worse``: holds when the difference clears the floor,
    reversed when it clears it the other way, not seen in between. ``loses_little``/``against``: holds unless
    the first is below the second by more than the floor (then reversed). ``slower``/``than``/``by``: the
    controlled training throughputs' slowdown, holds inside ``by``, reversed when the first is the faster, not seen
    otherwise."""
    rows = {r['variant']: r for r in table}
    seed_var, images = run_noise(table)
    verdicts = []
    for c in claims:
        if 'slower' in c:
            a, b = rows[c['slower']], rows[c['than']]
            slowdown = 1 - a['train_img_per_sec_controlled'] / b['train_img_per_sec_controlled']
            low, high = c['by']
            verdict = ('pending' if math.isnan(slowdown) else 'holds' if low <= slowdown <= high
                       else 'reversed' if slowdown < 0 else 'not seen')
            verdicts.append(dict(c, sides=(c['slower'], c['than']), delta=slowdown, floor=None, verdict=verdict))
            continue
        first, second = (c['better'], c['worse']) if 'better' in c else (c['loses_little'], c['against'])
        a, b = rows[first], rows[second]
        if not (a['runs'] and b['runs']):
            verdicts.append(dict(c, sides=(first, second), delta=float('nan'), floor=float('nan'), verdict='pending'))
            continue

        def mean_var(row: Dict[str, Any]) -> float:
            p = row['final_top1_mean'] / 100
            binomial = p * (1 - p) / images * 1e4 if images else 0.
            return (binomial + seed_var) / row['runs']

        delta = a['final_top1_mean'] - b['final_top1_mean']
        floor = 2 * math.sqrt(mean_var(a) + mean_var(b))
        if 'better' in c:
            verdict = 'holds' if delta >= floor else 'reversed' if delta <= -floor else 'not seen'
        else:
            verdict = 'reversed' if delta <= -floor else 'holds'
        verdicts.append(dict(c, sides=(first, second), delta=delta, floor=floor, verdict=verdict))
    return verdicts


def claims_section(verdicts: List[Dict[str, Any]], table: List[Dict[str, Any]]) -> List[str]:
    """The Markdown lines of the claims table (empty without claims)."""
    if not verdicts:
        return []
    seed_var, images = run_noise(table)
    lines = ['', '## Claims', '',
             f'Noise floor: two standard errors of the difference of two means over seeds; one run\'s variance is '
             f'the binomial variance of its held-out top-1 ({images or "?"} images) plus the seed variance pooled '
             f'over the grid ({math.sqrt(seed_var):.2f} points std: the median over variants of their seed variances, '
             f'scaled to estimate the variance, so that one erratic variant does not set every floor). A claim that one variant beats another holds '
             f'when the difference clears the floor, is reversed when it clears it the other way, and is not seen '
             f'in between; a claim that a change loses little holds unless its loss clears the floor; a speed '
             f'claim holds when the controlled training slowdown lies in the claimed range.',
             '', '| claim | compared | difference | noise floor | verdict |', '|---|---|---:|---:|---|']
    for v in verdicts:
        if v['floor'] is None:
            low, high = v['by']
            compared = f'training img/s: {v["sides"][0]} against {v["sides"][1]} (claimed {low:.0%}-{high:.0%} slower)'
            delta = ('n/a' if math.isnan(v['delta']) else f'{v["delta"]:.1%} slower' if v['delta'] >= 0
                     else f'{-v["delta"]:.1%} faster')
            lines.append(f'| {v["claim"]} | {compared} | {delta} | — | {v["verdict"]} |')
            continue
        compared = f'final top-1: {v["sides"][0]} − {v["sides"][1]}'
        delta = 'n/a' if math.isnan(v['delta']) else f'{v["delta"]:+.2f}'
        floor = 'n/a' if math.isnan(v['floor']) else f'{v["floor"]:.2f}'
        lines.append(f'| {v["claim"]} | {compared} | {delta} | {floor} | {v["verdict"]} |')
    return lines


def _fmt_speed(value: float) -> str:
    return '—' if math.isnan(value) else f'{value:.0f}'


def _fmt_acc(row: Dict[str, Any], which: str, runs: str = 'runs') -> str:
    mean = row[f'{which}_top1_mean']
    if not row[runs] or math.isnan(mean):
        return 'n/a'
    if row[runs] == 1:
        return f'{mean:.2f}'
    return (f'{mean:.2f} ± {row[f"{which}_top1_std"]:.2f} '
            f'({row[f"{which}_top1_min"]:.2f}–{row[f"{which}_top1_max"]:.2f})')


def write_results(out: Path, model: str, base: Dict[str, Any], train: Dict[str, Any],
                  table: List[Dict[str, Any]], results: List[Dict[str, Any]],
                  verdicts: Optional[List[Dict[str, Any]]] = None, speed_note: str = '') -> None:
    fields = list(table[0].keys())
    with open(out / 'results.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in table:
            writer.writerow({k: (f'{v:.6g}' if isinstance(v, float) else v) for k, v in row.items()})
    with open(out / 'runs.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=RUN_FIELDS, extrasaction='ignore')
        writer.writeheader()
        for r in results:
            writer.writerow({k: (f'{r[k]:.6g}' if isinstance(r.get(k), float) else
                                 '' if r.get(k) is None else r[k]) for k in RUN_FIELDS})
    lines = [
        f'Model `{model}` with base knobs `{json.dumps(base, sort_keys=True)}`; every run: '
        f'`{json.dumps(train, sort_keys=True)}`.',
        '',
        'Top-1 in %, on the validation images: the last epoch\'s (final) and the best epoch\'s (selected on the '
        'validation images themselves, so optimistic); mean ± std (min–max) over seeds where there are several. '
        'img/s in runs: training throughput within the runs (mean over epochs after the first; runs at different '
        'times see a machine of different speed).',
    ]
    controlled = any(not math.isnan(row['train_img_per_sec_controlled']) for row in table)
    if controlled:
        lines[-1] += (' Controlled: training and inference images/s measured in one process, every variant\'s '
                      f'steps interleaved ({speed_note}), and the training rate relative to the first variant.')
    tta = any(row['tta_runs'] for row in table)
    if tta:
        lines[-1] += (' With TTA: the last epoch\'s top-1 with the test-time augmentation the runs measured (e.g. '
                      'the cifar recipe\'s flip-shift).')
    head = '| variant | overrides | seeds | params | GMACs | img/s in runs |'
    if controlled:
        head += ' controlled train img/s | relative | controlled inference img/s |'
    accuracy = ' final val top-1 |' + (' final val top-1 with TTA |' if tta else '') + ' best val top-1 |'
    columns = (head + accuracy).count('|') - 1
    lines += ['', head + accuracy, '|---|---|---|' + '---:|' * (columns - 3)]
    base_speed = table[0]['train_img_per_sec_controlled']
    for row in table:
        overrides = ', '.join(f'{k}={v}' for k, v in json.loads(row['overrides']).items()) if row['overrides'] else '—'
        line = (f'| {row["variant"]} | {overrides} | {row["seeds"] or "—"} | {row["params"]:,} | '
                f'{row["gmacs"]:.4g} | {_fmt_speed(row["img_per_sec"])} |')
        if controlled:
            train_speed = row['train_img_per_sec_controlled']
            relative = '—' if math.isnan(train_speed / base_speed) else f'{train_speed / base_speed:.2f}x'
            line += (f' {_fmt_speed(train_speed)} | {relative} | '
                     f'{_fmt_speed(row["inference_img_per_sec_controlled"])} |')
        line += f' {_fmt_acc(row, "final")} |' + (f' {_fmt_acc(row, "final_tta", "tta_runs")} |' if tta else '')
        lines.append(line + f' {_fmt_acc(row, "best")} |')
    lines += claims_section(verdicts or [], table)
    (out / 'results.md').write_text('\n'.join(lines) + '\n')
    plot(out / 'accuracy.png', table,
         title=f'{model} ablation: final val top-1 (bars: min-max over seeds; dashed line and band: base)')


def plot(path: Path, table: List[Dict[str, Any]], title: str = '') -> None:
    """Final val top-1 (mean, min-max bars) against params, GMACs and, when measured, controlled training
    throughput: one point per variant. An axis whose values span more than 3x is logarithmic, so that peers of
    a different cost do not squeeze the variants into one column."""
    import matplotlib
    matplotlib.use('Agg', force=False)
    import matplotlib.pyplot as plt
    rows = [r for r in table if r['runs']]
    panels = [('params', 'parameters (M)', 1e-6), ('gmacs', 'GMACs (batch 1)', 1.)]
    if any(not math.isnan(r['train_img_per_sec_controlled']) for r in rows):
        panels.append(('train_img_per_sec_controlled', 'training img/s (controlled)', 1.))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.4), sharey=True, squeeze=False)
    groups = sorted({r['variant'].split('=')[0] if '=' in r['variant'] else r['variant'] for r in rows})
    colors = {g: plt.cm.tab10(i % 10) for i, g in enumerate(groups)}
    labels = []
    for ax, (key, label, scale) in zip(axes[0], panels):
        points = []
        for r in rows:
            x = r[key] * scale
            if math.isnan(x):
                continue
            y = r['final_top1_mean']
            points.append((x, y, r['variant']))
            group = r['variant'].split('=')[0] if '=' in r['variant'] else r['variant']
            err = [[y - r['final_top1_min']], [r['final_top1_max'] - y]]
            ax.errorbar([x], [y], yerr=err if r['runs'] > 1 else None, fmt='o', color=colors[group], capsize=3)
        xs = [x for x, _, _ in points]
        if xs and min(xs) > 0 and max(xs) > 3 * min(xs):
            ax.set_xscale('log')
            ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f'{v:g}'))  # 0.04, not 4 x 10^-2
            ax.xaxis.set_minor_formatter(plt.FuncFormatter(lambda v, _: f'{v:g}' if f'{v:.0e}'[0] in '25' else ''))
        labels.append((ax, points))
        ref = table[0]  # the base, as a reference line (mean) and band (min-max over seeds)
        if ref['runs']:
            ax.axhline(ref['final_top1_mean'], color='grey', ls='--', lw=0.8)
            if ref['runs'] > 1:
                ax.axhspan(ref['final_top1_min'], ref['final_top1_max'], color='grey', alpha=0.12, lw=0)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, which='both')
    axes[0][0].set_ylabel('final val top-1 (%)')
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    for ax, points in labels:  # once the axes have their final size
        _label_points(ax, points)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _label_points(ax, points: List[Tuple[float, float, str]], fontsize: int = 7) -> None:
    """Name each point, moving a label up or down (with a leader line) where it would cover one already placed,
    and to the left of its point near the right edge: variants of one size and accuracy sit in a tight cluster."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    fx = math.log if ax.get_xscale() == 'log' else (lambda v: v)
    box = ax.get_window_extent()
    width_pt, height_pt = box.width * 72 / ax.figure.dpi, box.height * 72 / ax.figure.dpi
    line = 1.5 * fontsize / height_pt  # one label's height with some air, as a fraction of the axes
    placed: List[Tuple[float, float, float]] = []  # (left, bottom, right) of each label, in axes fractions
    for x, y, text in sorted(points, key=lambda p: -p[1]):
        nx, ny = (fx(x) - fx(x0)) / (fx(x1) - fx(x0)), (y - y0) / (y1 - y0)
        gap, length = 4 / width_pt, 0.65 * fontsize * len(text) / width_pt
        left_side = nx + gap + length > 1
        left, right = (nx - gap - length, nx - gap) if left_side else (nx + gap, nx + gap + length)
        shifts = [k for k in sorted(range(-20, 21), key=lambda k: (abs(k), k))
                  if 0 <= ny + 3 / height_pt + k * line <= 1 - line] or [0]
        for shift in shifts:
            bottom = ny + 3 / height_pt + shift * line
            if not any(bottom - line < b < bottom + line and left < r and l < right for l, b, r in placed):
                break
        placed.append((left, bottom, right))
        ax.annotate(text, (x, y), xytext=(-4 if left_side else 4, (bottom - ny) * height_pt),
                    textcoords='offset points', fontsize=fontsize, ha='right' if left_side else 'left',
                    arrowprops=dict(arrowstyle='-', lw=0.4, color='grey') if shift else None)


# ----------------------------------------------------------------------------------------------- CLI


def grid_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    grid = load_grid(args.grid)
    if args.model:
        grid['model'] = args.model
    if args.base:
        grid['base'] = dict(grid.get('base') or {}, **_parse_assignments(args.base, '--base'))
    if args.vary:
        axes = dict(grid.get('axes') or {})
        for item in args.vary:
            if '=' not in item:
                raise ValueError(f'--vary takes KNOB=V1,V2,..., got {item!r}.')
            key, values = item.split('=', 1)
            axes[key.strip()] = [_parse_value(v) for v in values.split(',')]
        grid['axes'] = axes
    if args.variant:
        variants = dict(grid.get('variants') or {})
        for item in args.variant:
            name, sep, spec = item.partition(':')
            if not sep or not name:
                raise ValueError(f'--variant takes NAME:KNOB=VALUE[;KNOB=VALUE], got {item!r}.')
            variants[name] = _parse_assignments([s for s in spec.split(';') if s], f'--variant {name}')
        grid['variants'] = variants
    if args.seeds:
        grid['seeds'] = args.seeds
    train = dict(grid.get('train') or {})
    if args.data:
        train['data'] = args.data
    if args.epochs:
        train['epochs'] = args.epochs
    if args.time_budget:
        train['time_budget'] = args.time_budget
    train.update(_parse_assignments(args.train_arg, '--train-arg'))
    grid['train'] = train
    return grid


def run(args: argparse.Namespace) -> int:
    if args.jobs < 1 or args.threads < 1:
        raise ValueError('--jobs and --threads must be at least 1.')
    throughput = None
    if args.throughput:
        throughput = dict(precision=args.throughput, compile=args.throughput_compile,
                          batch_size=args.throughput_batch_size)
    result = run_grid(grid_from_args(args), args.output, jobs=args.jobs, threads=args.threads, dry_run=args.dry_run,
                      train_missing=not args.no_train, throughput=throughput, records=args.records)
    return 1 if result.get('failed') else 0
