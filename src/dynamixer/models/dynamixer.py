""" DynaMixer

A PyTorch implementation of `DynaMixer: A Vision MLP Architecture with Dynamic Mixing`
    - https://arxiv.org/abs/2201.12083 (Wang, Jiang, Zhu, Yuan, Song, Liu, ICML 2022)

DynaMixer mixes tokens along image rows and columns with N x N matrices that are *generated from the
content of the tokens being mixed*: channels are compressed to a tiny dimension d, the compressed line is
flattened and a shared linear layer turns it into one mixing matrix per channel segment.

Beyond the paper (whose official code only runs at 224 x 224):
    * builds for any ``img_size`` (non-square too), with the right line length per stage;
    * ``dynamic_img_size=True`` runs at any input size without rebuilding, mixing in windows of the
      trained line length (lines padded and masked where they do not fill a window);
    * checkpoints trained at one size load into a model built for another (``models/state_dict.py``);
    * the paper's ablation knobs (generation strategy, segments, reduced dim, row/column sharing, fusion)
      are constructor arguments of every variant.

Parameter names are our own; ``dynamixer.convert_official_state_dict`` maps official checkpoints onto them.
"""
import dataclasses
from functools import partial
from pathlib import Path
from typing import Any, Dict, Final, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as _nn_module  # global forward hooks (torch keeps them module-level)

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, get_device_dtype, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_function, register_notrace_module
from timm.models._helpers import load_state_dict
from timm.models._manipulate import checkpoint_seq

from dynamixer.models import cpu_stem
from dynamixer.models.state_dict import adapt_state_dict
from dynamixer.models.vip import PermuteMixer, branch_means, reweight_branches
from dynamixer.models.fused import (
    FastPath, autocast_dtype, branch_mixing, eager_cpu_inference, fuse_branches, layer_norm, linear, linear_add,
    linear_gelu, mix_project, onednn_fp32, onednn_inference, softmax)

__all__ = ['DynaMixer', 'DynaMixerOp', 'DynaMixerTokenMixer', 'MixerLayer', 'FastPath', 'GENERATION_STRATEGIES',
           'FUSIONS', 'TOKEN_MIXERS', 'compile_model', 'patch_linear']

GENERATION_STRATEGIES = ('dynamic', 'static', 'dense')
FUSIONS = ('reweight', 'sum')
TOKEN_MIXERS = ('dynamixer', 'permute')  # 'permute': ViP's Permute-MLP (models/vip.py), the paper's baseline
STEMS = ('patch', 'conv', 'conv_strided')


def _hooked(modules) -> bool:
    """Whether forward or backward hooks sit on any of ``modules`` or globally: a shortcut that bypasses a
    module's call must not skip its hooks (e.g. ``dynamixer visualize`` hooks the token mixer), so callers then
    run the modules."""
    if (_nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks
            or _nn_module._global_backward_hooks or _nn_module._global_backward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in modules)


def _plain(linears) -> bool:
    """Whether the fused kernels may read these layers' weights instead of calling them: each is exactly an
    ``nn.Linear`` (not a LoRA / quantized / pruned / parametrized stand-in) and nothing hooks it."""
    return all(type(m) is nn.Linear and not m._parameters.keys() - {'weight', 'bias'} for m in linears) \
        and not _hooked(linears)


def _traced(x: torch.Tensor) -> bool:
    """Whether ``x`` is a symbolic value of FX tracing: the fast path reads devices, dtypes and grad modes that
    FX cannot record, so traced graphs get the plain modules."""
    return isinstance(x, torch.fx.Proxy)


def _per_stage(value: Union[Any, Sequence[Any]], num_stages: int, name: str) -> Tuple[Any, ...]:
    """Accept one value for all stages or one per stage."""
    if isinstance(value, (list, tuple)):
        if len(value) != num_stages:
            raise ValueError(f'{name} has {len(value)} entries but the model has {num_stages} stages; '
                             f'give one value or one per stage.')
        return tuple(value)
    return (value,) * num_stages


