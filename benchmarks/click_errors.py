"""Which errors do the correction clicks of the medical evaluation meet, and what does each click do?

The protocol of `benchmarks/medical_finetune.py` (tight box, then clicks from RITM's clicker at the deepest
error pixel, previous logits fed back), traced per click on the held-out objects: Dice after each click,
the share of negative clicks, the share of clicks that land on an error only one pixel wide at the native
resolution (depth <= 1.5 px), and the mean Dice change of each click by its label and by that depth. A model
whose clicks lose Dice on top of a good box shows here whether the clicks meet fixable errors.

    python benchmarks/click_errors.py                                   # zero-shot LiteMedSAM, demo split
    python benchmarks/click_errors.py --checkpoint runs/medical_demo/<time>/checkpoints/last.ckpt
    python benchmarks/click_errors.py --checkpoint ... --data /data/mni_neuromorphometrics --json out.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from medical_finetune import (
    add_held_out_args,
    check_data_args,
    held_out_objects,
    held_out_set,
    lite_medsam,
    model_input,
    write_json,
)

from sam_train.eval.objects import box_then_clicks

THIN = 1.5  # px: an error this deep at the click is one pixel wide there (diagonal neighbours: sqrt(2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None, help="fine-tuned weights (default: zero-shot LiteMedSAM)")
    add_held_out_args(p)
    p.add_argument("--clicks", type=int, default=5, help="correction clicks on top of the box")
    return check_data_args(p, p.parse_args(argv))


def trace(model, val, *, clicks: int, max_images: int | None) -> dict[str, torch.Tensor]:
    """Per held-out object: "dice" [N, clicks + 1] (box, then after each click), "labels" and "depths" [N, clicks]."""
    model.eval()
    dice, labels, depths = [], [], []
    with torch.no_grad():
        for _, image, masks in held_out_objects(val, max_images):
            emb = model.encode(model.preprocess(model_input(image)[None]))[0]
            s = box_then_clicks(model, emb, masks, clicks=tuple(range(1, clicks + 1)), trace=True)
            dice.append(torch.stack([s["box"], *(s[f"clicks_{k}"] for k in range(1, clicks + 1))], 1))
            labels.append(s["click_labels"])
            depths.append(s["click_depths"])
    return {"dice": torch.cat(dice), "labels": torch.cat(labels), "depths": torch.cat(depths)}


def summarise(t: dict[str, torch.Tensor]) -> list[dict[str, float | int | None]]:
    """One row per click: Dice after it, its share of negative / thin-error clicks, mean Dice changes."""
    def mean(x: torch.Tensor) -> float | None:
        return float(x.mean()) if x.numel() else None

    rows = []
    for k in range(t["labels"].shape[1]):
        delta = t["dice"][:, k + 1] - t["dice"][:, k]
        lab, depth = t["labels"][:, k], t["depths"][:, k]
        clicked = lab >= 0  # -1: the object was perfect, no click
        thin = clicked & (depth <= THIN)
        rows.append({"click": k + 1, "dice": float(t["dice"][:, k + 1].mean()), "clicks": int(clicked.sum()),
                     "negative_share": float((lab == 0).sum() / clicked.sum().clamp_min(1)),
                     "thin_share": float(thin.sum() / clicked.sum().clamp_min(1)),
                     "delta_positive": mean(delta[lab == 1]), "delta_negative": mean(delta[lab == 0]),
                     "delta_thin": mean(delta[thin]), "delta_deeper": mean(delta[clicked & ~thin])})
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    val = held_out_set(args, "click_errors_")
    model = lite_medsam(args.checkpoint)
    t = trace(model, val, clicks=args.clicks, max_images=3 if args.smoke else None)
    rows = summarise(t)
    box = float(t["dice"][:, 0].mean())
    print(f"{args.checkpoint or 'zero-shot LiteMedSAM'}: {t['dice'].shape[0]} held-out objects ({val.case_ids}), "
          f"box Dice {box:.4f}; depth = the clicked error's distance to its edge at the click, native px")
    print("| click | Dice after | negative | on 1-px errors | dDice positive | dDice negative | dDice 1-px "
          "| dDice deeper |")
    print("|---|---|---|---|---|---|---|---|")

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:+.4f}"

    for r in rows:
        print(f"| {r['click']} | {r['dice']:.4f} | {r['negative_share']:.0%} | {r['thin_share']:.0%} | "
              f"{f(r['delta_positive'])} | {f(r['delta_negative'])} | {f(r['delta_thin'])} | {f(r['delta_deeper'])} |")
    result = {"checkpoint": str(args.checkpoint) if args.checkpoint else None, "objects": int(t["dice"].shape[0]),
              "box_dice": box, "clicks": rows}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
