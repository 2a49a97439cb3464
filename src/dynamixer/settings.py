"""dynamixer train's settings: the flags, the recipes, and how flag defaults, a recipe, a --config file, a
resumed run's args.yaml and the flags given combine (later ones win).

Light on purpose (no torch, no timm): ``dynamixer train --help`` and a bad flag answer at once.
"""
import argparse
import ast
import sys
from pathlib import Path
from typing import Any, Callable, Dict

from dynamixer.cli import number

# Views of each held-out image that test-time augmentation averages (dynamixer.evaluate.tta_logits).
TTA_VIEWS = {'none': 1, 'flip': 2, 'flip-shift': 6}
TTA_MODES = tuple(TTA_VIEWS)

# The default model for digits (8 x 8 grayscale): 0.38M parameters, 2 x 2 patches (a 1-pixel token carries one
# number, which LayerNorm reduces to its sign), 4 x 4 tokens throughout, fan-in init (std 0.02 is far too small
# at 64 channels: training idles for epochs). Accuracy over seeds: README, Train.
DIGITS_MODEL_KWARGS = dict(patch_size=2, depths=(2, 2, 2, 2), embed_dims=(64, 64, 64, 64),
                           stage_strides=(1, 1, 1, 1), num_segments=(4, 4, 4, 4), weight_init='fan_in')
# What the default recipe changes for digits: a short schedule, a short-memory EMA (0.95 per step: the 0.998
# default would still remember the random init after 20 epochs of 23 steps) and one CPU thread (a second
# gains little on a model this small and costs several times over when the cores are shared).
DIGITS_DEFAULTS = dict(epochs=20, lr=4e-3, warmup_epochs=1, model_ema=True, model_ema_decay=0.95, threads=1)

# Settings that a recipe sets (everything else keeps its flag default). 'default' suits CPU-sized runs.
RECIPES: Dict[str, Callable[[str], Dict[str, Any]]] = {
    'default': lambda model: dict(),  # the flag defaults (and DIGITS_DEFAULTS on digits)
    # Official ImageNet recipe (8 GPUs): total batch and drop path depend on the size.
    'paper': lambda model: dict(
        opt='adamw', lr=2e-3, weight_decay=0.05, epochs=300, sched='cosine', warmup_epochs=20, warmup_lr=1e-6,
        min_lr=1e-5, batch_size={'dynamixer_s': 2048, 'dynamixer_m': 1024, 'dynamixer_l': 512}.get(model, 1024),
        drop_path=0.3 if model == 'dynamixer_l' else 0.1, crop='rrc', hflip=0.5, aa='rand-m9-mstd0.5-inc1',
        reprob=0.25, smoothing=0.1, mixup=0.8, cutmix=1.0, color_jitter=0.4, model_ema=True,
        model_ema_decay=0.99996, amp='bf16'),
    # Official transfer recipe (CIFAR-10/100 at 224): SGD, backbone at 1/100 of the head's learning rate.
    'finetune': lambda model: dict(
        opt='sgd', momentum=0.9, lr=0.01, backbone_lr_scale=0.01, weight_decay=5e-4, batch_size=128, epochs=60,
        sched='cosine', warmup_epochs=0, min_lr=0., drop_path=0.1, crop='rrc', hflip=0.5, aa=None, reprob=0.,
        smoothing=0., mixup=0., cutmix=0., color_jitter=0., model_ema=False),
    # 32 x 32 images in a fixed wall-clock budget on a CPU (docs/cifar10.md): the schedule is fitted to the
    # budget from a measured step time; bf16 autocast where the CPU has bf16 instructions, compiled.
    'cifar': lambda model: dict(
        model='dynamixer_cifar_xs', time_budget=60., epochs=1000, batch_size=128, opt='adamw', lr=2e-3,
        weight_decay=0.05, sched='cosine', warmup_epochs=1, warmup_lr=1e-5, min_lr=1e-5, drop_path=0.05,
        crop='pad', hflip=0.5, cutout=8, smoothing=0.1, amp='auto', compile=True, data_path='tensor', threads=None,
        save_model='last', tta='flip-shift'),
    # Semantic segmentation of CamVid-style folders in a fixed wall-clock budget on a CPU (docs/segmentation.md):
    # the DynaMixer pyramid under a narrow FPN, random-scale crops, whole images at their own size for validation.
    'camvid': lambda model: dict(
        task='segmentation', model='dynamixer_pyramid_t', time_budget=60., epochs=1000, batch_size=8, opt='adamw',
        lr=2e-3, weight_decay=0.01, sched='cosine', warmup_epochs=2, warmup_lr=1e-5, min_lr=1e-5, drop_path=0.05,
        crop_size=(256, 256), scale=(0.5, 2.0), hflip=0.5, smoothing=0., amp='auto', compile=False,
        class_weights='sqrt-median-freq', threads=None, save_model='last', val_every=5),
}


