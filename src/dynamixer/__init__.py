"""DynaMixer (Wang et al., ICML 2022, arXiv 2201.12083) for PyTorch and timm.

``import dynamixer`` registers the models with timm, so ``timm.create_model('dynamixer_s')`` works.
"""
import difflib
from typing import List

import timm

from dynamixer.models import DynaMixer, MODEL_ARGS
from dynamixer.convert import (
    adapt_state_dict, convert_official_state_dict, load_checkpoint, resample_op_state, save_safetensors,
)

__version__ = '0.1.0'
__all__ = ['DynaMixer', 'MODEL_ARGS', 'adapt_state_dict', 'convert_official_state_dict', 'create_model',
           'list_models', 'load_checkpoint', 'resample_op_state', 'save_safetensors']


def list_models() -> List[str]:
    """Names of the registered DynaMixer variants."""
    return sorted(MODEL_ARGS)


def create_model(name: str, **kwargs) -> DynaMixer:
    """``timm.create_model`` for DynaMixer names, with a KeyError that suggests the right name."""
    if name not in MODEL_ARGS:
        close = difflib.get_close_matches(name, MODEL_ARGS, n=1)
        hint = f'did you mean {close[0]!r}? ' if close else ''
        raise KeyError(f'unknown DynaMixer variant {name!r}; {hint}choose one of {", ".join(list_models())}.')
    return timm.create_model(name, **kwargs)
