"""The registered DynaMixer variants: input size, parameters, GMACs and pretrained tags, one line each.

Parameters and GMACs are counted on the model as built (batch 1, at the variant's own input size, 1000
classes for the ImageNet variants and 10 for the CIFAR ones), so they match the README's table.
"""
import argparse
from typing import Any, Dict, List


def describe(pattern: str = 'dynamixer*', macs: bool = True) -> List[Dict[str, Any]]:
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
        with torch.random.fork_rng():  # building initialises weights: leave the caller's RNG alone
            model = timm.create_model(name).eval()
        size = tuple(model.pretrained_cfg['input_size'])
        rows.append(dict(model=name, input_size=f'{size[1]}x{size[2]}', params_m=sum(
            p.numel() for p in model.parameters()) / 1e6, gmacs=count_macs(model, size) / 1e9 if macs else None,
            num_classes=model.num_classes, pretrained=tags, default_tag=cfg.tag))
    return rows


def run(args: argparse.Namespace) -> None:
    rows = describe(args.pattern, macs=not args.no_macs)
    if not rows:
        raise ValueError(f'no registered model matches {args.pattern!r}; try dynamixer list (all DynaMixers).')
    print(f'{"model":<20} {"input":>7} {"params":>8} {"GMACs":>7} {"classes":>7}  pretrained tags')
    for r in rows:
        gmacs = f'{r["gmacs"]:.3f}' if r['gmacs'] is not None else '-'
        print(f'{r["model"]:<20} {r["input_size"]:>7} {r["params_m"]:>7.2f}M {gmacs:>7} {r["num_classes"]:>7}  '
              + (', '.join(r['pretrained']) or '-'))
    print("\nuse a tagged model: dynamixer predict --model NAME.TAG IMAGE, or timm.create_model('NAME.TAG', "
          "pretrained=True); train one: dynamixer train --model NAME")