def _multiple_of_32(text: Any) -> int:
    """--decoder-channels: the FPN decoder's segmentation blocks normalise in 32 groups."""
    value = number(int, at_least=32)(text)
    if value % 32:
        raise argparse.ArgumentTypeError(f'expected {_multiple_of_32.what} such as 32, 64 or 96 (the FPN decoder '
                                         f'normalises in 32 groups), got {text!r}')
    return value


_multiple_of_32.what = 'a multiple of 32'

NOT_HYPERPARAMETERS = {'debug', 'config', 'resume', 'overwrite', 'progress', '_run', '_explicit'}


class ParseKwargs(argparse.Action):
    """KEY=VALUE pairs into a dict, each value read as a Python literal where it is one (as timm's own)."""

    def __call__(self, parser, namespace, values, option_string=None):
        kwargs = {}
        for item in values:
            key, sep, value = item.partition('=')
            if not sep:
                parser.error(f'argument {option_string}: expected KEY=VALUE, got {item!r}')
            try:
                kwargs[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kwargs[key] = value
        setattr(namespace, self.dest, kwargs)


def _tracked(action_cls: type) -> type:
    """An argparse action that also records which flags were given, so that they beat config and recipe."""
    class Tracked(action_cls):
        def __call__(self, parser, namespace, values, option_string=None):
            super().__call__(parser, namespace, values, option_string)
            namespace._explicit = set(getattr(namespace, '_explicit', ())) | {self.dest}
    return Tracked


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for name, cls in ((None, argparse._StoreAction), ('store', argparse._StoreAction),
                      ('store_true', argparse._StoreTrueAction)):
        parser.register('action', name, _tracked(cls))
    boolean = _tracked(argparse.BooleanOptionalAction)

    g = parser.add_argument_group('recipe and config')
    g.add_argument('--recipe', default='default', choices=sorted(RECIPES),
                   help='base settings: default (small CPU runs; on digits also ' + ' '.join(
                        f'{k}={v}' for k, v in DIGITS_DEFAULTS.items()) + '), paper (official ImageNet: AdamW 2e-3, 300 epochs, '
                        'RandAugment, mixup/cutmix, EMA, amp), finetune (official transfer: SGD 0.01, backbone '
                        'at 0.01x, 60 epochs; needs --init-checkpoint)')
    g.add_argument('--config', default=None, help='YAML file of settings (keys as the flag names, - or _); '
                                                  'flags given on the command line win')
    g = parser.add_argument_group('data')
    g.add_argument('--task', default='auto', choices=['auto', 'classification', 'segmentation'],
                   help="what to learn; auto: segmentation for a --data folder with trainannot/ (CamVid's layout: "
                        "train/, trainannot/, val/, valannot/, classes.txt), else classification")
    g.add_argument('--data', default='digits',
                   help='digits (scikit-learn, 8x8), cifar10, cifar100 (torchvision, downloaded into --data-dir), '
                        'or a folder with train/ and val/ (or only train/ with --val-split), one sub-folder per class')
    g.add_argument('--data-dir', default='data', help='download folder for cifar10/cifar100')
    g.add_argument('--val-split', type=number(at_least=0, below=1), default=0.,
                   help='hold out this stratified fraction of train/ for validation (a folder without val/); '
                        'digits always holds out 20%% unless set')
    g.add_argument('--split-seed', type=number(int, at_least=0), default=0,
                   help='seed of the --val-split hold-out (and --limit-* subsets); kept apart from --seed so that '
                        'runs of different seeds are measured on the same held-out images')
    g.add_argument('--limit-train', type=number(int, at_least=1), default=None,
                   help='train on a stratified subset of this many images (quick trials)')
    g.add_argument('--limit-val', type=number(int, at_least=1), default=None,
                   help='validate on a stratified subset of this many images')
    g.add_argument('--in-chans', type=int, choices=[1, 3], default=None,
                   help='1 (grayscale) or 3; default: 1 for digits, else 3')
    g.add_argument('--img-size', type=number(int, at_least=1), default=None,
                   help="input size; default: 8 for digits, else the model's (32 for dynamixer_cifar_*, 224 for S/M/L)")
    g.add_argument('--data-path', default='auto', choices=['auto', 'tensor', 'files'],
                   help="'tensor': decode the images once into a uint8 tensor cached in --cache-dir and augment "
                        "whole batches (crop with padding, flip, --cutout); 'files': decode and transform each "
                        "image every epoch (any augmentation); 'auto': tensor for images <= 64 px with pad/none "
                        "crops and no --aa/--color-jitter/--reprob, else files")
    g.add_argument('--cache-dir', default=None,
                   help='where --data-path tensor keeps decoded folders (default: $XDG_CACHE_HOME/dynamixer or '
                        '~/.cache/dynamixer); keyed by the files, rebuilt when any image changes')
    g.add_argument('--workers', type=number(int, at_least=0), default=None,
                   help='data loader processes per rank (default: 0 for '
                        'digits, else min(4, CPUs))')
    g = parser.add_argument_group('model')
    g.add_argument('--model', default='dynamixer_cifar_t',
                   help='DynaMixer variant: dynamixer_s/m/l (ImageNet, 224), dynamixer_cifar_xs/t/s (32 x 32), '
                        'the ViP baseline vip_cifar_xs (dynamixer list shows their sizes); or any timm model, e.g. '
                        'mixer_s16_224 with --model-kwargs img_size=32 patch_size=4, for a peer under the same '
                        'recipe')
    g.add_argument('--model-kwargs', nargs='*', default=None, action=_tracked(ParseKwargs),
                   help='constructor overrides as key=value, e.g. depths="(1,1,1,1)" embed_dims="(32,32,64,64)" '
                        '(default for digits: ' + ' '.join(f'{k}={str(v).replace(" ", "")}'
                        for k, v in DIGITS_MODEL_KWARGS.items()) + ')')
    g.add_argument('--init-checkpoint', default=None,
                   help='start from these weights (our .safetensors, a model/ folder, or an official .pth); '
                        'resampled to --img-size; the head is re-initialised when the class count differs '
                        'and always with --recipe finetune')
    g.add_argument('--drop-path', type=number(at_least=0, below=1), default=0.1,
                   help='stochastic depth rate (grows linearly over blocks)')
    g.add_argument('--drop', type=number(at_least=0, below=1), default=0., help='dropout before the classifier')
    g.add_argument('--decoder-channels', type=_multiple_of_32, default=64,
                   help="segmentation: width of the FPN decoder's pyramid and segmentation blocks (a multiple of 32)")
    g = parser.add_argument_group('optimisation')
    g.add_argument('--epochs', type=number(int, at_least=1), default=40, help='training epochs')
    g.add_argument('--batch-size', type=number(int, at_least=1), default=64,
                   help='TOTAL images per optimiser step, over all processes and --accum-steps')
    g.add_argument('--accum-steps', type=number(int, at_least=1), default=1,
                   help='gradient accumulation micro-steps per optimiser step')
    g.add_argument('--opt', default='adamw', help='timm optimiser name (adamw, sgd, lamb, ...)')
    g.add_argument('--lr', type=number(above=0), default=2e-3, help='peak learning rate')
    g.add_argument('--backbone-lr-scale', type=number(at_least=0), default=1.,
                   help='learning rate of everything but the head, relative to --lr (finetune: 0.01)')
    g.add_argument('--weight-decay', type=number(at_least=0), default=0.05,
                   help='weight decay (not on biases and norms)')
    g.add_argument('--momentum', type=number(at_least=0, below=1), default=0.9, help='SGD momentum')
    g.add_argument('--clip-grad', type=number(above=0), default=None, help='clip the gradient norm to this value')
    g.add_argument('--sched', default='cosine', help='timm scheduler: cosine, step, plateau, ...')
    g.add_argument('--time-budget', type=number(above=0), default=None, metavar='MIN',
                   help='finish the whole run (data loading, compilation, training, validation) within MIN '
                        'minutes: --epochs is set from the step time measured at the start, so the schedule '
                        'completes; --epochs stays an upper bound')
    g.add_argument('--warmup-epochs', type=number(at_least=0), default=2,
                   help='linear warm-up epochs, from --warmup-lr')
    g.add_argument('--warmup-lr', type=number(at_least=0), default=1e-6, help='learning rate at the start of warm-up')
    g.add_argument('--min-lr', type=number(at_least=0), default=1e-5, help='final learning rate of the cosine')
    g = parser.add_argument_group('augmentation and regularisation')
    g.add_argument('--crop', default='auto', choices=['auto', 'rrc', 'pad', 'none'],
                   help="'rrc': timm's random resized crop pipeline (ImageNet); 'pad': pad-and-crop for small images; "
                        "'none': no crop (a one-pixel shift is an eighth of a digit); "
                        "'auto': none for digits, pad for other inputs <= 64 px (CIFAR), else rrc")
    g.add_argument('--scale', type=number(above=0), nargs=2, default=(0.08, 1.0),
                   help='classification: random resized crop area range (rrc, at most 1); segmentation: range of '
                        'the random zoom before the crop (camvid: 0.5 2)')
    g.add_argument('--crop-size', type=number(int, at_least=16), nargs=2, default=(256, 256), metavar=('H', 'W'),
                   help='segmentation: training crop (validation sees whole images at their own size)')
    g.add_argument('--class-weights', default='none', choices=['none', 'median-freq', 'sqrt-median-freq'],
                   help="segmentation: weight the loss per class from the training labels' pixel frequencies "
                        "(SegNet's median-frequency balancing, or its square root), for the rare classes")
    g.add_argument('--slide', action=boolean, default=False,
                   help='segmentation: validate in overlapping windows of the training crop (for fixed-size '
                        'backbones such as ViP) instead of whole images')
    g.add_argument('--hflip', type=number(at_least=0, at_most=1), default=None,
                   help='horizontal flip probability (default: 0 for digits, '
                        'else 0.5)')
    g.add_argument('--aa', default=None, help='timm auto-augment policy (rrc), e.g. rand-m9-mstd0.5-inc1')
    g.add_argument('--color-jitter', type=number(at_least=0), default=0.,
                   help='colour jitter strength (rrc, without --aa)')
    g.add_argument('--cutout', type=number(int, at_least=0), default=0,
                   help='cutout square side in pixels (--data-path tensor)')
    g.add_argument('--reprob', type=number(at_least=0, at_most=1), default=0., help='random erasing probability')
    g.add_argument('--smoothing', type=number(at_least=0, below=1), default=0.1, help='label smoothing')
    g.add_argument('--mixup', type=number(at_least=0), default=0., help='mixup alpha (0: off)')
    g.add_argument('--cutmix', type=number(at_least=0), default=0., help='cutmix alpha (0: off)')
    g.add_argument('--model-ema', action=boolean, default=False, help='keep an EMA of the weights; validate and '
                                                                      'save the EMA')
    g.add_argument('--model-ema-decay', type=number(at_least=0, below=1), default=0.998,
                   help='EMA decay per optimiser step')
    g = parser.add_argument_group('speed and precision')
    g.add_argument('--amp', default='none', choices=['none', 'bf16', 'fp16', 'auto'],
                   help='mixed precision (fp16 uses a gradient scaler); auto: bf16 on a GPU that has it or a CPU '
                        'with bf16 instructions (AVX512-BF16/AMX), else fp32')
    g.add_argument('--compile', action=boolean, default=False, help='torch.compile the model')
    g.add_argument('--grad-checkpointing', action=boolean, default=False,
                   help='recompute activations in backward to save memory')
    g.add_argument('--threads', type=number(int, at_least=1), default=None,
                   help="CPU threads per process (default: torch's choice; "
                        "1 for digits)")
    g.add_argument('--device', default='auto', help="'auto' (the rank's GPU if any, else cpu), 'cpu', 'cuda'")
    g = parser.add_argument_group('run')
    g.add_argument('--output', default=None,
                   help='output folder (default: runs/DATA, e.g. runs/digits, numbered runs/DATA-2, -3, ... when '
                        'that already holds a run); a folder that holds a run needs --resume or --overwrite')
    g.add_argument('--resume', action='store_true',
                   help='continue from OUTPUT/checkpoint.pth with the settings of OUTPUT/args.yaml (flags given '
                        'now still win, e.g. --epochs to train longer)')
    g.add_argument('--overwrite', action='store_true',
                   help='replace the run in --output (its model, metrics, plots and checkpoint are deleted first)')
    g.add_argument('--save-model', default='best', choices=['best', 'last'],
                   help="what OUTPUT/model holds: the epoch with the best val top-1 ('best'), or the last epoch "
                        "('last': no selection on the validation images, for reporting held-out accuracy)")
    g.add_argument('--tta', default='none', choices=TTA_MODES,
                   help="after the last epoch, also validate with test-time augmentation, within --time-budget: "
                        "'flip' (each image and its mirror), 'flip-shift' (also shifted by one pixel, 6 views); "
                        "logged and recorded as val_top1_tta")
    g.add_argument('--val-every', type=number(int, at_least=1), default=1,
                   help='validate every N epochs (and always after the last); in between, an epoch\'s record has '
                        'its training figures only (segmentation: validating 101 whole CamVid images costs about '
                        'as much as a training epoch)')
    g.add_argument('--checkpoint-every', type=number(int, at_least=0), default=0,
                   help='also checkpoint every N optimiser steps within an epoch (0: at the end of each epoch only)')
    g.add_argument('--seed', type=number(int, at_least=0, below=2**32), default=0,
                   help='seed of initialisation, data order and augmentation')
    g.add_argument('--deterministic', action='store_true',
                   help='deterministic algorithms, so that a killed and resumed run ends with the same bits')
    g.add_argument('--progress', action=boolean, default=None,
                   help='show a progress bar per epoch (default: only when stderr is a terminal, so that a '
                        'redirected log holds the epoch lines alone)')
    for action in parser._actions:  # the digits run (no --data, default recipe) has defaults of its own
        if action.dest in DIGITS_DEFAULTS and 'default' not in action.help:
            shown = {False: 'off', True: 'on'}.get(action.default, action.default)
            digits = {False: 'off', True: 'on'}.get(DIGITS_DEFAULTS[action.dest], DIGITS_DEFAULTS[action.dest])
            action.help += f' (default: {shown}; {digits} for digits)'


def _read_yaml(path: Path, what: str) -> Dict[str, Any]:
    import yaml
    if not path.is_file():
        raise ValueError(f'{what} {str(path)!r} does not exist.')
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f'{what} {str(path)!r} should hold a mapping of setting: value.')
    return {k.replace('-', '_'): v for k, v in data.items()}


