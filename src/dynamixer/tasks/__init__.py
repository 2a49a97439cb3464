"""What differs between training tasks, as one small object per task that the one training loop calls.

Shaped after timm 1.0's ``timm/task/``: a task's ``forward(images, targets)`` returns a dict with the ``loss``
the loop backpropagates and the ``output``; its metrics are objects that accumulate batches, add up over ranks
and compute (``dynamixer.tasks.metrics``). Besides, a task knows its data (``prepare_data``: model, loaders and
step counts), how a held-out image is predicted (``infer``: TTA for classification, sliding windows for
segmentation), what an epoch's record holds and how it is logged, and how the model folder is written.
Everything else (the loop, budget planner, checkpoints, resume, DDP, bf16/compile, progress bar) is
``dynamixer.train``'s, the same for every task.
"""
from pathlib import Path
from typing import Optional

TASKS = ('classification', 'segmentation')
DEFAULT_SEGMENTATION_BACKBONE = 'dynamixer_pyramid_t'  # models.segmentation.DEFAULT_BACKBONE, without torch


def detect_task(data: str, task: Optional[str] = 'auto') -> str:
    """``task`` as given, or read off the data: a folder with ``trainannot/`` is a segmentation set."""
    if task and task != 'auto':
        if task not in TASKS:
            raise ValueError(f'--task must be one of {", ".join(TASKS)} or auto, got {task!r}.')
        return task
    return 'segmentation' if (Path(data) / 'trainannot').is_dir() else 'classification'


def make_task(cfg, log=print):
    """The task object of a run's settings (``cfg.task``, as ``detect_task`` resolved it)."""
    if cfg.task == 'segmentation':
        from dynamixer.tasks.segmentation import SegmentationTask
        return SegmentationTask(cfg, log)
    from dynamixer.tasks.classification import ClassificationTask
    return ClassificationTask(cfg, log)
