"""Image / truth / prediction for a few held-out images of a segmentation folder (docs/segmentation.md's picture).

    python benchmarks/seg_pictures.py runs/camvid_s0/model ../shared/data/camvid --output docs/images/camvid_predictions.png

Each row: the image, its label map and the model's mask at the image's own size, in the classes' colours
(``dynamixer.tasks.segmentation.palette``, the colours of ``dynamixer predict``'s overlays); void is black.
"""
import argparse
from pathlib import Path

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from dynamixer.io import atomic_write  # noqa: E402


def main() -> None:
    from dynamixer.model_dir import label_names, load_model_dir
    from dynamixer.seg_data import VOID, load_seg_data
    from dynamixer.tasks.segmentation import data_config, palette, segment
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('model', help='segmentation model folder (or a shipped NAME.TAG)')
    parser.add_argument('data', help='segmentation folder; its val/ images are drawn')
    parser.add_argument('--images', type=int, nargs='+', default=[0, 25, 50, 75], help='val image indices')
    parser.add_argument('--output', default='docs/images/camvid_predictions.png', help='PNG to write')
    args = parser.parse_args()
    model = load_model_dir(args.model)
    classes, config = label_names(model), data_config(model)
    colours = torch.cat([palette(len(classes)), torch.zeros(VOID + 1 - len(classes), 3, dtype=torch.uint8)])
    val = load_seg_data(args.data).val
    mean = torch.tensor(config['mean']).view(3, 1, 1) * 255
    std = torch.tensor(config['std']).view(3, 1, 1) * 255
    fig, axes = plt.subplots(len(args.images), 3, figsize=(12, 3 * len(args.images)), squeeze=False)
    for row, index in zip(axes, args.images):
        image, label = val.images[index], val.labels[index]
        with torch.no_grad():
            mask = segment(model, ((image.float() - mean) / std)[None]).argmax(1)[0]
        for ax, picture, title in zip(row, (image.permute(1, 2, 0), colours[label.long()], colours[mask]),
                                      (val.names[index], 'truth', 'prediction')):
            ax.imshow(picture.numpy())
            ax.set_title(title, fontsize=9)
            ax.axis('off')
    handles = [plt.Rectangle((0, 0), 1, 1, color=(colours[i].float() / 255).tolist()) for i in range(len(classes))]
    fig.legend(handles, classes, loc='lower center', ncol=min(len(classes), 6), fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    atomic_write(Path(args.output), lambda tmp: fig.savefig(tmp, format='png', dpi=80))
    print(f'wrote {args.output}')


if __name__ == '__main__':
    main()
