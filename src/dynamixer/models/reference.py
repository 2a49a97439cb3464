"""A plain DynaMixer, written step by step from the equations: the correctness oracle and the benchmark baseline.

Each step is one line, in the order of the official code: per-branch permute + reshape into lines, compress,
flatten each segment token-major, generate, reshape to ``(N_out, N_in)``, softmax over the input tokens,
matmul with the segment's channels, concatenate, output projection; then the ViP-style fusion of the column,
row and channel branches. Parameter names and shapes are exactly those of
:class:`dynamixer.models.dynamixer.DynaMixerOp` / :class:`DynaMixerTokenMixer`, so one state dict loads into
both. Nothing here is tuned for speed; inputs whose lines are not the built length (``dynamic_img_size``)
are mixed in windows by a plain loop, the last window zero-padded and masked.

``reference_model(model)`` returns a copy of a :class:`DynaMixer` whose token mixers are these (same weights).
"""
import copy
from typing import Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from dynamixer.models.dynamixer import DynaMixerTokenMixer, FUSIONS, GENERATION_STRATEGIES, MixerLayer

__all__ = ['ReferenceDynaMixerOp', 'ReferenceTokenMixer', 'reference_model']


class ReferenceDynaMixerOp(nn.Module):
    """One DynaMixer operation on ``(L, N, C)`` lines, same parameters as ``DynaMixerOp``."""

    def __init__(self, dim: int, seq_len: int, num_segments: int = 8, reduced_dim: int = 2,
                 generation: str = 'dynamic'):
        super().__init__()
        assert generation in GENERATION_STRATEGIES and dim % num_segments == 0
        self.dim, self.seq_len, self.num_segments, self.reduced_dim = dim, seq_len, num_segments, reduced_dim
        self.generation = generation
        if generation == 'static':
            self.compress = None
            self.logits = nn.Parameter(torch.zeros(num_segments, seq_len, seq_len))
        else:
            self.compress = nn.Linear(dim, num_segments * reduced_dim)
            if generation == 'dynamic':
                self.generate = nn.Linear(seq_len * reduced_dim, seq_len * seq_len)
            else:
                self.generate = nn.Linear(reduced_dim, seq_len)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        L, N, C = x.shape
        S, d = self.num_segments, self.reduced_dim
        if self.generation == 'static':
            weights = self.logits.unsqueeze(0).expand(L, S, N, N)                  # (L, S, N_out, N_in)
        else:
            z = self.compress(x)                                                    # (L, N, S*d)
            if valid is not None:
                z = z * valid.unsqueeze(-1).to(z.dtype)                             # padding generates nothing
            z = z.reshape(L, N, S, d).permute(0, 2, 1, 3)                           # (L, S, N, d)
            if self.generation == 'dynamic':
                weights = self.generate(z.reshape(L, S, N * d)).reshape(L, S, N, N)  # (L, S, N_out, N_in)
            else:
                weights = self.generate(z)                                          # dense: row j from token j
        if valid is not None:
            weights = weights.masked_fill(~valid[:, None, None, :], float('-inf'))  # never mix in padding
        weights = weights.softmax(dim=-1)                                           # over input tokens
        x = x.reshape(L, N, S, C // S).permute(0, 2, 1, 3)                          # (L, S, N, C/S)
        x = torch.matmul(weights, x)                                                # (L, S, N, C/S)
        x = x.permute(0, 2, 1, 3).reshape(L, N, C)                                  # segments back together
        return self.proj(x)


def reference_mix_lines(op: ReferenceDynaMixerOp, lines: torch.Tensor, allow_windows: bool) -> torch.Tensor:
    """Lines of any length: a loop over windows of the op's length, the last one padded and masked."""
    L, n, C = lines.shape
    N = op.seq_len
    if n == N:
        return op(lines)
    if not allow_windows:
        raise ValueError(f'lines of {n} tokens reached a mixing op built for {N}; use dynamic_img_size=True.')
    outputs = []
    for start in range(0, n, N):
        window = lines[:, start:start + N]
        length = window.shape[1]
        window = F.pad(window, (0, 0, 0, N - length))
        valid = (torch.arange(N, device=lines.device) < length).unsqueeze(0).expand(L, N)
        outputs.append(op(window, valid)[:, :length])
    return torch.cat(outputs, dim=1)


class ReferenceTokenMixer(nn.Module):
    """Row, column and channel branches with the official fusion; same parameters as ``DynaMixerTokenMixer``."""

    def __init__(self, dim: int, line_lengths: Tuple[int, int], num_segments: int = 8, reduced_dim: int = 2,
                 generation: str = 'dynamic', share_row_col: bool = False, fusion: str = 'reweight',
                 dynamic_size: bool = False, proj_drop: float = 0., act_layer: Type[nn.Module] = nn.GELU):
        super().__init__()
        assert fusion in FUSIONS
        height, width = line_lengths
        self.fusion, self.dynamic_size = fusion, dynamic_size
        kwargs = dict(num_segments=num_segments, reduced_dim=reduced_dim, generation=generation)
        self.row_mix = ReferenceDynaMixerOp(dim, width, **kwargs)
        self.col_mix = None if share_row_col else ReferenceDynaMixerOp(dim, height, **kwargs)
        self.channel_mix = nn.Linear(dim, dim, bias=False)
        self.reweight = Mlp(dim, dim // 4, dim * 3, act_layer=act_layer) if fusion == 'reweight' else None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_mixer(cls, mixer: DynaMixerTokenMixer) -> 'ReferenceTokenMixer':
        """A reference mixer with the same configuration and a copy of the weights of ``mixer``."""
        row, col = mixer.row_mix, mixer.column_op
        act_layer = type(mixer.reweight.act) if mixer.reweight is not None else nn.GELU
        ref = cls(row.dim, (col.seq_len, row.seq_len), row.num_segments, row.reduced_dim, row.generation,
                  share_row_col=mixer.col_mix is None, fusion=mixer.fusion, dynamic_size=mixer.dynamic_size,
                  proj_drop=mixer.proj_drop.p, act_layer=act_layer)
        param = next(mixer.parameters())
        ref = ref.to(device=param.device, dtype=param.dtype)
        ref.load_state_dict(mixer.state_dict(), strict=True)
        return ref.train(mixer.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        col_op = self.row_mix if self.col_mix is None else self.col_mix
        h = x.permute(0, 2, 1, 3).reshape(B * W, H, C)                             # columns as lines
        h = reference_mix_lines(col_op, h, self.dynamic_size)
        h = h.reshape(B, W, H, C).permute(0, 2, 1, 3)                               # column branch (B, H, W, C)
        w = reference_mix_lines(self.row_mix, x.reshape(B * H, W, C), self.dynamic_size)
        w = w.reshape(B, H, W, C)                                                   # row branch
        c = self.channel_mix(x)                                                     # channel branch
        if self.reweight is None:
            x = h + w + c
        else:
            a = (h + w + c).permute(0, 3, 1, 2).flatten(2).mean(2)                  # (B, C)
            a = self.reweight(a).reshape(B, C, 3).permute(2, 0, 1).softmax(dim=0)   # (3, B, C)
            a = a.unsqueeze(2).unsqueeze(2)                                         # (3, B, 1, 1, C)
            x = h * a[0] + w * a[1] + c * a[2]
        x = self.proj(x)
        return self.proj_drop(x)


def reference_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose ``DynaMixerTokenMixer`` modules are ``ReferenceTokenMixer`` (same weights),
    running every batch whole and every layer as plain ops (no CPU inference slicing, no oneDNN linears,
    no low-precision LayerNorms under autocast: those are part of the fast path)."""
    if isinstance(model, DynaMixerTokenMixer):
        return ReferenceTokenMixer.from_mixer(model)
    ref = copy.deepcopy(model)
    if hasattr(ref, 'inference_slice_bytes'):
        ref.inference_slice_bytes = 0
    for name, module in list(ref.named_modules()):
        if isinstance(module, MixerLayer):
            module.cpu_fused_inference = module.autocast_norms = module.onednn_linears = False
        if isinstance(module, DynaMixerTokenMixer):
            parent_name, _, child = name.rpartition('.')
            parent = ref.get_submodule(parent_name) if parent_name else ref
            setattr(parent, child, ReferenceTokenMixer.from_mixer(module))
    return ref
