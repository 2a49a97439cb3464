from dynamixer.models.dynamixer import (
    DynaMixer, DynaMixerOp, DynaMixerTokenMixer, FastPath, MixerLayer, FUSIONS, GENERATION_STRATEGIES, MODEL_ARGS,
    dynamixer_s, dynamixer_m, dynamixer_l, dynamixer_cifar_t, dynamixer_cifar_s, dynamixer_cifar_xs,
)

__all__ = ['DynaMixer', 'DynaMixerOp', 'DynaMixerTokenMixer', 'FastPath', 'MixerLayer', 'FUSIONS',
           'GENERATION_STRATEGIES', 'MODEL_ARGS', 'dynamixer_s', 'dynamixer_m', 'dynamixer_l', 'dynamixer_cifar_t',
           'dynamixer_cifar_s', 'dynamixer_cifar_xs']