class DynaMixerOp(nn.Module):
    """Mixes the N tokens of each line with one N x N matrix per channel segment.

    Input ``(L, N, C)`` (L lines of N tokens), output the same shape. ``generation`` picks how the
    matrices are made: ``dynamic`` (the paper: from the whole line), ``static`` (learned, input-independent)
    or ``dense`` (each output token's row from that token alone).

    The ``generate`` layer's outputs are laid out output-token-major, so that ``G.view(N_out, N_in)`` is
    softmax-normalised over contiguous memory (the official layout is input-major; the converter permutes).
    """
    __jit_ignored_attributes__ = ['fast_path']  # scripted modules run the plain path
    seq_len: Final[int]
    num_segments: Final[int]
    reduced_dim: Final[int]
    generation: Final[str]

    def __init__(
            self,
            dim: int,
            seq_len: int,
            num_segments: int = 8,
            reduced_dim: int = 2,
            generation: str = 'dynamic',
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if generation not in GENERATION_STRATEGIES:
            raise ValueError(f'generation must be one of {GENERATION_STRATEGIES}, got {generation!r}.')
        if dim % num_segments:
            raise ValueError(f'width {dim} is not divisible by num_segments={num_segments}; '
                             f'choose a number of segments that divides the width.')
        self.dim = dim
        self.seq_len = seq_len
        self.num_segments = num_segments
        self.reduced_dim = reduced_dim
        self.generation = generation
        if generation == 'static':
            self.compress = None
            self.logits = nn.Parameter(torch.zeros(num_segments, seq_len, seq_len, **dd))
            trunc_normal_(self.logits, std=.02)
        else:
            self.compress = nn.Linear(dim, num_segments * reduced_dim, **dd)
            in_features = seq_len * reduced_dim if generation == 'dynamic' else reduced_dim
            out_features = seq_len * seq_len if generation == 'dynamic' else seq_len
            self.generate = nn.Linear(in_features, out_features, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.fast_path = FastPath()

    def mixing_logits(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Un-normalised mixing matrices, ``(L, S, N_out, N_in)``."""
        N = x.shape[1]
        S, d = self.num_segments, self.reduced_dim
        if self.compress is None:
            return self.logits.unsqueeze(0).expand(x.shape[0], -1, -1, -1)
        z = self.compress(x)
        if valid is not None:
            z = z * valid.unsqueeze(-1).to(z.dtype)  # padding contributes nothing to generation
        z = z.view(-1, N, S, d).transpose(1, 2)  # (L, S, N, d); -1 keeps traced exports batch-dynamic
        if self.generation == 'dynamic':
            return self.generate(z.reshape(-1, S, N * d)).view(-1, S, N, N)
        return self.generate(z)  # dense: row j of the matrix from token j only

    def mixing_matrix(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Row-stochastic mixing matrices P, ``(L, S, N_out, N_in)``: output token j = sum_i P[j, i] x_i."""
        logits = self.mixing_logits(x, valid)
        if valid is not None:
            logits = logits.masked_fill(~valid[:, None, None, :], float('-inf'))
        if not torch.jit.is_scripting():
            if self.fast_path.enabled:
                return softmax(logits)
        return logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        N, C = x.shape[1], x.shape[2]
        if N != self.seq_len:
            raise ValueError(f'this mixing op was built for lines of {self.seq_len} tokens but got {N}; '
                             f'build the model for this input size or use dynamic_img_size=True.')
        mix = self.mixing_matrix(x, valid)  # (L, S, N_out, N_in)
        if not torch.jit.is_scripting():
            if self.fast_path.enabled and _plain((self.proj,)):  # mixing and projection in one fused op
                out, = mix_project(mix[None, :, None], x.unsqueeze(1), self.proj.weight.unsqueeze(0),
                                   self.proj.bias.unsqueeze(0), (False,), self.fast_path)
                return out.view(-1, N, C)
        S = self.num_segments
        mixed = mix @ x.reshape(-1, N, S, C // S).transpose(1, 2)  # each segment's channels mixed: (L, S, N, C/S)
        return self.proj(mixed.transpose(1, 2).reshape(-1, N, C))  # -1: traced exports stay batch-dynamic

    def mix_lines(self, lines: torch.Tensor, allow_windows: bool) -> torch.Tensor:
        """Lines ``(L, n, C)`` of any length: windows of the op's length, the last one padded and masked."""
        n, C = lines.shape[1], lines.shape[2]
        N = self.seq_len
        exporting = False
        if not torch.jit.is_scripting():
            # symbolic lengths in an export (dynamic H, W): windows, which are right for every length
            exporting = torch.compiler.is_exporting() and not isinstance(n, int)
        if not exporting and n == N:
            return self(lines)
        if not allow_windows:
            raise ValueError(f'lines of {n} tokens reached a mixing op built for {N}; '
                             f'build the model for this input size or use dynamic_img_size=True.')
        pad = (N - n % N) % N
        if not torch.jit.is_scripting():
            if exporting:
                # the padding as an unbacked value with its bounds stated: a length's relation to the windows
                # (one window or more, padded or not) then asks no guards that would specialise the export
                pad = torch.tensor(-n).remainder(N).item()
                torch._check(pad >= 0)
                torch._check(pad < N)
                torch._check((n + pad) % N == 0)
        L = lines.shape[0]
        valid = torch.ones_like(lines[..., 0], dtype=torch.bool)  # (L, n)
        windows = F.pad(lines, [0, 0, 0, pad]).view(L, -1, N, C).flatten(0, 1)
        valid = F.pad(valid, [0, pad]).view(L, -1, N).flatten(0, 1)  # padding is invalid
        out = self(windows, valid).view(L, -1, C)
        if exporting:  # a gather: slicing would ask whether the padding is empty
            return out.index_select(1, torch.arange(n, device=out.device))
        return out[:, :n]


@register_notrace_module  # line lengths decide between whole lines and windows: FX keeps the mixer whole
class DynaMixerTokenMixer(nn.Module):
    """Row, column and channel branches on an NHWC map, fused per channel (ViP-style re-weighting)."""
    __jit_ignored_attributes__ = ['fast_path']  # scripted modules run the plain path
    __jit_unused_properties__ = ['column_op']
    dynamic_size: Final[bool]

    def __init__(
            self,
            dim: int,
            line_lengths: Tuple[int, int],
            num_segments: int = 8,
            reduced_dim: int = 2,
            generation: str = 'dynamic',
            share_row_col: bool = False,
            fusion: str = 'reweight',
            dynamic_size: bool = False,
            proj_drop: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f'fusion must be one of {FUSIONS}, got {fusion!r}.')
        height, width = line_lengths
        if share_row_col and height != width:
            raise ValueError(f'share_row_col needs rows and columns of the same length, got {height} x {width} '
                             f'tokens; use a square img_size or share_row_col=False.')
        self.fusion = fusion
        self.dynamic_size = dynamic_size
        op = partial(DynaMixerOp, dim, num_segments=num_segments, reduced_dim=reduced_dim, generation=generation,
                     **dd)
        self.row_mix = op(width)
        self.col_mix = None if share_row_col else op(height)
        self.channel_mix = nn.Linear(dim, dim, bias=False, **dd)
        self.reweight = Mlp(dim, dim // 4, dim * 3, act_layer=act_layer, **dd) if fusion == 'reweight' else None
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.fast_path = FastPath()

    @property
    def column_op(self) -> DynaMixerOp:
        return self.row_mix if self.col_mix is None else self.col_mix

    def mixing_matrices(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Row ``(B, H, S, W, W)`` and column ``(B, W, S, H, H)`` mixing matrices of a map of the built size."""
        if x.shape[1] == x.shape[2]:
            mix = branch_mixing(self, x, (False, True))
            return mix[0], mix[1]
        return branch_mixing(self, x, (False,))[0], branch_mixing(self, x, (True,))[0]

    def fusable(self) -> bool:
        """Whether the fused kernels (``fused.fuse_branches``) may serve this mixer: they read the weights of its
        ops' linears, of the channel branch and of the output projection instead of calling them."""
        ops = [self.row_mix] if self.col_mix is None else [self.row_mix, self.col_mix]
        linears = [self.channel_mix, self.proj] + [layer for op in ops for layer in (
            op.compress, getattr(op, 'generate', None), op.proj) if layer is not None]
        return (self.fast_path.enabled and all(type(op) is DynaMixerOp for op in ops) and not _hooked(ops)
                and _plain(linears))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self.fusable():
                return self.proj_drop(linear(fuse_branches(self, x), self.proj.weight, self.proj.bias, self.fast_path))
        return self.proj_drop(self.proj(self.plain_branches(x)))

    def line_branches(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Row and column branches ``(B, H, W, C)``: every line of the map through its op (in windows of the
        built length when the map is larger or smaller)."""
        B, H, W, C = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        columns = x.transpose(1, 2).reshape(-1, H, C)
        if self.col_mix is None:
            cols = self.row_mix.mix_lines(columns, self.dynamic_size)
        else:
            cols = self.col_mix.mix_lines(columns, self.dynamic_size)
        rows = self.row_mix.mix_lines(x.reshape(-1, W, C), self.dynamic_size).view(B, H, W, C)
        return rows, cols.view(B, W, H, C).transpose(1, 2)

    def plain_branches(self, x: torch.Tensor) -> torch.Tensor:
        """The three branches and their fusion, every layer called as a module (hooks, wrappers, quantized
        stand-ins all apply): what ``fused.fuse_branches`` computes faster."""
        rows, cols = self.line_branches(x)
        chans = self.channel_mix(x)
        if self.reweight is None:
            return cols + rows + chans
        return reweight_branches(self.reweight(branch_means(cols, rows, chans)), cols, rows, chans)


class MixerLayer(nn.Module):
    """Pre-norm residual layer: token mixing (DynaMixer's, or ``mixer_layer``), then channel MLP."""
    __jit_ignored_attributes__ = ['fast_path']  # scripted modules run the plain path

    def __init__(
            self,
            dim: int,
            line_lengths: Tuple[int, int],
            mlp_ratio: float = 3.,
            drop_path: float = 0.,
            proj_drop: float = 0.,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            act_layer: Type[nn.Module] = nn.GELU,
            mixer_layer: Type[nn.Module] = DynaMixerTokenMixer,
            device=None,
            dtype=None,
            **mixer_kwargs,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm1 = norm_layer(dim, **dd)
        self.token_mixer = mixer_layer(
            dim, line_lengths, proj_drop=proj_drop, act_layer=act_layer, **dd, **mixer_kwargs)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.fast_path = FastPath()

    def _mlp_fusable(self) -> bool:
        mlp = self.mlp
        return type(mlp) is Mlp and _plain((mlp.fc1, mlp.fc2)) and not _hooked(mlp.modules())

    def _fusable(self, x: torch.Tensor) -> bool:
        """CPU fp32 inference: output projection + residual, fc1 + GELU and fc2 + residual as fused oneDNN
        linears, dropout and drop path skipped (identities in eval), norms called as modules."""
        act, mixer = self.mlp.act, self.token_mixer
        return (self.fast_path.enabled and self.fast_path.cpu_fused_inference and not self.training
                and onednn_inference(x) and type(mixer) is DynaMixerTokenMixer and mixer.fusable()
                and self._mlp_fusable() and type(act) is nn.GELU and act.approximate == 'none'
                and isinstance(self.mlp.norm, nn.Identity) and not _hooked(m for m in self.modules() if m is not self))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        """``self.mlp(x)``, with its linears through oneDNN where ``fused.linear`` can serve them."""
        mlp, fast = self.mlp, self.fast_path
        if not (fast.enabled and fast.onednn_linears and onednn_fp32(x) and self._mlp_fusable()):
            return mlp(x)
        x = mlp.norm(mlp.drop1(mlp.act(linear(x, mlp.fc1.weight, mlp.fc1.bias, fast))))
        return mlp.drop2(linear(x, mlp.fc2.weight, mlp.fc2.bias, fast))

    def _norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        fast = self.fast_path
        dtype = autocast_dtype(x) if fast.enabled and fast.autocast_norms else None
        if dtype is None or type(norm) is not nn.LayerNorm or _hooked((norm,)):
            return norm(x)
        return layer_norm(norm, x, dtype)

    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` with the fast path's kernels wherever they may serve (same values)."""
        if self._fusable(x):  # eval: dropout and drop-path are identities
            proj, fc1, fc2 = self.token_mixer.proj, self.mlp.fc1, self.mlp.fc2
            x = linear_add(fuse_branches(self.token_mixer, self.norm1(x)), proj.weight, proj.bias, x)
            return linear_add(linear_gelu(self.norm2(x), fc1.weight, fc1.bias), fc2.weight, fc2.bias, x)
        x = x + self.drop_path1(self.token_mixer(self._norm(self.norm1, x)))
        x = x + self.drop_path2(self._mlp(self._norm(self.norm2, x)))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self.fast_path.enabled and not _traced(x):
                return self._forward_fast(x)
        x = x + self.drop_path1(self.token_mixer(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class Stem(nn.Module):
    """Non-overlapping patch embedding to an NHWC map; edge pixels that do not fill a patch are dropped, as a
    strided conv does (timm's PatchEmbed insists on divisible sizes, which any-size inputs cannot promise)."""

    __jit_ignored_attributes__ = ['fast_path']  # scripted modules run the conv

    def __init__(self, in_chans: int, dim: int, patch_size: int, device=None, dtype=None):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size, device=device, dtype=dtype)
        self.fast_path = FastPath()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self.fast_path.enabled and _as_linear(self.proj, x):
                return patch_linear(self.proj, x, channels_last=False)
        return self.proj(x).permute(0, 2, 3, 1).contiguous()  # see Downsample.forward


class ConvStem(nn.Module):
    """Overlapping 3 x 3 convolutions down to the patch grid (a deviation from the paper, for small images).

    With ``full_resolution`` one stride-1 conv at the input's resolution, then stride-2 convs until the grid is
    1/patch_size of the input; without it the stride-2 convs only (the full-resolution layer is the most costly
    per FLOP on a CPU: its BatchNorm works on the largest map). Widths double up to ``dim``; BatchNorm and GELU
    between the convs, the last conv linear like a patch embedding. Edge pixels that do not fill a patch are
    dropped first, so the grid is the patch stem's.
    """

    patch_size: Final[int]

    __jit_ignored_attributes__ = ['fast_path']  # scripted modules run the modules

    def __init__(self, in_chans: int, dim: int, patch_size: int, act_layer: Type[nn.Module] = nn.GELU,
                 full_resolution: bool = True, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if patch_size & (patch_size - 1):
            raise ValueError(f"a conv stem needs a power-of-two patch_size (stride-2 convs), got {patch_size}.")
        self.patch_size = patch_size
        num_down = patch_size.bit_length() - 1
        widths = [max(dim >> (num_down - i), 16) for i in range(num_down)]
        strides = [2] * (num_down - 1)
        if full_resolution or not num_down:
            strides = [1] + strides
        else:
            widths = widths[1:]
        layers, in_dim = [], in_chans
        for width, stride in zip(widths or [dim], strides):
            layers += [nn.Conv2d(in_dim, width, 3, stride, 1, bias=False, **dd), nn.BatchNorm2d(width, **dd),
                       act_layer()]
            in_dim = width
        layers.append(nn.Conv2d(in_dim, dim, 3, 2 if num_down else 1, 1, **dd))
        self.convs = nn.Sequential(*layers)
        self.fast_path = FastPath()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        H, W = x.shape[-2], x.shape[-1]
        exporting = False
        if not torch.jit.is_scripting():
            exporting = torch.compiler.is_exporting()
        if exporting:  # cropped by negative padding: a slice would ask whether it crops at all
            x = F.pad(x, [0, W // p * p - W, 0, H // p * p - H])
        else:
            x = x[..., :H // p * p, :W // p * p]
        if not torch.jit.is_scripting():
            if not exporting and self._layers_as_ops(x):
                return cpu_stem.conv_stem(self.convs, x, autocast_dtype(x))
        return self.convs(x).permute(0, 2, 3, 1).contiguous()  # see Downsample

    def _layers_as_ops(self, x: torch.Tensor) -> bool:
        """CPU training in fp32 or bf16: the layers as opaque kernels on one channels-last layout
        (models/cpu_stem.py), where they are exactly the torch modules ConvStem builds and nothing hooks them."""
        fast = self.fast_path
        return (fast.enabled and fast.cpu_stem_ops and fast.cpu_kernels and self.training and not _traced(x)
                and x.device.type == 'cpu' and (autocast_dtype(x) or x.dtype) in (torch.float32, torch.bfloat16)
                and cpu_stem.supported(self.convs) and not _hooked([self.convs, *self.convs]))


def _as_linear(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``patch_linear`` may read this conv's weights instead of calling it (as ``_plain`` for linears);
    FX tracing and torch.export get the conv (its crop of edge pixels needs no size check there)."""
    return (type(conv) is nn.Conv2d and not conv._parameters.keys() - {'weight', 'bias'} and not _hooked((conv,))
            and not _traced(x) and not torch.compiler.is_exporting())


def patch_linear(conv: nn.Conv2d, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``conv`` (kernel = stride, no padding) as one linear over each patch's pixels, to a contiguous NHWC map;
    ``x`` is NHWC if ``channels_last``, else NCHW. Same values as the conv, and no convolution in the graph:
    inductor's layout optimisation stores every 4-D tensor upstream of a graph's last convolution channels-last,
    which for our NHWC token maps would mean strided LayerNorms, adds and mixing in every block before it."""
    s = conv.stride[0]
    if channels_last:
        B, H, W, C = x.shape[0], x.shape[1] // s, x.shape[2] // s, x.shape[3]
        patches = x[:, :H * s, :W * s].reshape(B, H, s, W, s, C).transpose(2, 3).reshape(B, H, W, s * s * C)
        weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, s * s * C)
    else:
        B, C, H, W = x.shape[0], x.shape[1], x.shape[2] // s, x.shape[3] // s
        patches = x[:, :, :H * s, :W * s].reshape(B, C, H, s, W, s).permute(0, 2, 4, 1, 3, 5).reshape(B, H, W, -1)
        weight = conv.weight.reshape(conv.out_channels, C * s * s)
    return F.linear(patches, weight, conv.bias)


@register_notrace_function  # a size check, which FX cannot trace: kept whole in traced graphs
def check_downsample(x: torch.Tensor, stride: int) -> torch.Tensor:
    if x.shape[1] < stride or x.shape[2] < stride:
        raise ValueError(f'the feature map ({x.shape[1]} x {x.shape[2]} tokens) is too small to downsample '
                         f'by {stride}; use a larger input image.')
    return x


class Downsample(nn.Module):
    """Strided conv between stages, on NHWC maps (stride 2 to halve the grid, 1 to change width only)."""
    stride: Final[int]

    __jit_ignored_attributes__ = ['fast_path']  # scripted modules run the conv

    def __init__(self, in_dim: int, out_dim: int, stride: int, device=None, dtype=None):
        super().__init__()
        self.stride = stride
        self.proj = nn.Conv2d(in_dim, out_dim, kernel_size=stride, stride=stride, device=device, dtype=dtype)
        self.fast_path = FastPath()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = check_downsample(x, self.stride)
        if not torch.jit.is_scripting():
            if self.fast_path.enabled and _as_linear(self.proj, x):
                return patch_linear(self.proj, x, channels_last=True)
        # the blocks get a contiguous NHWC map (a no-op when the conv wrote channels-last): a permuted view would
        # be copied by every LayerNorm, forward and backward, and slow every elementwise op of the stage
        return self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).contiguous()


class DynaMixerStage(nn.Module):
    def __init__(
            self,
            in_dim: int,
            dim: int,
            stride: int,
            depth: int,
            line_lengths: Tuple[int, int],
            drop_path_rates: Sequence[float],
            device=None,
            dtype=None,
            **layer_kwargs,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = Downsample(in_dim, dim, stride, **dd) if stride > 1 or in_dim != dim else nn.Identity()
        self.blocks = nn.Sequential(*[
            MixerLayer(dim, line_lengths, drop_path=drop_path_rates[i], **dd, **layer_kwargs) for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


@register_notrace_function  # shape checks, which FX cannot trace: kept whole in traced graphs
def check_images(x: torch.Tensor, in_chans: int, img_size: Tuple[int, int], dynamic_img_size: bool) -> torch.Tensor:
    """``x``, after a ValueError that says what to do where it does not fit (instead of a shape error from
    deep inside)."""
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f'expected images shaped (batch, {in_chans}, H, W), got {_shape(x)}; '
                         f'convert the images to {in_chans} channels or build with in_chans={x.shape[1]}.')
    h, w = img_size
    if not dynamic_img_size and (x.shape[-2] != h or x.shape[-1] != w):
        raise ValueError(f'this model was built for {h}x{w} inputs but got {x.shape[-2]}x{x.shape[-1]}; '
                         f'resize the input to {h}x{w}, build with img_size=({x.shape[-2]}, {x.shape[-1]}), '
                         f'or pass dynamic_img_size=True.')
    return x


def _shape(x: torch.Tensor) -> str:
    return '(' + ', '.join([str(size) for size in x.shape]) + ')'


class DynaMixer(nn.Module):
    """DynaMixer network: patch embedding, four stages of mixer layers, norm, pooled linear head.

    Args:
        img_size: input size the model is built for (int or (H, W)); sets the line length of every stage.
        patch_size: patch embedding kernel and stride (7 in the paper).
        depths, embed_dims: layers and width per stage.
        stage_strides: 2 where a stage starts by halving the grid (the paper's "transition").
        num_segments: S, the number of channel segments with their own mixing matrix (per stage or one).
        reduced_dims: d, channels per segment fed to the generator (per stage or one).
        generation: 'dynamic' (paper), 'static' (learned fixed matrices) or 'dense' (per-token rows).
        share_row_col: one mixing op for rows and columns.
        fusion: 'reweight' (official, per-channel softmax over branches) or 'sum' (paper's pseudo-code).
        token_mixer: 'dynamixer' (the paper), or 'permute': ViP's Permute-MLP (``models/vip.py``) in the same
            network, the paper's baseline (fixed learned mixing over each line; ``num_segments`` and ``fusion``
            apply, the generation options do not).
        dynamic_img_size: accept any input size, mixing in windows of the built line length.
        window_size: the line length every mixing op is built for (one value, or one per stage), instead of the
            built grid's: lines of any length are then mixed in windows of this many tokens (needs
            ``dynamic_img_size=True``). What makes a dense-prediction pyramid affordable: at stride 4 a 360 x 480
            image has lines of 90 and 120 tokens, and a generated N x N matrix costs N^2 per token.
        stem: 'patch' (the paper: one non-overlapping conv), 'conv' (overlapping 3 x 3 convs with BatchNorm down
            to the same grid, the first at full resolution; dynamixer_cifar_xs) or 'conv_strided' (the same without
            the full-resolution layer, cheaper); the conv stems are deviations from the paper (docs/cifar10.md).
        fast_path: True (default) lets the modules use the fused kernels of ``fused.py`` where they may (same values
            and gradients), False always calls the plain modules, a ``FastPath`` picks kernels one by one;
            ``set_fast_path`` changes it later, for this model only. FX tracing and TorchScript always get the
            plain modules (FX keeps the token mixers whole, as leaves).
        weight_init: 'trunc_normal' (official: linear weights with std 0.02) or 'fan_in' (std 1/sqrt(fan-in)).
            At the paper's widths the two are close; in narrow models (32-64 channels) std 0.02 leaves every
            residual branch near zero and training idles for epochs (docs/training.md).
        device, dtype: where and in what precision the parameters are created (e.g. ``device='meta'``).

    ``forward_features`` returns NHWC maps (``output_fmt``); ``forward_intermediates`` NCHW or NHWC.
    """
    __jit_ignored_attributes__ = ['fast_path']  # scripted models run the plain path
    dynamic_img_size: Final[bool]

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 7,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            depths: Sequence[int] = (4, 3, 8, 3),
            embed_dims: Sequence[int] = (192, 384, 384, 384),
            stage_strides: Sequence[int] = (1, 2, 1, 1),
            num_segments: Union[int, Sequence[int]] = (8, 16, 16, 16),
            reduced_dims: Union[int, Sequence[int]] = 2,
            mlp_ratios: Union[float, Sequence[float]] = 3.,
            generation: str = 'dynamic',
            share_row_col: bool = False,
            fusion: str = 'reweight',
            token_mixer: str = 'dynamixer',
            dynamic_img_size: bool = False,
            window_size: Optional[Union[int, Sequence[int]]] = None,
            weight_init: str = 'trunc_normal',
            stem: str = 'patch',
            fast_path: Union[bool, FastPath] = True,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            act_layer: Type[nn.Module] = nn.GELU,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if global_pool not in ('', 'avg'):
            raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}.")
        if weight_init not in ('trunc_normal', 'fan_in'):
            raise ValueError(f"weight_init must be 'trunc_normal' or 'fan_in', got {weight_init!r}.")
        num_stages = len(depths)
        embed_dims = _per_stage(embed_dims, num_stages, 'embed_dims')
        stage_strides = _per_stage(stage_strides, num_stages, 'stage_strides')
        num_segments = _per_stage(num_segments, num_stages, 'num_segments')
        reduced_dims = _per_stage(reduced_dims, num_stages, 'reduced_dims')
        mlp_ratios = _per_stage(mlp_ratios, num_stages, 'mlp_ratios')
        self.img_size = to_2tuple(img_size)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.dynamic_img_size = dynamic_img_size
        self.weight_init = weight_init
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.output_fmt = 'NHWC'
        self.feature_dim = -1  # channels last, in the features and (pooled or not) in the head's output
        self.grad_checkpointing = False

        if token_mixer not in TOKEN_MIXERS:
            raise ValueError(f'token_mixer must be one of {TOKEN_MIXERS}, got {token_mixer!r}.')
        if token_mixer == 'permute' and (dynamic_img_size or share_row_col or generation != 'dynamic'
                                         or window_size is not None):
            raise ValueError("token_mixer='permute' (ViP) mixes with fixed layers tied to the built size: it takes "
                             "no dynamic_img_size, window_size, share_row_col or generation; drop those options.")
        if window_size is not None and not dynamic_img_size:
            raise ValueError('window_size mixes lines of any length in windows, which needs dynamic_img_size=True; '
                             'pass both, or drop window_size to mix whole lines of the built size.')
        windows = None if window_size is None else _per_stage(window_size, num_stages, 'window_size')
        if stem not in STEMS:
            raise ValueError(f"stem must be 'patch' (the paper), 'conv' or 'conv_strided' (overlapping 3x3 convs, "
                             f"with or without a full-resolution layer), got {stem!r}.")
        self.stem = Stem(in_chans, embed_dims[0], patch_size, **dd) if stem == 'patch' else \
            ConvStem(in_chans, embed_dims[0], patch_size, act_layer, full_resolution=stem == 'conv', **dd)
        grid = tuple(s // patch_size for s in self.img_size)
        if min(grid) < 1:
            raise ValueError(f'img_size {self.img_size} is smaller than one patch of {patch_size}; '
                             f'use img_size >= patch_size.')

        self._elems_per_image = 0  # largest temporary per image at the built size (MLP hidden or mixing matrices)
        rates = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
        dpr = [rates[sum(depths[:i]):sum(depths[:i + 1])] for i in range(num_stages)]
        stages = []
        self.feature_info = []
        in_dim, reduction = embed_dims[0], patch_size
        for i in range(num_stages):
            if stage_strides[i] > 1:
                grid = tuple(g // stage_strides[i] for g in grid)
                reduction *= stage_strides[i]
                if min(grid) < 1:
                    raise ValueError(f'img_size {self.img_size} leaves no tokens in stage {i}; use a larger img_size '
                                     f'or fewer downsampling stages.')
            if token_mixer == 'permute':
                mixer = dict(mixer_layer=PermuteMixer, num_segments=num_segments[i], fusion=fusion)
            else:
                mixer = dict(num_segments=num_segments[i], reduced_dim=reduced_dims[i], generation=generation,
                             share_row_col=share_row_col, fusion=fusion, dynamic_size=dynamic_img_size)
            line_lengths = grid if windows is None else (windows[i], windows[i])
            stages.append(DynaMixerStage(
                in_dim, embed_dims[i], stage_strides[i], depths[i], line_lengths, dpr[i], mlp_ratio=mlp_ratios[i],
                proj_drop=proj_drop_rate, norm_layer=norm_layer, act_layer=act_layer, **dd, **mixer))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=reduction, module=f'stages.{i}'))
            tokens = grid[0] * grid[1]
            self._elems_per_image = max(self._elems_per_image, int(tokens * embed_dims[i] * mlp_ratios[i]),
                                        num_segments[i] * tokens * sum(line_lengths))
            in_dim = embed_dims[i]
        self.stages = nn.Sequential(*stages)
        self.norm = norm_layer(self.num_features, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        self.fast_path = fast_path if isinstance(fast_path, FastPath) else FastPath(enabled=bool(fast_path))
        self.set_fast_path()

    def set_fast_path(self, enabled: Optional[bool] = None, **options: Any) -> 'DynaMixer':
        """Change this model's fast path (and only this model's): ``enabled=False`` runs the plain modules,
        other keywords are :class:`FastPath` fields, e.g. ``set_fast_path(onednn_linears=False)``. Every
        submodule gets its own copy of the result."""
        if enabled is not None:
            options['enabled'] = enabled
        unknown = sorted(set(options) - set(FastPath.__dataclass_fields__))
        if unknown:
            raise ValueError(f'unknown fast-path option(s) {", ".join(unknown)}; choose from '
                             f'{", ".join(FastPath.__dataclass_fields__)}.')
        self.fast_path = dataclasses.replace(self.fast_path, **options)
        for module in self.modules():
            if module is not self and isinstance(getattr(module, 'fast_path', None), FastPath):
                module.fast_path = dataclasses.replace(self.fast_path)
        return self

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=m.in_features ** -0.5 if self.weight_init == 'fan_in' else .02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('', 'avg'):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}.")
            self.global_pool = global_pool
        dd = get_device_dtype(self)  # a new head where the rest of the model is, in its precision
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)
        if num_classes > 0:
            self._init_weights(self.head)

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x``, after a ValueError that says what to do where it does not fit the model."""
        return check_images(x, self.in_chans, self.img_size, self.dynamic_img_size)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features after each chosen stage (NCHW or NHWC), optionally with the final normed features."""
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}.")
        x = self.check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages if not stop_early or torch.jit.is_scripting() else self.stages[:max_index + 1]
        intermediates = []
        x = self.stem(x)
        last = len(self.stages) - 1
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                y = self.norm(x) if norm and i == last else x
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == 'NCHW' else y)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def _inference_slice(self, x: torch.Tensor) -> int:
        """Images per slice for CPU inference under ``fast_path.inference_slice_bytes``, or 0: the whole batch.
        Same multiply-adds, same outputs (no layer mixes images); tracing, compiling and export see the whole
        batch."""
        budget = self.fast_path.inference_slice_bytes if self.fast_path.enabled else 0
        if budget <= 0 or not eager_cpu_inference(x):
            return 0
        pixels = x.shape[-2] * x.shape[-1] / (self.img_size[0] * self.img_size[1])
        per_image = max(1., self._elems_per_image * pixels) * x.element_size()
        step = max(1, int(budget // per_image))
        return step if step < x.shape[0] else 0

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.stages(self.stem(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normed NHWC features of the last stage."""
        x = self.check_input(x)
        if not torch.jit.is_scripting():
            step = 0 if _traced(x) else self._inference_slice(x)
            if step:
                return torch.cat([self._features(part) for part in x.split(step)])
        return self._features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def compile_model(model: nn.Module, **kwargs) -> nn.Module:
    """``torch.compile(model, **kwargs)``: kept as an alias. The model needs no compile option: its strided convs
    between stages run as linears (``patch_linear``), so inductor's layout optimisation, which stores every 4-D
    tensor upstream of a graph's last convolution channels-last, reaches the conv stem only, never the blocks'
    (B, H, W, C) maps."""
    return torch.compile(model, **kwargs)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: DynaMixer) -> Dict[str, torch.Tensor]:
    """timm's hook for pretrained loading: official layouts, other input sizes and mismatches handled."""
    return adapt_state_dict(state_dict, model)


def _raised_in(error: BaseException, function: Any) -> bool:
    """Whether ``error`` was raised inside ``function`` (its traceback passes through it)."""
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is function.__code__:
            return True
        tb = tb.tb_next
    return False


def _create_dynamixer(variant: str, pretrained: bool = False, **kwargs) -> DynaMixer:
    out_indices = kwargs.pop('out_indices', tuple(range(len(kwargs.get('depths', (4, 3, 8, 3))))))  # every stage
    cfg = kwargs.get('pretrained_cfg')
    if isinstance(cfg, dict) and cfg.get('source') == 'local-dir':
        # A model folder is its weights: `timm.create_model('local-dir:DIR')` should not silently return an
        # untrained model just because `pretrained=True` was left out.
        pretrained = True
    weights = None
    if pretrained and not (isinstance(cfg, dict) and cfg.get('source') == 'local-dir'):  # a folder checks itself
        from timm.models._builder import resolve_pretrained_cfg
        resolved = resolve_pretrained_cfg(variant, cfg, kwargs.get('pretrained_cfg_overlay'))
        weights = resolved.file if resolved.file and not resolved.state_dict else None
        if not (weights or resolved.url or resolved.hf_hub_id or resolved.state_dict):
            tags = [n for n in _trained_tags() if n.startswith(variant + '.')]
            raise ValueError(f'{variant}.{resolved.tag or "untrained"} has no pretrained weights; '
                             + (f'use {" or ".join(tags)}.' if tags else 'create it with pretrained=False.'))
        if weights and not Path(weights).is_file():
            raise FileNotFoundError(f'the pretrained weights of {variant}.{resolved.tag} should be at {weights} '
                                    f'but that file does not exist; reinstall dynamixer (pip install -e .).')
    try:
        return build_model_with_cfg(
            DynaMixer, variant, pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
            **kwargs)
    except Exception as e:  # say which file, and blame it only for what is the file's
        if weights is None:
            raise
        if _raised_in(e, load_state_dict):  # timm could not read it
            raise ValueError(f'could not read the pretrained weights {weights} ({type(e).__name__}: '
                             f'{str(e).splitlines()[0] if str(e) else ""}); the file is damaged: reinstall '
                             f'dynamixer, or give an intact file saved from {variant}.') from None
        if _raised_in(e, adapt_state_dict):  # read, but of another variant or configuration than this build
            raise ValueError(f'the pretrained weights {weights} do not fit {variant} as built: {e}') from None
        raise


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': .9, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.proj', 'classifier': 'head', 'license': 'mit',
        'paper_ids': 'arXiv:2201.12083', 'paper_name': 'DynaMixer: A Vision MLP Architecture with Dynamic Mixing',
        **kwargs,
    }


CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

# Architectures in one place. S/M/L are the paper's (224 x 224); the cifar ones are ours, for 32 x 32 images.
MODEL_ARGS: Dict[str, Dict[str, Any]] = {
    'dynamixer_s': dict(
        depths=(4, 3, 8, 3), embed_dims=(192, 384, 384, 384), stage_strides=(1, 2, 1, 1),
        num_segments=(8, 16, 16, 16), reduced_dims=2),
    'dynamixer_m': dict(
        depths=(4, 3, 14, 3), embed_dims=(256, 256, 512, 512), stage_strides=(1, 1, 2, 1),
        num_segments=(8, 8, 16, 16), reduced_dims=2),
    'dynamixer_l': dict(
        depths=(8, 8, 16, 4), embed_dims=(256, 512, 512, 512), stage_strides=(1, 2, 1, 1),
        num_segments=(8, 16, 16, 16), reduced_dims=8),
    'dynamixer_cifar_t': dict(
        img_size=32, patch_size=2, depths=(2, 2, 4, 2), embed_dims=(64, 128, 128, 128),
        stage_strides=(1, 2, 1, 1), num_segments=(4, 8, 8, 8), reduced_dims=2),
    'dynamixer_cifar_s': dict(
        img_size=32, patch_size=2, depths=(2, 2, 6, 2), embed_dims=(96, 192, 192, 192),
        stage_strides=(1, 2, 1, 1), num_segments=(8, 16, 16, 16), reduced_dims=2),
    # Sized for an hour of training on a 2-core CPU (docs/cifar10.md): the official code's small CIFAR shape
    # (patch 4, two stages) with an overlapping conv stem instead of the paper's patch embedding.
    'dynamixer_cifar_xs': dict(
        img_size=32, patch_size=4, depths=(2, 4), embed_dims=(96, 192), stage_strides=(1, 2),
        num_segments=(4, 8), reduced_dims=2, stem='conv', weight_init='fan_in'),
    # The paper's baseline for the comparisons of docs/ablations.md: dynamixer_cifar_xs with ViP's Permute-MLP
    # as token mixer (same stem, stages, MLPs and fusion; 7% fewer parameters).
    'vip_cifar_xs': dict(
        img_size=32, patch_size=4, depths=(2, 4), embed_dims=(96, 192), stage_strides=(1, 2),
        num_segments=(4, 8), stem='conv', weight_init='fan_in', token_mixer='permute'),
    # Four-stage pyramids (strides 4, 8, 16, 32) for dense prediction, sized for an hour of CamVid training on a
    # 2-core CPU (docs/segmentation.md). The DynaMixer one mixes every line in windows of 16 tokens at any input
    # size; the ViP one is the paper's baseline in the same pyramid, tied to its built size (256 x 256 crops).
    'dynamixer_pyramid_t': dict(
        img_size=256, patch_size=4, depths=(2, 2, 4, 2), embed_dims=(32, 64, 128, 256), stage_strides=(1, 2, 2, 2),
        num_segments=(4, 8, 8, 16), reduced_dims=2, stem='conv_strided', weight_init='fan_in',
        dynamic_img_size=True, window_size=16),
    'vip_pyramid_t': dict(
        img_size=256, patch_size=4, depths=(2, 2, 4, 2), embed_dims=(32, 64, 128, 256), stage_strides=(1, 2, 2, 2),
        num_segments=(4, 8, 8, 16), stem='conv_strided', weight_init='fan_in', token_mixer='permute'),
}

_CIFAR_CFG = dict(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0, mean=CIFAR_MEAN, std=CIFAR_STD)
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
# Weights shipped inside the package (fp16 safetensors, a few MB), trained by the documented commands.
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / 'weights'


def _trained_tags() -> List[str]:
    return [name for name, cfg in default_cfgs.items() if cfg.default.file]
# pool_size: the (H, W) of forward_features at input_size, in tokens
default_cfgs = generate_default_cfgs({
    'dynamixer_s.untrained': _cfg(pool_size=(16, 16)),
    'dynamixer_m.untrained': _cfg(pool_size=(16, 16)),
    'dynamixer_l.untrained': _cfg(pool_size=(16, 16), crop_pct=.875),
    'dynamixer_cifar_t.untrained': _cfg(**_CIFAR_CFG, pool_size=(8, 8)),
    'dynamixer_cifar_s.untrained': _cfg(**_CIFAR_CFG, pool_size=(8, 8)),
    'dynamixer_cifar_xs.untrained': _cfg(**_CIFAR_CFG, pool_size=(4, 4), first_conv='stem.convs.0'),
    'vip_cifar_xs.untrained': _cfg(
        **_CIFAR_CFG, pool_size=(4, 4), first_conv='stem.convs.0', paper_ids='arXiv:2106.12368',
        paper_name='Vision Permutator: A Permutable MLP-Like Architecture for Visual Recognition'),
    'dynamixer_pyramid_t.untrained': _cfg(input_size=(3, 256, 256), pool_size=(8, 8), crop_pct=1.0,
                                          fixed_input_size=False, first_conv='stem.convs.0'),
    'vip_pyramid_t.untrained': _cfg(
        input_size=(3, 256, 256), pool_size=(8, 8), crop_pct=1.0, first_conv='stem.convs.0',
        paper_ids='arXiv:2106.12368',
        paper_name='Vision Permutator: A Permutable MLP-Like Architecture for Visual Recognition'),
    # `dynamixer train --recipe cifar --data PATH/cifar10 --val-split 0.1` (45,000 of CIFAR-10's training
    # images, the held-out 5,000 never seen): docs/cifar10.md
    'dynamixer_cifar_xs.cifar10_1h': _cfg(
        **_CIFAR_CFG, pool_size=(4, 4), first_conv='stem.convs.0', label_names=CIFAR10_CLASSES,
        file=str(WEIGHTS_DIR / 'dynamixer_cifar_xs.cifar10_1h.safetensors')),
})


def _build(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> DynaMixer:
    return _create_dynamixer(variant, pretrained=pretrained, **dict(MODEL_ARGS[variant], **kwargs))


@register_model
def dynamixer_s(pretrained: bool = False, **kwargs) -> DynaMixer:
    """DynaMixer-S: 26.3M params, 7.3 GMACs at 224, 82.7% ImageNet top-1 in the paper."""
    return _build('dynamixer_s', pretrained, kwargs)


@register_model
def dynamixer_m(pretrained: bool = False, **kwargs) -> DynaMixer:
    """DynaMixer-M: 57.1M params, 17.0 GMACs at 224, 83.7% ImageNet top-1 in the paper."""
    return _build('dynamixer_m', pretrained, kwargs)


@register_model
def dynamixer_l(pretrained: bool = False, **kwargs) -> DynaMixer:
    """DynaMixer-L: 97.8M params, 27.3 GMACs at 224, 84.3% ImageNet top-1 in the paper."""
    return _build('dynamixer_l', pretrained, kwargs)


@register_model
def dynamixer_cifar_t(pretrained: bool = False, **kwargs) -> DynaMixer:
    """Tiny DynaMixer for 32 x 32 images (patch 2), for CPU-scale training and ablations."""
    return _build('dynamixer_cifar_t', pretrained, kwargs)


@register_model
def dynamixer_cifar_s(pretrained: bool = False, **kwargs) -> DynaMixer:
    """Small DynaMixer for 32 x 32 images (patch 2)."""
    return _build('dynamixer_cifar_s', pretrained, kwargs)


@register_model
def dynamixer_cifar_xs(pretrained: bool = False, **kwargs) -> DynaMixer:
    """DynaMixer for 32 x 32 images sized for one CPU hour: conv stem to 8 x 8 tokens, two stages (96, 192)."""
    return _build('dynamixer_cifar_xs', pretrained, kwargs)


@register_model
def vip_cifar_xs(pretrained: bool = False, **kwargs) -> DynaMixer:
    """ViP (Vision Permutator) baseline for 32 x 32 images: ``dynamixer_cifar_xs`` with the Permute-MLP mixer."""
    return _build('vip_cifar_xs', pretrained, kwargs)


@register_model
def dynamixer_pyramid_t(pretrained: bool = False, **kwargs) -> DynaMixer:
    """DynaMixer pyramid for dense prediction: strides 4-32, widths (32, 64, 128, 256), windows of 16 tokens at
    any input size; the backbone of ``dynamixer train --recipe camvid``."""
    return _build('dynamixer_pyramid_t', pretrained, kwargs)


@register_model
def vip_pyramid_t(pretrained: bool = False, **kwargs) -> DynaMixer:
    """ViP baseline in the same pyramid as ``dynamixer_pyramid_t``, tied to its built size (256 x 256)."""
    return _build('vip_pyramid_t', pretrained, kwargs)
