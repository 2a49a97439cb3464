"""The ``dynamixer`` command: every subcommand's flags, checked here, and the module that runs it.

This module and what it imports are light (no torch, no timm): ``--help`` and a bad flag answer at once, and
the subcommand's module (``dynamixer.<module>.run(args)``) is imported only to run it. ``dynamixer train``'s
flags live with its recipes in ``dynamixer.settings``. Errors that a user can fix (ValueError, KeyError,
FileNotFoundError, a full disk) print one line and exit 2; ``--debug`` shows the traceback instead.
"""
import argparse
import importlib
import math
import sys
from typing import Any, Callable, Dict, List, Optional

# subcommand -> (module, one-line help)
COMMANDS = {
    'convert': ('dynamixer.convert', 'convert an official DynaMixer checkpoint to ours (.safetensors)'),
    'train': ('dynamixer.train', 'train or fine-tune (digits by default; torchrun for DDP)'),
    'eval': ('dynamixer.evaluate', 'top-1/top-5 (or mIoU), loss, per-class figures and confusion matrix of a '
                                   'trained model'),
    'predict': ('dynamixer.predict', 'top-k classes of image files (or their masks) with a trained model'),
    'ablate': ('dynamixer.ablate', 'train a grid of model variants with one budget and tabulate them'),
    'visualize': ('dynamixer.visualize', 'draw the mixing matrices a trained model generates for an image'),
    'bench': ('dynamixer.bench', 'time the fast DynaMixer against the plain reference (speed, memory, GFLOP/s)'),
    'export': ('dynamixer.export', 'export a saved model folder to ONNX / TorchScript / ExportedProgram'),
    'list': ('dynamixer.catalog', 'the registered variants: input size, params, GMACs, pretrained tags'),
}


