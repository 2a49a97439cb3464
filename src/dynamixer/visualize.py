"""Draw the mixing matrices that a trained DynaMixer generates for one image.

For one block (``--block STAGE.BLOCK``) and one token (``--token ROW,COL`` on that block's token grid) the
picture shows, per channel segment, the row mixing matrix of the row through the token and the column mixing
matrix of the column through it (heatmaps, output token down, input token across, the token's own line
outlined), and over the image the weights with which the token mixes its row and its column (upsampled to
image resolution, alpha overlay), per segment and averaged over segments.

The matrices are exactly ``DynaMixerOp.mixing_matrix`` applied to the block's normed input (the
``norm1`` output that the token mixer receives), so they are row-stochastic: each output token's weights
over its line sum to 1. ``block_mixing_matrices`` returns them as arrays.
"""
import argparse
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from dynamixer.model_dir import load_model_dir as load_model

__all__ = ['load_model', 'load_image', 'parse_block', 'parse_token', 'block_mixing_matrices', 'token_weights',
           'draw', 'visualize']


def load_image(model: torch.nn.Module, image_path: str) -> Tuple[torch.Tensor, np.ndarray]:
    """The image through the model's own eval preprocessing: the input batch (1, C, H, W), and the same
    pixels un-normalised for display (H, W, C in [0, 1])."""
    from timm.data import resolve_data_config
    from dynamixer.data import eval_transform, open_image
    config = resolve_data_config({}, model=model)
    image, note = open_image(image_path, config)
    if note:
        print(f'warning: {note}', file=sys.stderr)
    x = eval_transform(config)(image).unsqueeze(0)
    mean = torch.tensor(config['mean']).view(-1, 1, 1)
    std = torch.tensor(config['std']).view(-1, 1, 1)
    shown = (x[0] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    return x, shown


def parse_block(spec: str, model: torch.nn.Module) -> Tuple[int, int]:
    """'STAGE.BLOCK' (0-based) -> (stage, block), checked against the model."""
    parts = str(spec).split('.')
    if len(parts) != 2 or not all(p.strip().lstrip('-').isdigit() for p in parts):
        raise ValueError(f'--block must be STAGE.BLOCK, e.g. 0.1 (0-based), got {spec!r}.')
    stage, block = (int(p) for p in parts)
    depths = [len(s.blocks) for s in model.stages]
    if not 0 <= stage < len(depths):
        raise ValueError(f'--block {spec}: stage {stage} does not exist; this model has stages 0-{len(depths) - 1} '
                         f'with {", ".join(map(str, depths))} blocks.')
    if not 0 <= block < depths[stage]:
        raise ValueError(f'--block {spec}: stage {stage} has blocks 0-{depths[stage] - 1}.')
    return stage, block


def parse_token(spec: Optional[str], grid: Tuple[int, int]) -> Tuple[int, int]:
    """'ROW,COL' on the block's token grid -> (row, col); None -> the centre token."""
    height, width = grid
    if spec is None:
        return height // 2, width // 2
    parts = str(spec).split(',')
    if len(parts) != 2 or not all(p.strip().lstrip('-').isdigit() for p in parts):
        raise ValueError(f'--token must be ROW,COL on the block\'s {height}x{width} token grid, got {spec!r}.')
    row, col = (int(p) for p in parts)
    if not (0 <= row < height and 0 <= col < width):
        raise ValueError(f'--token {spec} is outside the block\'s {height}x{width} token grid; '
                         f'use 0 <= ROW < {height} and 0 <= COL < {width}.')
    return row, col


@torch.no_grad()
def block_mixing_matrices(model: torch.nn.Module, x: torch.Tensor, stage: int, block: int) -> Dict[str, np.ndarray]:
    """The mixing matrices of one block for a batch of one image.

    Returns ``rows`` (H, S, W, W): for each of the H rows, the S row-stochastic matrices (output token,
    input token); ``cols`` (W, S, H, H): the same for each of the W columns; ``logits`` (the model output).
    """
    if x.shape[0] != 1:
        raise ValueError(f'expected a batch of one image, got {x.shape[0]}.')
    layer = model.stages[stage].blocks[block]
    mixer = layer.token_mixer
    captured = {}

    def hook(module, inputs, output) -> None:  # must return None, or it would replace the output
        captured['x'] = inputs[0]

    handle = mixer.register_forward_hook(hook)
    try:
        logits = model(x)
    finally:
        handle.remove()
    feats = captured['x']  # (1, H, W, C), the norm1 output
    _, H, W, C = feats.shape
    row_op, col_op = mixer.row_mix, mixer.column_op
    if W != row_op.seq_len or H != col_op.seq_len:
        raise ValueError(f'block {stage}.{block} sees a {H}x{W} token grid but was built for '
                         f'{col_op.seq_len}x{row_op.seq_len}; draw it at the size the model was built for.')
    rows = row_op.mixing_matrix(feats.reshape(H, W, C))
    cols = col_op.mixing_matrix(feats.transpose(1, 2).reshape(W, H, C))
    return dict(rows=rows.float().numpy(), cols=cols.float().numpy(), logits=logits.float().numpy())


def token_weights(mats: Dict[str, np.ndarray], token: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """How token (r, c) mixes its row and its column: (S, W) row weights and (S, H) column weights."""
    r, c = token
    return mats['rows'][r, :, c, :], mats['cols'][c, :, r, :]


def _overlay_map(row_w: np.ndarray, col_w: np.ndarray, token: Tuple[int, int], grid: Tuple[int, int]) -> np.ndarray:
    """Token-grid map: the row weights along the token's row, column weights along its column, NaN elsewhere.
    The token itself appears in both lines; it shows the sum of its two self-weights."""
    r, c = token
    out = np.full(grid, np.nan)
    out[r, :] = row_w
    out[:, c] = col_w
    out[r, c] = row_w[c] + col_w[r]
    return out


def draw(image: np.ndarray, mats: Dict[str, np.ndarray], token: Tuple[int, int], title: str = '',
         max_segments: int = 8):
    """The figure: row/column matrices per segment (top two rows), token weights over the image (bottom)."""
    import matplotlib
    matplotlib.use('Agg', force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    r, c = token
    row_mats, col_mats = mats['rows'][r], mats['cols'][c]  # (S, W, W), (S, H, H)
    S, W = row_mats.shape[:2]
    H = col_mats.shape[1]
    shown = min(S, max_segments)
    row_w, col_w = token_weights(mats, token)
    img_h, img_w = image.shape[:2]
    extent = (0, img_w, img_h, 0)
    cell_h, cell_w = img_h / H, img_w / W

    ncols = shown + 1
    fig, axes = plt.subplots(3, ncols, figsize=(1.9 * ncols + 0.6, 6.2), squeeze=False)
    vmax_r, vmax_c = float(row_mats[:shown].max()), float(col_mats[:shown].max())
    vmax_o = float(max(row_w[:shown].max(), col_w[:shown].max()))

    def overlay(ax, rw, cw, vmax):
        ax.imshow(image, extent=extent, interpolation='nearest')
        m = np.ma.masked_invalid(_overlay_map(rw, cw, token, (H, W)))
        im = ax.imshow(m, extent=extent, cmap='magma', alpha=0.65, vmin=0, vmax=vmax, interpolation='nearest')
        ax.add_patch(Rectangle((c * cell_w, r * cell_h), cell_w, cell_h, fill=False, ec='cyan', lw=1.5))
        return im

    # column 0: the input, the segment-mean overlay, and a legend
    ax = axes[0, 0]
    ax.imshow(image, extent=extent, interpolation='nearest')
    ax.add_patch(Rectangle((c * cell_w, r * cell_h), cell_w, cell_h, fill=False, ec='cyan', lw=1.5))
    ax.set_title(f'input, token ({r},{c})', fontsize=8)
    overlay(axes[1, 0], row_w.mean(0), col_w.mean(0), vmax_o)
    axes[1, 0].set_title('mean over segments', fontsize=8)
    axes[2, 0].axis('off')
    axes[2, 0].text(0, 0.5, f'rows: {W} tokens\ncolumns: {H} tokens\nuniform = 1/{W}'
                    + (f', 1/{H}' if H != W else '')
                    + (f'\n(first {shown} of {S}\nsegments)' if shown < S else f'\n{S} segments')
                    + '\n\nbottom: the token\'s\nweights over its row\nand column (its own\ncell: both self-weights)',
                    fontsize=8, va='center', transform=axes[2, 0].transAxes)
    for s in range(shown):
        ax = axes[0, s + 1]
        im_r = ax.imshow(row_mats[s], cmap='viridis', vmin=0, vmax=vmax_r, interpolation='nearest')
        ax.add_patch(Rectangle((-0.5, c - 0.5), W, 1, fill=False, ec='red', lw=1))
        ax.set_title(f'seg {s}: row {r}', fontsize=8)
        ax = axes[1, s + 1]
        im_c = ax.imshow(col_mats[s], cmap='viridis', vmin=0, vmax=vmax_c, interpolation='nearest')
        ax.add_patch(Rectangle((-0.5, r - 0.5), H, 1, fill=False, ec='red', lw=1))
        ax.set_title(f'seg {s}: column {c}', fontsize=8)
        im_o = overlay(axes[2, s + 1], row_w[s], col_w[s], vmax_o)
        axes[2, s + 1].set_title(f'seg {s}: token weights', fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 1].set_ylabel('output token', fontsize=7)
    axes[0, 1].set_xlabel('input token', fontsize=7)
    fig.colorbar(im_r, ax=list(axes[0, 1:]), fraction=0.02, pad=0.01)
    fig.colorbar(im_c, ax=list(axes[1, 1:]), fraction=0.02, pad=0.01)
    fig.colorbar(im_o, ax=list(axes[2, 1:]), fraction=0.02, pad=0.01)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def visualize(model_dir: str, image_path: str, block: str = '0.0', token: Optional[str] = None,
              output: str = 'mixing.png', max_segments: int = 8, dpi: int = 110) -> Dict[str, np.ndarray]:
    """Write the picture; return what it draws: the token's row and column matrices (S, N, N) and weights."""
    model = load_model(model_dir)
    stage, blk = parse_block(block, model)
    x, image = load_image(model, image_path)
    mats = block_mixing_matrices(model, x, stage, blk)
    grid = (mats['rows'].shape[0], mats['cols'].shape[0])  # (H rows, W columns)
    tok = parse_token(token, grid)
    probs = torch.from_numpy(mats['logits'][0]).softmax(-1)
    top = int(probs.argmax())
    labels = model.pretrained_cfg.get('label_names')
    name = labels[top] if isinstance(labels, (list, tuple)) and top < len(labels) else f'class {top}'
    title = (f'{Path(image_path).name}: block {stage}.{blk}, token ({tok[0]},{tok[1]}) of {grid[0]}x{grid[1]}; '
             f'prediction {name} ({probs[top]:.0%})')
    fig = draw(image, mats, tok, title=title, max_segments=max_segments)
    out = Path(output)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    import matplotlib.pyplot as plt
    fig.savefig(out, dpi=dpi, bbox_inches='tight')
    plt.close(fig)
    row_w, col_w = token_weights(mats, tok)
    r, c = tok
    return dict(row_matrices=mats['rows'][r], col_matrices=mats['cols'][c], row_weights=row_w, col_weights=col_w,
                token=tok, block=(stage, blk), output=str(out))


def run(args: argparse.Namespace) -> int:
    if args.max_segments < 1:
        raise ValueError('--max-segments must be at least 1.')
    result = visualize(args.model_dir, args.image, block=args.block, token=args.token, output=args.output,
                       max_segments=args.max_segments, dpi=args.dpi)
    stage, blk = result['block']
    print(f'wrote {result["output"]} (block {stage}.{blk}, token {result["token"][0]},{result["token"][1]}, '
          f'{result["row_matrices"].shape[0]} segments)')
    return 0
