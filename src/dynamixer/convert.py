"""Checkpoint files and the ``dynamixer convert`` command: safe loading (tensors only), saving as safetensors,
loading into a model with resampling, and checking against the official test vector. The state-dict
conversions themselves are pure functions in ``dynamixer.models.state_dict``.
"""
import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch

from dynamixer.io import atomic_write
from dynamixer.models.dynamixer import DynaMixer
from dynamixer.models.state_dict import (  # noqa: F401  (re-exported: dynamixer.convert_official_state_dict, ...)
    adapt_state_dict, convert_official_state_dict, official_config_to_kwargs, resample_op_state, unwrap_checkpoint)

__all__ = [
    'convert_official_state_dict', 'official_config_to_kwargs', 'unwrap_checkpoint', 'resample_op_state',
    'adapt_state_dict', 'load_state_dict_file', 'load_checkpoint', 'save_safetensors',
]


def load_state_dict_file(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Read tensors from .safetensors, or from a torch file without executing code (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f'checkpoint {str(path)!r} does not exist; give the path of a .safetensors or .pth file.')
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for truncated or foreign files
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f'could not read {str(path)!r} as safetensors ({reason}); the file is damaged or '
                             f'holds no weights.') from None
    return unwrap_checkpoint(torch_load(path, 'a checkpoint', 'a .safetensors file or a torch state dict saved '
                                                              'with tensors only'))


def torch_load(path: Union[str, Path], what: str, expected: str) -> Any:
    """``torch.load`` of tensors and plain containers only, so that a file never runs code; a damaged file
    or one that holds other objects is a one-line ValueError that says which."""
    import pickle
    try:
        return torch.load(str(path), map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'GLOBAL' in str(e):  # the pickle names a function or class: what code execution needs
            raise ValueError(f'refused to load {str(path)!r} as {what}: it holds Python objects beyond tensors, '
                             f'which could run code when unpickled; expected {expected}.') from None
        raise ValueError(f'could not read {str(path)!r} as {what} (UnpicklingError, the file is damaged or of '
                         f'another kind); expected {expected}.') from None
    except Exception as e:  # a truncated zip, a text file, ...: torch raises several types
        raise ValueError(f'could not read {str(path)!r} as {what} ({type(e).__name__}, the file is damaged or '
                         f'of another kind); expected {expected}.') from None


def load_checkpoint(model: DynaMixer, path_or_state: Union[str, Path, Mapping[str, Any]],
                    reset_head: bool = False) -> DynaMixer:
    """Load ours or an official checkpoint into ``model``, resampling to its input size.

    With ``reset_head`` the classifier is left as initialised (fine-tuning to a new class count).
    """
    state = path_or_state if isinstance(path_or_state, Mapping) else load_state_dict_file(path_or_state)
    state = adapt_state_dict(state, model)
    head = model.state_dict()
    head_keys = [k for k in state if k.startswith('head.')]
    if reset_head or any(state[k].shape != head[k].shape for k in head_keys if k in head):
        if not reset_head:
            raise ValueError(f'the checkpoint classifies {state["head.weight"].shape[0]} classes but the model '
                             f'{model.num_classes}; build it with num_classes={state["head.weight"].shape[0]} '
                             f'or fine-tune with a new head.')
        for k in head_keys:
            state.pop(k)
        model.load_state_dict(state, strict=False)
    else:
        model.load_state_dict(state, strict=True)
    return model


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: Union[str, Path],
                     metadata: Optional[Dict[str, str]] = None) -> None:
    """Write tensors atomically: a temporary file in the same folder, then a rename."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def verify_official_reference(path: Union[str, Path]) -> float:
    """Largest logit difference between our model and an official test vector.

    The file holds ``state_dict.<official key>`` weights, an ``input`` batch, the official ``logits`` and, in
    its metadata, the official constructor arguments as JSON under ``config``.
    """
    from safetensors import safe_open
    with safe_open(str(path), 'pt') as f:
        if 'config' not in (f.metadata() or {}):
            raise ValueError(f'{str(path)!r} has no "config" metadata; expected an official test vector.')
        config = json.loads(f.metadata()['config'])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state = {k[len('state_dict.'):]: v for k, v in tensors.items() if k.startswith('state_dict.')}
    model = DynaMixer(**official_config_to_kwargs(config)).eval()
    load_checkpoint(model, state)
    with torch.no_grad():
        return (model(tensors['input']) - tensors['logits']).abs().max().item()


def run(args) -> int:
    if args.verify:
        error = verify_official_reference(args.input)
        print(f'max |logits - official logits| = {error:.2e} ({"ok" if error <= 1e-5 else "MISMATCH"})')
        return 0 if error <= 1e-5 else 1
    if args.output is None:
        raise ValueError('give an OUTPUT path ending in .safetensors (or --verify to check a test vector).')
    if not str(args.output).endswith('.safetensors'):
        raise ValueError(f'the output {args.output!r} should end in .safetensors; give a .safetensors path.')
    state = convert_official_state_dict(load_state_dict_file(args.input))
    if args.fp16:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    save_safetensors(state, args.output, metadata={'converted_from': os.path.basename(args.input)})
    print(f'wrote {len(state)} tensors to {args.output}')
    return 0
