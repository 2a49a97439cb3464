"""The ``dynamixer`` command: one subcommand per module, imported only when it runs.

Each subcommand lives in ``dynamixer.<module>`` with ``add_arguments(parser)`` and ``run(args)``. Errors
that a user can fix (ValueError, KeyError, FileNotFoundError) print one line and exit 2; ``--debug`` shows
the traceback instead.
"""
import argparse
import importlib
import sys
from typing import List, Optional

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
}


def _module_parser(name: str) -> argparse.ArgumentParser:
    module_name, summary = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(
        prog=f'dynamixer {name}', description=(module.__doc__ or summary).strip().split('\n\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    try:
        result = args._run(args)
    except (ValueError, KeyError, FileNotFoundError, NotADirectoryError) as e:
        if args.debug:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f'dynamixer {argv[0]}: error: {message}', file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == '__main__':
    sys.exit(main())
