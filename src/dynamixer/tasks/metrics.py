"""Metrics as objects that accumulate batches, add up over DDP ranks and compute at the end.

Both tasks count a confusion matrix ``[true, predicted]`` and a summed loss; classification adds top-k hits,
segmentation reads IoU and pixel accuracy off its matrix (void pixels never enter it). Sums stay float64 on the
device until ``compute``, so that ranks can ``all_reduce`` them first.
"""
from typing import Any, Dict, List

import torch
import torch.nn.functional as F


class ConfusionMetrics:
    """Summed loss and confusion matrix of ``num_classes`` classes; targets equal to ``ignore_index`` are left
    out of both. ``unreadable`` collects the images the loader had to skip."""

    def __init__(self, num_classes: int, device: torch.device = torch.device('cpu'), ignore_index: int = -100):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
        self.unreadable: List[Any] = []

    def _count(self, targets: torch.Tensor, predicted: torch.Tensor) -> None:
        n = self.num_classes
        self.confusion += torch.bincount(targets * n + predicted, minlength=n * n).view(n, n).double()

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """``logits`` (B, num_classes, ...) and integer ``targets`` (B, ...)."""
        logits = logits.float()
        self.loss_sum += F.cross_entropy(logits, targets, ignore_index=self.ignore_index, reduction='sum').double()
        valid = targets != self.ignore_index
        self._count(targets[valid], logits.argmax(dim=1)[valid])

    def tensors(self) -> List[torch.Tensor]:
        """What ranks add up (``dist.all_reduce`` each in place)."""
        return [self.loss_sum, self.confusion]

    @property
    def count(self) -> int:
        return int(self.confusion.sum().item())

    def compute(self) -> Dict[str, Any]:
        if self.count == 0:
            raise ValueError('no readable validation images (or only void labels); check the data folder.')
        return dict(loss=self.loss_sum.item() / self.count, count=self.count)


class ClassificationMetrics(ConfusionMetrics):
    """Loss, top-1, top-5 (in %), per-class top-1 and the confusion matrix of image classification."""

    def __init__(self, num_classes: int, device: torch.device = torch.device('cpu')):
        super().__init__(num_classes, device)
        self.hits = torch.zeros(2, dtype=torch.float64, device=device)  # top-1, top-5

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        logits = logits.float()
        self.loss_sum += F.cross_entropy(logits, targets, reduction='sum').double()
        top = logits.topk(min(5, self.num_classes), dim=1).indices
        self.hits[0] += (top[:, 0] == targets).sum()
        self.hits[1] += (top == targets[:, None]).any(dim=1).sum()
        self._count(targets, top[:, 0])

    def tensors(self) -> List[torch.Tensor]:
        return super().tensors() + [self.hits]

    def compute(self) -> Dict[str, Any]:
        out, n, cm = super().compute(), self.count, self.confusion.cpu()
        per_class = (cm.diag() / cm.sum(1).clamp(min=1) * 100).tolist()
        return dict(out, top1=self.hits[0].item() / n * 100, top5=self.hits[1].item() / n * 100, per_class=per_class)


class SegmentationMetrics(ConfusionMetrics):
    """Per-pixel loss, mean IoU, global pixel accuracy and per-class IoU (in %) of semantic segmentation; the loss
    is per labelled pixel, void pixels (``ignore_index``) count nowhere. mIoU is over the classes present in the
    labels or predictions (a class absent from both has no IoU), as mmsegmentation's."""

    def __init__(self, num_classes: int, device: torch.device = torch.device('cpu'), ignore_index: int = 255):
        super().__init__(num_classes, device, ignore_index)

    def compute(self) -> Dict[str, Any]:
        out, cm = super().compute(), self.confusion.cpu()
        union = cm.sum(0) + cm.sum(1) - cm.diag()
        iou = cm.diag() / union.clamp(min=1) * 100
        present = union > 0
        return dict(out, miou=iou[present].mean().item(), pixel_acc=(cm.diag().sum() / cm.sum()).item() * 100,
                    iou=[v if p else float('nan') for v, p in zip(iou.tolist(), present.tolist())])
