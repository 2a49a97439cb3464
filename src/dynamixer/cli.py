"""The ``dynamixer`` command: one subcommand per module, imported only when it runs.

Each subcommand lives in ``dynamixer.<module>`` with ``add_arguments(parser)`` and ``run(args)``. Errors
that a user can fix (ValueError, KeyError, FileNotFoundError) print one line and exit 2; ``--debug`` shows
the traceback instead.
"""
import argparse
import importlib
import math
import sys
from typing import Any, Callable, List, Optional

# subcommand -> (module, one-line help)
COMMANDS = {
    'convert': ('dynamixer.convert', 'convert an official DynaMixer checkpoint to ours (.safetensors)'),
    'train': ('dynamixer.train', 'train or fine-tune (digits by default; torchrun for DDP)'),
    'eval': ('dynamixer.evaluate', 'top-1/top-5, loss, per-class accuracy and confusion matrix of a trained model'),
    'predict': ('dynamixer.predict', 'top-k classes of image files with a trained model'),
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


def _module_parser(name: str) -> argparse.ArgumentParser:
    module_name, summary = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = _Parser(prog=f'dynamixer {name}', description=summary[0].upper() + summary[1:] + '.',
                     formatter_class=_HelpFormatter)
    parser.add_argument('--debug', action='store_true', help='show full tracebacks on errors')
    module.add_arguments(parser)
    parser.set_defaults(_run=module.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help') or argv[0] not in COMMANDS:
        lines = [f'  {name:<10} {summary}' for name, (_, summary) in COMMANDS.items()]
        usage = 'usage: dynamixer COMMAND [options]   (dynamixer COMMAND --help for its options)\n\ncommands:\n'
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
    return int(result or 0)


if __name__ == '__main__':
    sys.exit(main())
