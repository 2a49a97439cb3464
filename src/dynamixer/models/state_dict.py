"""State dicts, as pure functions of tensors: official DynaMixer layouts to ours, and resampling to other
input sizes. File reading and writing, and the ``dynamixer convert`` command, are in ``dynamixer.convert``.

The official code (a ViP fork) names layers by their position in one flat ``network`` list and lays out the
generated mixing matrix input-token-major. Ours names stages and branches and lays it out output-token-major
(so the softmax runs over contiguous memory). A DynaMixer's generation weights are sized by the line length N,
so a model trained at one resolution is resampled to another by interpolating them over their token axes.
"""
import math
from typing import Any, Dict, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['unwrap_checkpoint', 'convert_official_state_dict', 'official_config_to_kwargs', 'resample_op_state',
           'adapt_state_dict']

_WRAPPER_KEYS = ('state_dict_ema', 'model_ema', 'state_dict', 'model')
_OFFICIAL_MIXER = {'mix_w': 'row_mix', 'mix_h': 'col_mix', 'mlp_c': 'channel_mix', 'reweight': 'reweight',
                   'proj': 'proj'}


def unwrap_checkpoint(checkpoint: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The tensors of a training checkpoint: unwrap ``state_dict`` / ``state_dict_ema``, drop ``module.``."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f'expected a checkpoint mapping names to tensors, got {type(checkpoint).__name__}.')
    for key in _WRAPPER_KEYS:
        if isinstance(checkpoint.get(key), Mapping) and checkpoint[key]:
            checkpoint = checkpoint[key]
            break
    out = {}
    for name, value in checkpoint.items():
        if isinstance(value, torch.Tensor):
            out[name[len('module.'):] if name.startswith('module.') else name] = value
    if not out:
        raise ValueError('the checkpoint holds no tensors; expected a model state dict '
                         '(plain, or under "state_dict" / "state_dict_ema").')
    return out


def _is_official(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(('network.', 'patch_embed.')) for k in state_dict)


def _official_generate_to_ours(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Reorder generate outputs from (N_in, N_out) to (N_out, N_in)."""
    n = math.isqrt(tensor.shape[0])
    if n * n != tensor.shape[0]:
        raise ValueError(f'{name} has {tensor.shape[0]} outputs, expected N*N for a line of N tokens.')
    return tensor.reshape(n, n, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)


def convert_official_state_dict(state_dict: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """Turn a checkpoint written by the official DynaMixer code into one our ``DynaMixer`` loads strictly.

    Accepts the plain state dict or one wrapped under ``state_dict`` / ``state_dict_ema``, with or without
    DistributedDataParallel's ``module.`` prefix. Checkpoints already in our layout pass through unchanged.
    """
    state_dict = unwrap_checkpoint(state_dict)
    if not _is_official(state_dict):
        return dict(state_dict)
    # network.{i} alternates groups of blocks (network.{i}.{j}.*) and downsamples (network.{i}.proj.*).
    entries = sorted({int(k.split('.')[1]) for k in state_dict if k.startswith('network.')})
    stage_of, downsample_of, stage = {}, {}, 0
    for i in entries:
        if any(k.startswith(f'network.{i}.proj.') for k in state_dict):
            downsample_of[i] = stage  # a downsample opens the next group of blocks
        else:
            stage_of[i] = stage
            stage += 1
    out: Dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        parts = name.split('.')
        if parts[0] == 'patch_embed':
            new = 'stem.' + '.'.join(parts[1:])
        elif parts[0] == 'network':
            i = int(parts[1])
            if i in downsample_of:
                new = f'stages.{downsample_of[i]}.downsample.' + '.'.join(parts[2:])
            else:
                rest = parts[3:]
                if rest[0] == 'attn':
                    branch = _OFFICIAL_MIXER.get(rest[1])
                    if branch is None:
                        raise ValueError(f'unknown layer {name!r} in the official checkpoint.')
                    op_rest = rest[2:]
                    if op_rest and op_rest[0] == 'out':
                        op_rest = ['proj'] + op_rest[1:]
                    rest = ['token_mixer', branch] + op_rest
                    if op_rest and op_rest[0] == 'generate':
                        tensor = _official_generate_to_ours(name, tensor)
                new = f'stages.{stage_of[i]}.blocks.{parts[2]}.' + '.'.join(rest)
        else:
            new = name  # norm.*, head.*
        out[new] = tensor
    return out


def official_config_to_kwargs(config: Mapping[str, Any]) -> Dict[str, Any]:
    """Constructor arguments of the official ``VisionPermutator``-style class, as ``DynaMixer`` kwargs."""
    transitions = list(config['transitions'])
    dims = list(config['embed_dims'])
    return dict(
        img_size=config['resolutions'][0] * config['patch_size'],
        patch_size=config['patch_size'],
        depths=tuple(config['layers']),
        embed_dims=tuple(dims),
        stage_strides=tuple([1] + [2 if transitions[i] else 1 for i in range(len(dims) - 1)]),
        num_segments=tuple(config['num_heads']),
        reduced_dims=tuple(config['reduced_dims']),
        mlp_ratios=tuple(config['mlp_ratios']),
        num_classes=config.get('num_classes', 1000),
    )


def _line_length(op: nn.Module, tensor: torch.Tensor) -> int:
    """The line length N that produced a checkpoint's generation tensor."""
    if op.generation == 'static':
        return tensor.shape[-1]
    if op.generation == 'dense':
        return tensor.shape[0]
    return math.isqrt(tensor.shape[0])


def resample_op_state(tensor: torch.Tensor, leaf: str, generation: str, new_len: int) -> torch.Tensor:
    """Interpolate one op's generation tensor from its line length to ``new_len`` tokens.

    The token axes of the tensor (output, input and, for ``dynamic`` weights, the generator's input tokens)
    are resampled linearly; weights over the generator's input tokens are scaled by N_old / N_new so the
    generated logits keep their size when a line gets more or fewer tokens.
    """
    dtype = tensor.dtype
    t = tensor.float()
    if generation == 'static':  # logits (S, N_out, N_in)
        return F.interpolate(t.unsqueeze(0), size=(new_len, new_len), mode='bilinear',
                             align_corners=False).squeeze(0).to(dtype)
    if generation == 'dense':  # weight (N_in, d), bias (N_in)
        t = t.reshape(t.shape[0], -1).T.unsqueeze(0)  # (1, d or 1, N_in)
        t = F.interpolate(t, size=new_len, mode='linear', align_corners=False).squeeze(0).T
        return t.reshape(new_len, *tensor.shape[1:]).to(dtype)
    n = math.isqrt(t.shape[0])
    if leaf == 'bias':  # (N_out * N_in)
        t = F.interpolate(t.view(1, 1, n, n), size=(new_len, new_len), mode='bilinear', align_corners=False)
        return t.reshape(new_len * new_len).to(dtype)
    d = t.shape[1] // n  # weight (N_out * N_in, N_tok * d)
    t = t.view(n, n, n, d).permute(3, 0, 1, 2).unsqueeze(0)
    t = F.interpolate(t, size=(new_len,) * 3, mode='trilinear', align_corners=False) * (n / new_len)
    return t.squeeze(0).permute(1, 2, 3, 0).reshape(new_len * new_len, new_len * d).to(dtype)


def adapt_state_dict(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Make a checkpoint fit ``model``: official layouts converted, generation weights resampled to the model's
    line lengths, and anything else that does not fit reported as one ValueError saying what to do.

    Classifier tensors may differ in shape (a new class count), and first-conv weights in their input channels
    (another ``in_chans``): timm's pretrained loading resets the one and adapts the other (``adapt_input_conv``)
    after this filter.
    """
    state_dict = convert_official_state_dict(state_dict)
    for prefix, module in model.named_modules():
        if not hasattr(module, 'seq_len') or not hasattr(module, 'generation'):  # not a mixing op (DynaMixerOp)
            continue
        own = module.state_dict()
        for leaf in ('logits', 'generate.weight', 'generate.bias'):
            key = f'{prefix}.{leaf}'
            if key not in state_dict or leaf not in own or state_dict[key].shape == own[leaf].shape:
                continue
            if state_dict[key].ndim == own[leaf].ndim:  # else another generation strategy: reported below
                if _line_length(module, state_dict[key]) != module.seq_len:
                    state_dict[key] = resample_op_state(
                        state_dict[key], leaf.split('.')[-1], module.generation, module.seq_len)
    expected = model.state_dict()
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    classifier = cfg.get('classifier', 'head')
    first_convs = cfg.get('first_conv') or ()
    first_convs = {f'{name}.weight' for name in ((first_convs,) if isinstance(first_convs, str) else first_convs)}

    def fits(name: str, tensor: torch.Tensor) -> bool:
        own = expected[name].shape
        if tensor.shape == own or name.startswith(classifier + '.'):
            return True
        # another number of input channels only (dim 1 of a conv weight)
        return name in first_convs and tensor.ndim == 4 and tensor.shape[:1] + tensor.shape[2:] == own[:1] + own[2:]

    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected and not k.startswith(classifier + '.')]  # no head
    wrong = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}'
             for k, v in state_dict.items() if k in expected and not fits(k, v)]
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f'{len(missing)} missing (e.g. {missing[0]})')
        if unexpected:
            problems.append(f'{len(unexpected)} unexpected (e.g. {unexpected[0]})')
        if wrong:
            problems.append(f'{len(wrong)} of another shape (e.g. {wrong[0]})')
        raise ValueError(
            'the checkpoint does not fit this DynaMixer (' + '; '.join(problems) + '): it was saved from '
            'another variant or configuration; build the model with the same variant and arguments it was '
            'trained with (its config.json or args.yaml says which).')
    return state_dict
