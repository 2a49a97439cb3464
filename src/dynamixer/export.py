"""Export a saved DynaMixer (a timm local-dir folder) to ONNX, TorchScript or a torch.export ExportedProgram.

``dynamixer export --model-dir DIR --format onnx OUT.onnx`` loads ``DIR/config.json`` + ``DIR/model.safetensors``
with ``timm.create_model('local-dir:DIR', pretrained=True)``, exports it with a dynamic batch axis, writes
the file atomically (a temporary file in the same folder, then a rename) and checks the exported model
against PyTorch on a batch of a different size (ONNX through onnxruntime); it exits 1 if they differ by
more than ``--tolerance``.

Input sizes: a model built for a fixed size accepts exactly that size (its mixing layers are sized by the
line length), at any batch size. A ``dynamic_img_size=True`` model is exported at ``--img-size`` (default:
the size it was built for): the window layout is traced for that size, so the exported graph accepts that
size only (any batch); export once per input size you need.
"""
import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from dynamixer.cli import EXPORT_FORMATS
from dynamixer.model_dir import load_model_dir
from dynamixer.io import atomic_write

FORMATS = EXPORT_FORMATS


def _input_size(model: nn.Module, img_size: Optional[Tuple[int, int]]) -> Tuple[int, int, int]:
    if img_size is not None:
        if not getattr(model, 'dynamic_img_size', False) and tuple(img_size) != tuple(model.img_size):
            h, w = model.img_size
            raise ValueError(f'this model was built for {h}x{w} inputs and accepts only that size; '
                             f'drop --img-size or export a model built with dynamic_img_size=True.')
        return (model.in_chans, *img_size)
    return (model.in_chans, *model.img_size)


def require_onnx() -> None:
    """ONNX export needs the onnx and onnxruntime packages, which the plain install leaves out."""
    import importlib.util
    missing = [name for name in ('onnx', 'onnxruntime') if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f'--format onnx needs {" and ".join(missing)}: pip install "dynamixer[export]" '
                         f'(or pip install {" ".join(missing)}); --format torchscript needs nothing more.')


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    torch.onnx.export(
        model, (example,), str(path), dynamo=False, opset_version=opset, input_names=['images'],
        output_names=['logits'], dynamic_axes={'images': {0: 'batch'}, 'logits': {0: 'batch'}},
        do_constant_folding=True)


def _run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def export_model(model: nn.Module, out: str, fmt: str = 'onnx', img_size: Optional[Tuple[int, int]] = None,
                 opset: int = 17, check_batch: int = 3, tolerance: float = 1e-4, seed: int = 0) -> Dict[str, Any]:
    """Export ``model`` to ``out`` (atomically) and compare the exported model with PyTorch.

    Returns ``{'path', 'format', 'input_size', 'max_abs_diff', 'ok'}``.
    """
    if fmt not in FORMATS:
        raise ValueError(f'format must be one of {", ".join(FORMATS)}, got {fmt!r}.')
    if fmt == 'onnx':
        require_onnx()
    model = model.eval()
    input_size = _input_size(model, img_size)
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(2, *input_size, generator=generator)
    check = torch.randn(check_batch, *input_size, generator=generator)
    target = Path(out)
    outputs = {}

    @torch.no_grad()
    def write_and_check(tmp: str) -> None:  # the file replaces ``target`` only once it has been read back
        outputs['expected'] = model(check)
        if fmt == 'onnx':
            _export_onnx(model, example, Path(tmp), opset)
            outputs['got'] = _run_onnx(Path(tmp), check)
        elif fmt == 'torchscript':
            traced = torch.jit.trace(model, (example,), check_trace=False)
            traced.save(tmp)
            outputs['got'] = torch.jit.load(tmp)(check)
        else:
            batch = torch.export.Dim('batch', min=1, max=4096)
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
            torch.export.save(program, tmp)
            outputs['got'] = torch.export.load(tmp).module()(check)

    atomic_write(target, write_and_check, suffix='.tmp' + ('.pt2' if fmt == 'exported-program' else target.suffix))
    got, expected = outputs['got'], outputs['expected']
    diff = (got.float() - expected.float()).abs().max().item()
    return {'path': str(target), 'format': fmt, 'input_size': list(input_size), 'check_batch': check_batch,
            'max_abs_diff': diff, 'ok': diff <= tolerance}


def run(args) -> int:
    img_size = None
    if args.img_size:
        if len(args.img_size) > 2:
            raise ValueError(f'--img-size takes H or H W, got {len(args.img_size)} values.')
        img_size = (args.img_size[0], args.img_size[-1])
    model = load_model_dir(args.model_dir)
    result = export_model(model, args.output, args.format, img_size, args.opset, tolerance=args.tolerance)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        c, h, w = result['input_size']
        print(f"wrote {result['path']} ({result['format']}, input (batch, {c}, {h}, {w}), dynamic batch); "
              f"max |exported - torch| = {result['max_abs_diff']:.2e} on a batch of {result['check_batch']} "
              f"({'ok' if result['ok'] else 'MISMATCH'})")
    return 0 if result['ok'] else 1
