"""Classify image files with a trained DynaMixer: the top-k classes and their probabilities.

``dynamixer predict --model-dir runs/digits/model a.png b.png`` preprocesses each image the way the model's
own data config says (timm ``resolve_data_config`` on the loaded model: size, crop, mean/std, channels).
``--json`` prints one JSON object per image for other programs.
"""
import json
import sys
from typing import Any, Dict, List

import torch
from PIL import Image


def add_arguments(parser) -> None:
    parser.add_argument('images', nargs='+', help='image files to classify')
    from dynamixer.evaluate import MODEL_DIR_HELP
    parser.add_argument('--model-dir', '--model', dest='model_dir', required=True, help=MODEL_DIR_HELP)
    parser.add_argument('--topk', type=int, default=5, help='how many classes to show per image')
    parser.add_argument('--device', default='auto', help="'auto' (cuda if available), 'cpu', 'cuda'")
    parser.add_argument('--json', action='store_true', help='one JSON object per line: file, and top-k '
                                                            'label/index/probability')


@torch.no_grad()
def predict(model: torch.nn.Module, paths: List[str], topk: int, device: torch.device) -> List[Dict[str, Any]]:
    from timm.data import resolve_data_config
    from dynamixer.data import eval_transform
    from dynamixer.evaluate import label_names
    config = resolve_data_config(model=model)
    transform = eval_transform(config)
    mode = 'L' if config['input_size'][0] == 1 else 'RGB'
    names = label_names(model)
    k = min(topk, len(names))
    results = []
    for path in paths:
        try:
            with Image.open(path) as image:
                x = transform(image.convert(mode)).unsqueeze(0).to(device)
        except FileNotFoundError:
            raise FileNotFoundError(f'image {path!r} does not exist.') from None
        except OSError as e:
            raise ValueError(f'could not read {path!r} as an image ({e}).') from None
        probs = model(x).float().softmax(dim=-1)[0]
        p, idx = probs.topk(k)
        results.append(dict(file=path, top=[dict(label=names[i], index=i, prob=round(q, 6))
                                            for q, i in zip(p.tolist(), idx.tolist())]))
    return results


def run(args) -> None:
    from dynamixer.evaluate import load_model_dir, resolve_device
    device = resolve_device(args.device)
    model = load_model_dir(args.model_dir, device)
    for path in args.images:  # one at a time, so results come out before any bad file stops the run
        result = predict(model, [path], args.topk, device)[0]
        if args.json:
            print(json.dumps(result))
            continue
        print(result['file'])
        for t in result['top']:
            print(f'  {t["prob"] * 100:6.2f}%  {t["label"]}')
        sys.stdout.flush()
