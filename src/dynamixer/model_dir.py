"""Model folders: what ``dynamixer train`` writes as ``OUTPUT/model`` and every other command loads.

A classification model is a timm local-dir folder (config.json with architecture, model_args and a
pretrained_cfg holding preprocessing and label names, plus model.safetensors):
``timm.create_model('local-dir:FOLDER', pretrained=True)`` loads it as well as ``load_model_dir`` does. A
segmentation model's config.json says ``"task": "segmentation"`` and holds the ``Segmenter``'s arguments, its
preprocessing and class names beside the same weights file. ``load_model_dir`` takes either, a training run's
folder (its ``model/``), or the name of weights shipped with the package.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

if TYPE_CHECKING:  # torch is imported by what loads a model, not by listing the shipped folders
    import torch.nn as nn

from dynamixer.io import atomic_write, write_text

# The weight files timm's local-dir loader looks for, in its order of preference.
WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin', 'pytorch_model.pth', 'model.pth')
# Model folders that ship inside the package (segmenters: classifiers ship as timm pretrained tags instead).
SHIPPED_DIR = Path(__file__).resolve().parent / 'weights'


def shipped_folders() -> Dict[str, Path]:
    """Model folders shipped with the package, by name (``NAME.TAG``, usable wherever a model folder is)."""
    return {p.name: p for p in sorted(SHIPPED_DIR.iterdir()) if p.is_dir() and (p / 'config.json').is_file()}


def model_folder(path: str) -> Optional[Path]:
    """The model folder that ``path`` names (itself, or a training run's ``model/``), checked; None for the
    name of weights shipped with the package."""
    import timm
    import dynamixer  # registers the architectures (and their shipped weights) with timm
    folder = Path(path)
    if not folder.exists() and path.split('.')[0] in dynamixer.list_models() and path in timm.list_pretrained():
        return None
    if not folder.exists() and path in shipped_folders():
        return shipped_folders()[path]
    if not (folder / 'config.json').is_file() and (folder / 'model' / 'config.json').is_file():
        folder = folder / 'model'
    if not folder.is_dir():
        names = [n for n in timm.list_pretrained() if n.split('.')[0] in dynamixer.list_models()]
        close = dynamixer.closest_name(path, names + list(shipped_folders()), cutoff=0.7)
        raise FileNotFoundError(f'model folder {path!r} does not exist' + (
            f', and no shipped model is called that; did you mean {close!r}?' if close else
            '; give the model/ folder of a training run (config.json + model.safetensors), e.g. runs/digits/model, '
            'or a shipped model (dynamixer list).'))
    if not (folder / 'config.json').is_file():
        raise ValueError(f'{path!r} has no config.json; give the model/ folder that dynamixer train writes '
                         f'(e.g. runs/digits/model).')
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        unfinished = (folder.parent / 'args.yaml').is_file()
        raise ValueError(f'{path!r} has no weights ({" or ".join(WEIGHT_FILES[:2])})'
                         + ('; the training run that wrote it did not finish an epoch.' if unfinished else '.'))
    _check_weights(folder / WEIGHT_FILES[0])
    return folder


def _check_weights(path: Path) -> None:
    """Reads the header of a safetensors file (cheap), so that an empty or damaged one is named here rather than
    deep inside timm's loader."""
    if not path.is_file():
        return
    from safetensors import safe_open
    try:
        with safe_open(str(path), 'pt') as f:
            f.keys()
    except Exception as e:  # safetensors raises its own error types
        reason = 'an empty file' if path.stat().st_size == 0 else str(e).splitlines()[0] or type(e).__name__
        raise ValueError(f'could not read the weights {path} ({reason}); the file is damaged: copy the folder '
                         f'again, or train it again.') from None


def read_config(folder: Path) -> Dict[str, Any]:
    path = folder / 'config.json'
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f'could not read {path}: {e}; it should be the JSON that dynamixer train writes.') from None
    if not isinstance(config, dict):
        raise ValueError(f'{path} holds no JSON object; it should be the config that dynamixer train writes.')
    return config


def load_model_dir(path: str, device: str = 'cpu') -> nn.Module:
    """The model of a model folder, a run folder or a shipped name, weights loaded, on ``device``, in eval mode:
    a timm model for classification, a ``Segmenter`` for segmentation (``model.pretrained_cfg['task']``)."""
    import timm
    import dynamixer  # noqa: F401  registers the architectures with timm
    folder = model_folder(path)
    if folder is None:  # weights shipped with the package
        return timm.create_model(path, pretrained=True).to(device).eval()
    config = read_config(folder)
    if config.get('task') == 'segmentation':
        return _load_segmenter(folder, config).to(device).eval()
    architecture = config.get('architecture')
    if architecture and architecture not in dynamixer.list_models() and (folder / 'model.safetensors').is_file():
        from dynamixer.catalog import load_timm_folder  # a peer from timm, trained by dynamixer train
        return load_timm_folder(folder).to(device).eval()
    return timm.create_model(f'local-dir:{folder.resolve()}', pretrained=True).to(device).eval()


def label_names(model: nn.Module) -> List[str]:
    names = model.pretrained_cfg.get('label_names')
    return list(names) if names else [str(i) for i in range(model.num_classes)]


def task_of(model: nn.Module) -> str:
    return getattr(model, 'pretrained_cfg', {}).get('task', 'classification')


def save_model_dir(model: nn.Module, folder: Path, classes: List[str]) -> None:
    """The model as a model folder: a timm local-dir folder for a classifier (config.json with architecture,
    model_args and pretrained_cfg with label names; model.safetensors), our own config.json for a segmenter."""
    from dynamixer.convert import save_safetensors
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(model.state_dict(), folder / 'model.safetensors')
    if task_of(model) == 'segmentation':
        config = dict(task='segmentation', architecture='fpn', model_args=model.build_args,
                      pretrained_cfg=dict(model.pretrained_cfg, label_names=list(classes)))
        write_text(folder / 'config.json', json.dumps(config, indent=2) + '\n')
        return
    from timm.models._hub import save_config_for_hf
    atomic_write(folder / 'config.json', lambda tmp: save_config_for_hf(
        model, tmp, model_config=dict(label_names=list(classes)), model_args=getattr(model, 'build_args', None)))


def _load_segmenter(folder: Path, config: Dict[str, Any]) -> nn.Module:
    from dynamixer.convert import load_state_dict_file
    from dynamixer.models.segmentation import Segmenter
    try:
        model = Segmenter(**config['model_args'])
    except (KeyError, TypeError) as e:
        raise ValueError(f'{folder / "config.json"} does not describe a segmentation model ({e}); it should be '
                         f'the config that dynamixer train writes.') from None
    model.pretrained_cfg = dict(config.get('pretrained_cfg') or {}, task='segmentation')
    try:
        model.load_state_dict(load_state_dict_file(folder / 'model.safetensors'))
    except RuntimeError as e:
        raise ValueError(f'{folder / "model.safetensors"} does not fit the model of {folder / "config.json"} '
                         f'({str(e).splitlines()[0]}); the folder is damaged or mixed up.') from None
    return model
