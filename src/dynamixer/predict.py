"""Classify image files with a trained DynaMixer: the top-k classes and their probabilities; or, with a
segmentation model, write each image's mask (class index a pixel) and a colour overlay.

``dynamixer predict --model-dir runs/digits/model a.png b.png`` preprocesses each image the way the model's
own data config says (timm ``resolve_data_config`` on the loaded model: size, crop, mean/std, channels).
``--json`` prints one JSON object per image for other programs.
"""
import json
import sys
from typing import Any, Dict, List

import torch


@torch.no_grad()
def predict(model: torch.nn.Module, paths: List[str], topk: int, device: torch.device) -> List[Dict[str, Any]]:
    from timm.data import resolve_data_config
    from dynamixer.data import eval_transform, open_image
    from dynamixer.model_dir import label_names
    config = resolve_data_config(model=model)
    transform = eval_transform(config)
    names = label_names(model)
    k = min(topk, len(names))
    results = []
    for path in paths:
        image, note = open_image(path, config)
        probs = model(transform(image).unsqueeze(0).to(device)).float().softmax(dim=-1)[0]
        p, idx = probs.topk(k)
        results.append(dict(file=path, top=[dict(label=names[i], index=i, prob=round(q, 6))
                                            for q, i in zip(p.tolist(), idx.tolist())],
                            **({'warning': note} if note else {})))
    return results


def run(args) -> None:
    from dynamixer.evaluate import resolve_device
    from dynamixer.model_dir import load_model_dir, task_of
    device = resolve_device(args.device)
    model = load_model_dir(args.model_dir, device)
    if task_of(model) == 'segmentation':
        return _segment(model, args, device)
    for path in args.images:  # one at a time, so results come out before any bad file stops the run
        result = predict(model, [path], args.topk, device)[0]
        if 'warning' in result:
            print(f'warning: {result["warning"]}', file=sys.stderr)
        if args.json:
            print(json.dumps(result))
            continue
        print(result['file'])
        for t in result['top']:
            print(f'  {t["prob"] * 100:6.2f}%  {t["label"]}')
        sys.stdout.flush()


def _segment(model: torch.nn.Module, args, device: torch.device) -> None:
    from pathlib import Path
    from dynamixer.tasks.segmentation import predict_masks
    output = Path(args.output or 'masks')
    for path in args.images:
        result = predict_masks(model, [path], output, device, slide=args.slide)[0]
        if args.json:
            print(json.dumps(result))
        else:
            top = ', '.join(f'{name} {share:.1f}%' for name, share in list(result['classes'].items())[:4])
            print(f'{path}: {result["size"][0]}x{result["size"][1]} mask {result["mask"]}, overlay {result["overlay"]}'
                  f' ({top})')
        sys.stdout.flush()
