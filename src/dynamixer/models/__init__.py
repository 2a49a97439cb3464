from dynamixer.models.dynamixer import (
    DynaMixer, DynaMixerOp, DynaMixerTokenMixer, FastPath, MixerLayer, FUSIONS,
    GENERATION_STRATEGIES, MODEL_ARGS, TOKEN_MIXERS, compile_model, dynamixer_s, dynamixer_m, dynamixer_l,
    dynamixer_cifar_t, dynamixer_cifar_s, dynamixer_cifar_xs, vip_cifar_xs, dynamixer_pyramid_t, vip_pyramid_t,
)
from dynamixer.models.vip import PermuteMixer, permute_mixer_params

__all__ = ['DynaMixer', 'DynaMixerOp', 'DynaMixerTokenMixer', 'FastPath', 'MixerLayer',
           'PermuteMixer', 'FUSIONS', 'GENERATION_STRATEGIES', 'MODEL_ARGS', 'TOKEN_MIXERS', 'compile_model',
           'dynamixer_s', 'dynamixer_m', 'dynamixer_l', 'dynamixer_cifar_t', 'dynamixer_cifar_s',
           'dynamixer_cifar_xs', 'vip_cifar_xs', 'dynamixer_pyramid_t', 'vip_pyramid_t', 'permute_mixer_params']
