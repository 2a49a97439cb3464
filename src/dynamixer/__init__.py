"""DynaMixer (Wang et al., ICML 2022, arXiv 2201.12083) for PyTorch and timm.

``import dynamixer`` registers the models with timm, so ``timm.create_model('dynamixer_s')`` works: at once
when timm is already imported, else the moment it is. Importing the package itself loads neither torch nor
timm, so that the ``dynamixer`` command answers ``--help`` and bad flags in a fraction of a second; the names
below load what they need on first use.
"""
import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any, List, Optional

__version__ = '0.1.0'
__all__ = ['DynaMixer', 'MODEL_ARGS', 'adapt_state_dict', 'convert_official_state_dict', 'create_model',
           'list_models', 'load_checkpoint', 'resample_op_state', 'save_safetensors']

_LAZY = {'DynaMixer': 'dynamixer.models', 'MODEL_ARGS': 'dynamixer.models',
         'adapt_state_dict': 'dynamixer.convert', 'convert_official_state_dict': 'dynamixer.convert',
         'load_checkpoint': 'dynamixer.convert', 'resample_op_state': 'dynamixer.convert',
         'save_safetensors': 'dynamixer.convert'}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in ('models', 'convert'):
        return importlib.import_module(f'dynamixer.{name}')
    raise AttributeError(f"module 'dynamixer' has no attribute {name!r}")


def list_models() -> List[str]:
    """Names of the registered DynaMixer variants."""
    from dynamixer.models import MODEL_ARGS
    return sorted(MODEL_ARGS)


def closest_name(name: str, names: List[str], cutoff: float = 0.6) -> Optional[str]:
    """The name a typo most likely meant: one with the same letters (two swapped, ``cifar_sx``) first, else the
    closest by ``difflib``; None when nothing is close."""
    import difflib
    swapped = [n for n in names if len(n) == len(name) and sorted(n) == sorted(name)
               and sum(a != b for a, b in zip(n, name)) == 2]
    if swapped:
        return swapped[0]
    close = difflib.get_close_matches(name, names, n=1, cutoff=cutoff)
    return close[0] if close else None


def create_model(name: str, **kwargs):
    """``timm.create_model`` for DynaMixer names, with a KeyError that suggests the right name."""
    import timm
    from dynamixer.models import MODEL_ARGS
    if name not in MODEL_ARGS:
        close = [c for c in [closest_name(name, list(MODEL_ARGS))] if c]
        hint = f'did you mean {close[0]!r}? ' if close else ''
        raise KeyError(f'unknown DynaMixer variant {name!r}; {hint}choose one of {", ".join(list_models())}.')
    return timm.create_model(name, **kwargs)


class _RegisterWhenTimmLoads(importlib.abc.MetaPathFinder):
    """Registers the variants right after ``import timm`` has finished (a post-import hook)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != 'timm':
            return None
        sys.meta_path.remove(self)  # find timm's real spec, and never run twice
        spec = importlib.util.find_spec('timm')
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            importlib.import_module('dynamixer.models')
        spec.loader.exec_module = exec_then_register
        return spec


if 'timm' in sys.modules:
    importlib.import_module('dynamixer.models')
elif not any(isinstance(finder, _RegisterWhenTimmLoads) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenTimmLoads())