def check_values(settings: Dict[str, Any], source: str) -> None:
    """The limits the flags enforce, applied to settings from a file."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for action in parser._actions:
        if action.dest not in settings or settings[action.dest] is None:
            continue
        value = settings[action.dest]
        for item in (value if isinstance(value, (list, tuple)) and action.nargs else [value]):
            try:
                if hasattr(action.type, 'what'):
                    action.type(item)
                if action.choices is not None and item not in action.choices:
                    raise argparse.ArgumentTypeError(f'expected one of {", ".join(map(str, action.choices))}')
            except argparse.ArgumentTypeError as e:
                raise ValueError(f'{action.dest}: {item!r} in {source}: {str(e).split(", got")[0]}.') from None


def resolve_settings(args: argparse.Namespace) -> argparse.Namespace:
    """Flag defaults < recipe (with the digits defaults for the default recipe on digits) < --config < saved
    args.yaml (with --resume) < flags given on the command line."""
    explicit = getattr(args, '_explicit', set())
    defaults = {k: v for k, v in vars(args).items() if k not in NOT_HYPERPARAMETERS}
    config = _read_yaml(Path(args.config), 'config file') if args.config else {}
    saved = {}
    if args.resume:
        if args.output is None:
            raise ValueError('--resume continues the run in --output; give its folder, e.g. --output runs/digits.')
        if not (Path(args.output) / 'args.yaml').is_file():
            raise ValueError(f'--resume: {args.output} holds no run to continue (no args.yaml); start a new run '
                             f'without --resume, or give the --output of the run to continue.')
        saved = _read_yaml(Path(args.output) / 'args.yaml', 'saved settings')
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise ValueError(f'unknown setting(s) {", ".join(unknown)} in {args.config}; use flag names '
                         f'(dynamixer train --help).')
    check_values(config, args.config)

    def pick(key: str) -> Any:
        if key in explicit:
            return getattr(args, key)
        return saved.get(key, config.get(key, defaults[key]))

    recipe, model = pick('recipe'), pick('model')
    if recipe not in RECIPES:
        raise ValueError(f'unknown recipe {recipe!r}; choose one of {", ".join(RECIPES)}.')
    digits = DIGITS_DEFAULTS if recipe == 'default' and pick('data') == 'digits' else {}
    layered = {**defaults, **digits, **RECIPES[recipe](model), **config, **saved}
    layered.update({k: getattr(args, k) for k in explicit if k in defaults})
    if layered['recipe'] == 'finetune' and not layered['init_checkpoint']:
        raise ValueError('--recipe finetune starts from pretrained weights; give --init-checkpoint '
                         '(a model/ folder, .safetensors or official .pth).')
    for key in ('scale', 'crop_size'):
        layered[key] = list(layered[key])
    from dynamixer.tasks import detect_task
    layered['task'] = detect_task(str(layered['data']), layered['task'])
    if layered['task'] == 'segmentation' and 'model' not in explicit and layered['model'] == defaults['model']:
        from dynamixer.tasks import DEFAULT_SEGMENTATION_BACKBONE
        layered['model'] = DEFAULT_SEGMENTATION_BACKBONE
    if layered['task'] != 'segmentation' and 'scale' in explicit and max(layered['scale']) > 1:
        raise ValueError(f'--scale {layered["scale"][0]} {layered["scale"][1]}: a random resized crop keeps at most '
                         f'the whole image; give an area range within 0 and 1.')
    layered['progress'] = sys.stderr.isatty() if args.progress is None else args.progress
    return argparse.Namespace(**layered, resume=args.resume, overwrite=args.overwrite)