def number(kind: type = float, at_least: Optional[float] = None, above: Optional[float] = None,
           below: Optional[float] = None, at_most: Optional[float] = None) -> Callable[[str], Any]:
    """An argparse ``type``: an int or a finite float within the given limits, else a message that says
    what is allowed (``parse.what``, e.g. 'an integer >= 1', 'a number >= 0 and < 1')."""
    limits = [f'{sign} {int(bound) if float(bound).is_integer() else bound}'
              for sign, bound in (('>=', at_least), ('>', above), ('<', below), ('<=', at_most)) if bound is not None]
    what = ('an integer' if kind is int else 'a number') + (' ' + ' and '.join(limits) if limits else '')

    def parse(text: Any) -> Any:
        try:
            value = kind(text)
            ok = (math.isfinite(value) and (kind is not int or not isinstance(text, float))
                  and (at_least is None or value >= at_least) and (above is None or value > above)
                  and (below is None or value < below) and (at_most is None or value <= at_most))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f'expected {what}, got {text!r}')
        return value
    parse.__name__ = parse.what = what
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (the usage lines before them hid the message)."""

    def error(self, message: str):
        self.exit(2, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown once: not where the help already says its default, and not when there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if 'default' in (action.help or '') or action.default in (None, False) or not action.option_strings:
            return action.help or ''
        return super()._get_help_string(action)


MODEL_DIR_HELP = ('model folder written by dynamixer train (OUTPUT/model or OUTPUT) or by timm.models.save_for_hf, '
                  'or a model whose weights ship with the package: dynamixer_cifar_xs.cifar10_1h')


EXPORT_FORMATS = ('onnx', 'torchscript', 'exported-program')
PRECISION_NAMES = ('fp32', 'bf16', 'fp16')


def _int_list(text: str) -> List[int]:
    return [int(v) for v in text.split(',') if v.strip()]


def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('input', help='official checkpoint (.pth / .pth.tar / .safetensors), plain or wrapped '
                                      'under state_dict / state_dict_ema, with or without a module. prefix')
    parser.add_argument('output', nargs='?', help='where to write the converted weights (.safetensors)')
    parser.add_argument('--verify', action='store_true',
                        help='treat INPUT as an official test vector (weights, input, logits, config) and '
                             'report how far our model\'s logits are from the official ones; exit 1 above 1e-5')
    parser.add_argument('--fp16', action='store_true',
                        help='store floating-point tensors as fp16 (half the file; they load back into fp32 models)')


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model-dir', '--model', dest='model_dir', required=True, help=MODEL_DIR_HELP)
    parser.add_argument('--data', default='digits',
                        help='digits, cifar10, cifar100, an ImageFolder path (its val/ split is evaluated), or for a '
                             'segmentation model a segmentation folder (its val/ and valannot/)')
    parser.add_argument('--data-dir', default='data', help='where cifar10/cifar100 are downloaded')
    parser.add_argument('--val-split', type=number(at_least=0, below=1), default=0.,
                        help='for a folder with no val/: the held-out fraction (use the value training used)')
    parser.add_argument('--split-seed', type=number(int, at_least=0), default=0,
                        help='seed of the --val-split hold-out (as in training)')
    parser.add_argument('--batch-size', type=number(int, at_least=1), default=256, help='images per batch')
    parser.add_argument('--workers', type=number(int, at_least=0), default=2, help='data loader worker processes')
    parser.add_argument('--device', default='auto', help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument('--confusion', default=None,
                        help='where to write the confusion-matrix PNG (default: confusion.png in the training run; '
                             'confusion-NAME.png in the working directory for a shipped model)')
    from dynamixer.settings import TTA_MODES
    parser.add_argument('--tta', default='none', choices=TTA_MODES,
                        help="test-time augmentation: 'flip' averages the logits of each image and its mirror "
                             "image, 'flip-shift' also those of the pair shifted by one pixel both ways diagonally "
                             "(6 views)")
    parser.add_argument('--slide', action='store_true',
                        help='segmentation: predict in overlapping windows of the training crop (mmsegmentation\'s '
                             'slide mode; what fixed-size backbones such as ViP need) instead of whole images')
    parser.add_argument('--resize', type=number(int, at_least=16), nargs=2, default=None, metavar=('H', 'W'),
                        help='segmentation: evaluate at this size (images bilinear, labels nearest) instead of the '
                             'images\' own')
    parser.add_argument('--json', action='store_true', help='print the metrics as one JSON object (segmentation: '
                                                            'miou, pixel_acc and iou per class, in %%)')


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('images', nargs='+', help='image files to classify (or segment)')
    parser.add_argument('--model-dir', '--model', dest='model_dir', required=True, help=MODEL_DIR_HELP)
    parser.add_argument('--topk', type=number(int, at_least=1), default=5, help='how many classes to show per image')
    parser.add_argument('--device', default='auto', help="'auto' (cuda if available), 'cpu', 'cuda'")
    parser.add_argument('--output', default=None,
                        help='segmentation: folder for each image\'s mask (STEM.png: the class index of every pixel, '
                             '8-bit, the image\'s size) and overlay (STEM_overlay.jpg); default: masks/ here')
    parser.add_argument('--slide', action='store_true',
                        help='segmentation: predict in overlapping windows of the training crop')
    parser.add_argument('--json', action='store_true', help='one JSON object per line: file, and top-k '
                                                            'label/index/probability (segmentation: mask, overlay, '
                                                            'size, share of each class in %%)')


def _ablate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--grid', help='YAML grid file (model, base, train, seeds, axes, variants)')
    parser.add_argument('--output', required=True, help='folder for the runs and the results')
    parser.add_argument('--model', help='model name (overrides the grid)')
    parser.add_argument('--base', nargs='+', default=[], metavar='KNOB=VALUE', help='base model knobs')
    parser.add_argument('--vary', nargs='+', default=[], metavar='KNOB=V1,V2',
                        help='axes varied one at a time from the base, e.g. S=1,2,4,8 generation=static,dense')
    parser.add_argument('--variant', nargs='+', default=[], metavar='NAME:KNOB=VALUE[;KNOB=VALUE]',
                        help='named variants, e.g. shared:share_row_col=true')
    parser.add_argument('--seeds', nargs='+', type=number(int, at_least=0),
                        help='seeds of every variant (overrides the grid)')
    parser.add_argument('--data', help='training data, as for dynamixer train (overrides the grid)')
    parser.add_argument('--epochs', type=number(int, at_least=1), help='epochs per run (overrides the grid)')
    parser.add_argument('--time-budget', type=number(above=0), metavar='MIN',
                        help='minutes of wall time per run instead of epochs: each run plans its own epochs '
                             '(as dynamixer train --time-budget; overrides the grid)')
    parser.add_argument('--train-arg', nargs='+', default=[], metavar='FLAG=VALUE',
                        help='more dynamixer train settings shared by every run, e.g. batch_size=128 val_split=0.1')
    parser.add_argument('--jobs', type=number(int, at_least=1), default=1, help='runs trained at the same time')
    parser.add_argument('--threads', type=number(int, at_least=1), default=1,
                        help='CPU threads per run (OMP_NUM_THREADS)')
    parser.add_argument('--dry-run', action='store_true', help='print the training commands and stop')
    parser.add_argument('--no-train', action='store_true',
                        help='train nothing: tabulate the finished runs (a grid filled over several sittings)')
    parser.add_argument('--records', metavar='DIR',
                        help='an earlier --output of this grid (its grid.json, runs.csv and throughput.json; the run '
                             'folders are not needed): its runs stand in for the ones not finished in --output, so '
                             'a committed record can be tabulated again or extended without training it again')
    parser.add_argument('--throughput', choices=('fp32', 'bf16'),
                        help='also measure every variant\'s training and inference images/s in this process, '
                             'interleaved, at this precision (a controlled comparison; the runs\' own img/s '
                             'depend on when they ran)')
    parser.add_argument('--throughput-compile', action='store_true', help='with --throughput: torch.compile them')
    parser.add_argument('--throughput-batch-size', type=number(int, at_least=1), default=128,
                        help='with --throughput: batch size (default 128)')


def _visualize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('image', help='image file to run through the model')
    parser.add_argument('--model-dir', '--model', dest='model_dir', required=True, help=MODEL_DIR_HELP)
    parser.add_argument('--block', default='0.0', help='STAGE.BLOCK, 0-based')
    parser.add_argument('--token', default=None,
                        help="ROW,COL on the block's token grid (default: the centre token)")
    parser.add_argument('--output', default='mixing.png', help='PNG to write')
    parser.add_argument('--max-segments', type=number(int, at_least=1), default=8,
                        help='draw at most this many segments')
    parser.add_argument('--dpi', type=number(int, at_least=10), default=110)


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', default='dynamixer_s', help='variant name')
    parser.add_argument('--batch-size', type=number(int, at_least=1), default=None,
                        help='inference batch size (default: 128 for inputs up to 64 px, 32 up to 224, 8 beyond)')
    parser.add_argument('--train-batch-size', type=number(int, at_least=1), default=None,
                        help='training batch size (default: --batch-size)')
    parser.add_argument('--img-size', type=number(int, at_least=1), nargs='+', default=None, metavar='SIZE',
                        help="input size H [W] (default: the model's, e.g. 224 for S/M/L, 32 for the cifar "
                             "variants; 360 480 for --task segmentation)")
    parser.add_argument('--task', choices=('classification', 'segmentation'), default='classification',
                        help='segmentation: time the segmentation model dynamixer train builds on --model (its FPN '
                             'decoder, 11 classes as CamVid) on whole images')
    parser.add_argument('--precision', choices=PRECISION_NAMES, default='fp32',
                        help='fp32, or bf16 / fp16 autocast')
    parser.add_argument('--device', default='cpu', help='cpu or cuda[:N]')
    parser.add_argument('--compile', action='store_true', help='torch.compile both implementations')
    parser.add_argument('--warmup', type=number(int, at_least=0), default=2, help='untimed runs per implementation')
    parser.add_argument('--iters', type=number(int, at_least=1), default=5,
                        help='timed runs per implementation (median reported)')
    parser.add_argument('--threads', type=number(int, at_least=1), default=None,
                        help='torch.set_num_threads (default: leave as is)')
    parser.add_argument('--modes', default='inference,train', help='inference and/or train, comma-separated')
    parser.add_argument('--no-memory', action='store_true', help='skip the peak-memory measurements')
    parser.add_argument('--no-reference', action='store_true', help='time the fast implementation only')
    parser.add_argument('--model-args', default='{}', help='JSON of extra model constructor arguments')
    parser.add_argument('--sweep', type=_int_list, default=None, metavar='SIZES',
                        help='cost vs resolution at these sizes (e.g. 160,224,320,448) instead of the comparison')
    parser.add_argument('--keep-mixing', action='store_true',
                        help='keep the mixing matrices for backward (faster, more memory) instead of recomputing '
                             'them (FastPath.recompute_mixing=False)')
    parser.add_argument('--no-slicing', action='store_true',
                        help='run CPU inference batches whole in the fast path too (inference_slice_bytes=0) '
                             '(with --no-fusion too: the token mixer alone against the reference)')
    parser.add_argument('--no-fusion', action='store_true',
                        help='run CPU fp32 inference without the fast path\'s fused oneDNN linears '
                             '(cpu_fused_inference=False)')
    parser.add_argument('--no-onednn', action='store_true',
                        help='run the fast path\'s CPU fp32 linears (forward and input gradient) through '
                             'F.linear / MKL instead of oneDNN (onednn_linears=False)')
    parser.add_argument('--no-triton', action='store_true',
                        help='on CUDA, mix with torch ops instead of the fast path\'s Triton kernel '
                             '(triton=False)')
    parser.add_argument('--baseline-fp32-eager', action='store_true',
                        help='run the reference in fp32 eager with torch\'s default AdamW whatever --precision and '
                             '--compile say, and the fast model with the fused AdamW that dynamixer train uses: the '
                             'speed-up of a whole training recipe (e.g. --precision bf16 --compile) over the plain '
                             'model')
    parser.add_argument('--seed', type=number(int, at_least=0), default=0)
    parser.add_argument('--json', action='store_true', help='print JSON instead of a table')
    parser.add_argument('--output', default=None, help='also write the JSON to this file')
    parser.add_argument('--quiet', action='store_true', help='no progress output on stderr')


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('output', help='file to write (e.g. model.onnx, model.pt, model.pt2)')
    parser.add_argument('--model-dir', '--model', dest='model_dir', required=True, help=MODEL_DIR_HELP)
    parser.add_argument('--format', choices=EXPORT_FORMATS, default='onnx', help='export format')
    parser.add_argument('--img-size', type=number(int, at_least=1), nargs='+', default=None, metavar='SIZE',
                        help='input size H [W] to export at (dynamic_img_size models only; default: built size)')
    parser.add_argument('--opset', type=number(int, at_least=7), default=17, help='ONNX opset')
    parser.add_argument('--tolerance', type=number(above=0), default=1e-4,
                        help='largest accepted |exported - torch| on the check batch')
    parser.add_argument('--json', action='store_true', help='print the result as JSON')


def _catalog_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('pattern', nargs='?', default='*',
                        help="timm name pattern, e.g. 'dynamixer_cifar*'")
    parser.add_argument('--no-macs', action='store_true', help='skip counting GMACs (faster: no forward pass)')


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    from dynamixer.settings import add_arguments
    add_arguments(parser)


ARGUMENTS: Dict[str, Callable[[argparse.ArgumentParser], None]] = {
    'convert': _convert_arguments, 'train': _train_arguments, 'eval': _evaluate_arguments,
    'predict': _predict_arguments, 'ablate': _ablate_arguments, 'visualize': _visualize_arguments,
    'bench': _bench_arguments, 'export': _export_arguments, 'list': _catalog_arguments,
}


def _run_command(module_name: str) -> Callable[[argparse.Namespace], Any]:
    return lambda args: importlib.import_module(module_name).run(args)


def _module_parser(name: str) -> argparse.ArgumentParser:
    module_name, summary = COMMANDS[name]
    parser = _Parser(prog=f'dynamixer {name}', description=summary[0].upper() + summary[1:] + '.',
                     formatter_class=_HelpFormatter)
    parser.add_argument('--debug', action='store_true', help='show full tracebacks on errors')
    ARGUMENTS[name](parser)
    parser.set_defaults(_run=_run_command(module_name))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ('--version', '-V'):
        from dynamixer import __version__
        print(f'dynamixer {__version__}')
        return 0
    if not argv or argv[0] in ('-h', '--help') or argv[0] not in COMMANDS:
        lines = [f'  {name:<10} {summary}' for name, (_, summary) in COMMANDS.items()]
        usage = ('usage: dynamixer COMMAND [options]   (dynamixer COMMAND --help for its options; '
                 'dynamixer --version)\n\ncommands:\n')
        stream = sys.stdout if not argv or argv[0] in ('-h', '--help') else sys.stderr
        if argv and argv[0] not in ('-h', '--help'):
            print(f'dynamixer: unknown command {argv[0]!r}; choose one of {", ".join(COMMANDS)}.', file=stream)
        print(usage + '\n'.join(lines), file=stream)
        return 0 if stream is sys.stdout else 2
    args = _module_parser(argv[0]).parse_args(argv[1:])
    from dynamixer.io import DiskFullError
    try:
        result = args._run(args)
    except (ValueError, KeyError, FileNotFoundError, NotADirectoryError, DiskFullError) as e:
        if args.debug:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f'dynamixer {argv[0]}: error: {message}', file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: one line (training's says where it stopped and how to go on)
        if args.debug:
            raise
        print(f'dynamixer {argv[0]}: {e.args[0] if e.args else "interrupted"}', file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == '__main__':
    sys.exit(main())
