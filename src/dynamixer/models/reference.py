"""The plain DynaMixer: the same model with its fast path off, every layer called as a module.

The plain modules (``DynaMixerOp.forward``, ``DynaMixerTokenMixer.plain_branches``, the layer's norms and MLP)
are written step by step from the equations and are the correctness oracle of the fused kernels
(tests/test_reference.py) and the baseline of ``dynamixer bench``.
"""
import copy
import dataclasses

import torch.nn as nn

__all__ = ['reference_model']


def reference_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` (a DynaMixer, or any module holding DynaMixer parts) with the fast path off."""
    ref = copy.deepcopy(model)
    if hasattr(ref, 'set_fast_path'):
        return ref.set_fast_path(enabled=False)
    for module in ref.modules():
        if hasattr(module, 'fast_path'):
            module.fast_path = dataclasses.replace(module.fast_path, enabled=False)
    return ref
