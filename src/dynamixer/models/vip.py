""" Vision Permutator's Permute-MLP token mixer, the paper's main baseline

`Vision Permutator: A Permutable MLP-Like Architecture for Visual Recognition`
    - https://arxiv.org/abs/2106.12368 (Hou, Jiang, Yuan, Cheng, Yan, Feng, 2021)

ViP mixes the tokens of each column (and of each row) with one *learned, fixed* linear layer: the channels are
split into S segments, and for each segment the H positions x C/S channels of a column are flattened and mixed
by a linear layer shared by all segments and all columns (likewise W x C/S along rows). A channel linear is the
third branch; the split-attention re-weighting (one softmax over the three branches per channel, from the
pooled map) fuses them, then a projection. DynaMixer keeps this frame and replaces the fixed layer over a line
with mixing matrices generated from the line's content, so the two differ only in the token mixer:
``timm.create_model('vip_cifar_xs')`` is ``dynamixer_cifar_xs`` with ``token_mixer='permute'``.
"""
from typing import Final, Tuple, Type

import torch
import torch.nn as nn
from timm.layers import Mlp
from timm.models._features_fx import register_notrace_module

__all__ = ['PermuteMixer', 'branch_means', 'reweight_branches', 'permute_mixer_params']


def branch_means(height: torch.Tensor, width: torch.Tensor, channel: torch.Tensor) -> torch.Tensor:
    """The spatially pooled sum of three ``(B, H, W, C)`` branches, ``(B, C)``: what ViP's split attention
    (the ``reweight`` MLP) reads."""
    return (height + width + channel).mean(dim=(1, 2))


def reweight_branches(logits: torch.Tensor, height: torch.Tensor, width: torch.Tensor,
                      channel: torch.Tensor) -> torch.Tensor:
    """Fuse three ``(B, H, W, C)`` branches by ViP's split attention: a softmax over the branches per channel of
    ``logits`` ``(B, 3 C)``, the ``reweight`` MLP's output on :func:`branch_means`. Branch order (height, width,
    channel) as in both official codes, so converted weights keep their meaning."""
    weights = logits.view(height.shape[0], height.shape[3], 3).softmax(dim=-1)
    w_height, w_width, w_channel = weights[..., 0], weights[..., 1], weights[..., 2]
    return (height * w_height[:, None, None, :] + width * w_width[:, None, None, :]
            + channel * w_channel[:, None, None, :])


def permute_mixer_params(dim: int, line_lengths: Tuple[int, int], num_segments: int, fusion: str = 'reweight') -> int:
    """Parameters of one :class:`PermuteMixer` (the formula the tests hold the module to)."""
    height, width = line_lengths
    segment = dim // num_segments
    params = (height * segment) ** 2 + (width * segment) ** 2 + dim * dim  # the three branches, no biases
    if fusion == 'reweight':
        params += dim * (dim // 4) + dim // 4 + (dim // 4) * 3 * dim + 3 * dim
    return params + dim * dim + dim  # output projection


@register_notrace_module  # checks the map's size against the built one, which FX cannot trace
class PermuteMixer(nn.Module):
    """ViP's Permute-MLP on an NHWC map built for ``line_lengths = (H, W)`` tokens.

    The layers over a column (``height_mix``, H * C/S features) and over a row (``width_mix``, W * C/S) are tied
    to the built size, so a ViP runs at the size it was built for (any size it is built for, square or not).
    """
    line_lengths: Final[Tuple[int, int]]
    num_segments: Final[int]

    def __init__(
            self,
            dim: int,
            line_lengths: Tuple[int, int],
            num_segments: int = 8,
            fusion: str = 'reweight',
            proj_drop: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if fusion not in ('reweight', 'sum'):
            raise ValueError(f"fusion must be 'reweight' or 'sum', got {fusion!r}.")
        if dim % num_segments:
            raise ValueError(f'width {dim} is not divisible by num_segments={num_segments}; '
                             f'choose a number of segments that divides the width.')
        self.line_lengths = (int(line_lengths[0]), int(line_lengths[1]))
        self.num_segments = num_segments
        segment = dim // num_segments
        height, width = self.line_lengths
        self.height_mix = nn.Linear(height * segment, height * segment, bias=False, **dd)
        self.width_mix = nn.Linear(width * segment, width * segment, bias=False, **dd)
        self.channel_mix = nn.Linear(dim, dim, bias=False, **dd)
        self.reweight = Mlp(dim, dim // 4, dim * 3, act_layer=act_layer, **dd) if fusion == 'reweight' else None
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        if H != self.line_lengths[0] or W != self.line_lengths[1]:
            raise ValueError(f'this ViP layer was built for {self.line_lengths[0]} x {self.line_lengths[1]} tokens '
                             f'but got {H} x {W}; build the model with the img_size of its inputs.')
        S, seg = self.num_segments, C // self.num_segments
        segments = x.reshape(B, H, W, S, seg)
        # every column of every segment flattened to H * seg features, mixed, and put back
        height = segments.permute(0, 2, 3, 1, 4).reshape(B, W, S, H * seg)
        height = self.height_mix(height).view(B, W, S, H, seg).permute(0, 3, 1, 2, 4).reshape(B, H, W, C)
        width = segments.permute(0, 1, 3, 2, 4).reshape(B, H, S, W * seg)
        width = self.width_mix(width).view(B, H, S, W, seg).permute(0, 1, 3, 2, 4).reshape(B, H, W, C)
        channel = self.channel_mix(x)
        if self.reweight is None:
            mixed = height + width + channel
        else:
            mixed = reweight_branches(self.reweight(branch_means(height, width, channel)), height, width, channel)
        return self.proj_drop(self.proj(mixed))
