"""How fine must a predicted mask be to reach a Dice target on these objects? The token-grid reference.

LiteMedSAM sees a 256 px input as 64 x 64 image tokens (~3.4 native px each on the demo's 218 px slices). This
sends the held-out ground truth of `benchmarks/medical_finetune.py` (same split, same objects >= 20 px) through
a g x g grid over the model input: area-averaged onto the grid, bilinearly upsampled back to the native
slice and thresholded at 0.5, exactly as the model's logits are (`Sam.postprocess_masks`). The Dice that
survives is what a mask with no detail finer than that grid scores. It is a reference, not a bound: the
decoder upsamples its tokens 4x with learned features and can draw some sub-token detail.

    python benchmarks/token_grid.py                                  # demo split
    python benchmarks/token_grid.py --data /data/mni_neuromorphometrics --json out.json
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from medical_finetune import (
    IMG_SIZE,
    add_held_out_args,
    check_data_args,
    held_out_objects,
    held_out_set,
    write_json,
)

from sam_train.eval.metrics import dice
from sam_train.models.resize import preprocess_shape
from sam_train.models.sam import postprocess_logits

GRIDS = (32, 64, 128, 256)  # cells per side of the model input; 64 = LiteMedSAM's image tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_held_out_args(p)
    return check_data_args(p, p.parse_args(argv))


def grid_dice(masks: torch.Tensor, grid: int) -> torch.Tensor:
    """bool [M, H, W] native masks -> Dice [M] of the masks after a round trip through a grid x grid grid over
    the (longest side resized, zero padded) model input."""
    h, w = masks.shape[-2:]
    ih, iw = preprocess_shape(h, w, IMG_SIZE)
    frame = torch.zeros(masks.shape[0], 1, IMG_SIZE, IMG_SIZE)
    frame[..., :ih, :iw] = F.interpolate(masks[:, None].float(), (ih, iw), mode="bilinear", antialias=True)
    cells = F.adaptive_avg_pool2d(frame, grid)  # the share of each cell the object covers
    back = postprocess_logits(cells, IMG_SIZE, (ih, iw), (h, w))[:, 0] > 0.5
    return dice(back, masks)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    val = held_out_set(args, "token_grid_")
    scores: dict[int, list[torch.Tensor]] = {g: [] for g in GRIDS}
    native = 0  # the longest side of the scored slices
    for _, _, masks in held_out_objects(val, 3 if args.smoke else None):
        native = max(native, *masks.shape[-2:])
        for g in GRIDS:
            scores[g].append(grid_dice(masks, g))
    n = sum(len(s) for s in scores[GRIDS[0]])
    print(f"{n} held-out objects ({val.case_ids}); native slices up to {native} px, model input {IMG_SIZE} px")
    print("| grid over the input | native px per cell | Dice of the ground truth through it |")
    print("|---|---|---|")
    rows = []
    for g in GRIDS:
        d = float(torch.cat(scores[g]).mean())
        rows.append({"grid": g, "native_px_per_cell": native / g, "dice": d})
        print(f"| {g} x {g}{' (LiteMedSAM tokens)' if g == IMG_SIZE // 4 else ''} | {native / g:.2f} | {d:.4f} |")
    result = {"objects": n, "grids": rows}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
