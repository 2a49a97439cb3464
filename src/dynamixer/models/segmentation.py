""" Semantic segmentation: a timm backbone under a light FPN decoder, at any input size

The paper's own limit (its Section 5): generated N x N mixing matrices tie DynaMixer to one input size, which
keeps it out of dense prediction. ``dynamixer_pyramid_t`` mixes every line in windows of a fixed length at any
size, so it is a backbone like any other here: segmentation_models_pytorch's FPN decoder takes it through
timm's ``features_only`` interface (``tu-<name>``), and any other timm backbone (``resnet18``,
``convnext_atto``, ...) goes through the same head for comparisons.

The decoder is smp's FPN at narrow widths (64 channels instead of 256 / 128: prediction at stride 4, then
upsampled; on a CPU every epoch counts, docs/segmentation.md). FPN adds its levels after 2x upsampling, so it
wants sides divisible by the deepest stride: inputs are padded up to a multiple of it (with zeros, the mean
colour after normalisation) and the logits cropped back, so any image gets a mask of its own size.
"""
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['Segmenter', 'DEFAULT_BACKBONE']

from dynamixer.tasks import DEFAULT_SEGMENTATION_BACKBONE as DEFAULT_BACKBONE


class Segmenter(nn.Module):
    """``backbone`` (a timm model name) + smp's FPN decoder; ``forward`` maps (B, C, H, W) images of any size to
    (B, num_classes, H, W) logits.

    Args:
        backbone: timm model name with a four- or five-level ``features_only`` pyramid (strides 4-32 or 2-32).
        num_classes: classes of the mask (void is not a class).
        in_chans: image channels.
        decoder_channels: width of the FPN's pyramid and of its segmentation blocks (a multiple of 32).
        decoder_dropout: spatial dropout on the merged pyramid.
        backbone_args: keyword arguments for ``timm.create_model(backbone, ...)`` (e.g. ``drop_path_rate``).
    """

    def __init__(
            self,
            backbone: str = DEFAULT_BACKBONE,
            num_classes: int = 11,
            in_chans: int = 3,
            decoder_channels: int = 64,
            decoder_dropout: float = 0.1,
            backbone_args: Optional[Dict[str, Any]] = None,
    ):
        super().__init__()
        if decoder_channels % 32:  # the FPN's segmentation blocks normalise in 32 groups
            raise ValueError(f'decoder_channels must be a multiple of 32 (the FPN uses GroupNorm with 32 groups), '
                             f'got {decoder_channels}.')
        import segmentation_models_pytorch as smp
        import dynamixer  # noqa: F401  registers our backbones with timm
        self.backbone_name = backbone
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.build_args = dict(backbone=backbone, num_classes=num_classes, in_chans=in_chans,
                               decoder_channels=decoder_channels, decoder_dropout=decoder_dropout,
                               backbone_args=dict(backbone_args or {}))
        self.net = smp.FPN(
            encoder_name=f'tu-{backbone}', encoder_weights=None, in_channels=in_chans, classes=num_classes,
            decoder_pyramid_channels=decoder_channels, decoder_segmentation_channels=decoder_channels,
            decoder_dropout=decoder_dropout, **(backbone_args or {}))
        self.stride = self.net.encoder.output_stride
        self.pretrained_cfg: Dict[str, Any] = {}  # preprocessing and labels, set by training (as timm models')

    @property
    def backbone(self) -> nn.Module:
        """The timm backbone (``features_only``) inside the decoder's encoder."""
        return self.net.encoder.model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f'expected images shaped (batch, {self.in_chans}, H, W), got {tuple(x.shape)}.')
        H, W = x.shape[-2:]
        pad_h, pad_w = -H % self.stride, -W % self.stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.net(x)[..., :H, :W]
