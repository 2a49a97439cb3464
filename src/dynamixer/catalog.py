"""The registered DynaMixer variants (input size, parameters, GMACs and pretrained tags, one line each), and
models by name: ours, or any timm model with its entry point's fixed arguments replaceable.

Parameters and GMACs are counted on the model as built (batch 1, at the variant's own input size, 1000
classes for the ImageNet variants and 10 for the CIFAR ones), so they match the README's table; the models are
built on the meta device (shapes without values), which counts the same in a fraction of the time.
"""
import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List

if TYPE_CHECKING:
    import torch


def create_any_model(name: str, **kwargs) -> 'torch.nn.Module':
    """A DynaMixer variant (or the ViP baseline) by name, or any other timm model, so that peers train under
    exactly the same recipe; a one-line error that suggests a name when timm knows neither."""
    import timm
    import dynamixer
    if name in dynamixer.list_models():
        return dynamixer.create_model(name, **kwargs)
    if not timm.is_model(name):
        close = dynamixer.closest_name(name, dynamixer.list_models() + timm.list_models())
        raise ValueError(f'unknown --model {name!r}: neither a DynaMixer variant nor a timm model; '
                         + (f'did you mean {close!r}? ' if close else '')
                         + '`dynamixer list` shows ours, timm.list_models() the others.')
    return _create_timm_model(name, kwargs)


def _create_timm_model(name: str, kwargs: Dict[str, Any]) -> 'torch.nn.Module':
    """``timm.create_model(name, **kwargs)``, where ``kwargs`` may also replace what the entry point fixes: timm's
    entry points write their architecture as ``dict(patch_size=16, ..., **kwargs)``, which refuses a second
    ``patch_size``. Those keys are handed to the builder the entry point calls (its module's
    ``build_model_with_cfg``) instead, for this call only."""
    import re
    import sys
    import timm
    from timm.models import model_entrypoint
    fixed: Dict[str, Any] = {}
    module = sys.modules[model_entrypoint(name).__module__]
    builder = getattr(module, 'build_model_with_cfg', None)
    while True:
        passed = {k: v for k, v in kwargs.items() if k not in fixed}
        if fixed and builder is not None:
            module.build_model_with_cfg = lambda cls, variant, pretrained, **kw: builder(
                cls, variant, pretrained, **{**kw, **fixed})
        try:
            return timm.create_model(name, **passed)
        except TypeError as e:
            clash = re.search(r"got multiple values for keyword argument '(\w+)'", str(e))
            if builder is None or clash is None or clash.group(1) in fixed:
                raise
            fixed[clash.group(1)] = kwargs[clash.group(1)]
        finally:
            if builder is not None:
                module.build_model_with_cfg = builder


def load_timm_folder(folder: Path) -> 'torch.nn.Module':
    """A model folder of another timm architecture written by ``dynamixer train``: built from its config's
    ``architecture`` and ``model_args`` (which may replace what the entry point fixes), weights loaded, its
    pretrained config (preprocessing, label names) restored."""
    import json
    from dynamixer.convert import load_checkpoint
    config = json.loads((folder / 'config.json').read_text())
    model = _create_timm_model(config['architecture'], dict(config.get('model_args') or {}))
    load_checkpoint(model, folder / 'model.safetensors')
    model.pretrained_cfg = dict(config.get('pretrained_cfg') or {}, architecture=config['architecture'])
    return model


def describe(pattern: str = '*', macs: bool = True) -> List[Dict[str, Any]]:
    """One row per registered variant that matches ``pattern``."""
    import timm
    import torch
    import dynamixer  # noqa: F401  (registers the models)
    from dynamixer.bench import count_macs
    rows = []
    for name in timm.list_models(pattern, module='dynamixer'):  # ours only, not timm's own
        cfg = timm.models.get_pretrained_cfg(name)  # the variant's default tag
        tags = [t.split('.', 1)[1] for t in timm.list_pretrained(name + '.*')
                if timm.models.get_pretrained_cfg(t).file]
        # on the meta device: shapes only, so that the largest variants cost no more to list than the smallest
        with torch.random.fork_rng(), torch.device('meta'):
            model = timm.create_model(name).eval()
        size = tuple(model.pretrained_cfg['input_size'])
        rows.append(dict(model=name, input_size=f'{size[1]}x{size[2]}', params_m=sum(
            p.numel() for p in model.parameters()) / 1e6, gmacs=count_macs(model, size) / 1e9 if macs else None,
            num_classes=model.num_classes, pretrained=tags, default_tag=cfg.tag))
    return rows


def cached_rows(macs: bool = True) -> List[Dict[str, Any]]:
    """``describe('*')``, kept in the cache folder and keyed by the versions and model files it depends on, so
    that ``dynamixer list`` answers without importing torch once it has been counted."""
    import hashlib
    import json
    from importlib import metadata
    from dynamixer import __version__
    from dynamixer.io import default_cache_dir, write_text
    models = Path(__file__).resolve().parent / 'models'
    stamp = [__version__, metadata.version('timm'), metadata.version('torch'), str(macs)]
    stamp += [f'{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}' for p in sorted(models.glob('*.py'))]
    path = default_cache_dir() / f'list-{hashlib.sha1(" ".join(stamp).encode()).hexdigest()[:16]}.json'
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        rows = describe('*', macs=macs)
    try:
        write_text(path, json.dumps(rows))
    except OSError:  # a read-only home: list without the cache
        pass
    return rows


def run(args: argparse.Namespace) -> None:
    from fnmatch import fnmatch
    rows = [r for r in cached_rows(macs=not args.no_macs) if fnmatch(r['model'], args.pattern)]
    if not rows:
        raise ValueError(f'no registered model matches {args.pattern!r}; try dynamixer list (all DynaMixers).')
    print(f'{"model":<20} {"input":>7} {"params":>8} {"GMACs":>7} {"classes":>7}  pretrained tags')
    for r in rows:
        gmacs = f'{r["gmacs"]:.3f}' if r['gmacs'] is not None else '-'
        print(f'{r["model"]:<20} {r["input_size"]:>7} {r["params_m"]:>7.2f}M {gmacs:>7} {r["num_classes"]:>7}  '
              + (', '.join(r['pretrained']) or '-'))
    from dynamixer.model_dir import read_config, shipped_folders
    for name, folder in shipped_folders().items():
        if not fnmatch(name, args.pattern):
            continue
        config = read_config(folder)
        args = config.get('model_args', {})
        print(f'\n{name}: {config.get("task", "classification")}, {config.get("architecture", "").upper()} on '
              f'{args.get("backbone")}, {args.get("num_classes")} classes ({config.get("note", "")})')
    print("\nuse a tagged model: dynamixer predict --model NAME.TAG IMAGE, or timm.create_model('NAME.TAG', "
          "pretrained=True) for a classifier, dynamixer.model_dir.load_model_dir('NAME.TAG') for any; "
          "train one: dynamixer train --model NAME")
