"""Samples/s of the shard reader vs a naive per-image COCO json loader on the same generated data set.

The data set: photo-like JPEG images (a smooth background with mild noise, random polygons painted on
it: ellipses, rectangles, triangles), annotated as a COCO json with polygon segmentations (as COCO
itself); 100 objects per image by default, as SA-1B (its images average ~100 masks). The naive loader
is what fine-tuning scripts usually do per image: open the image, rasterise each annotation with
pycocotools' annToMask, stack.
The same json is converted once to SA-1B-style shards (`sam_train.data.convert`), which the
ShardDataset streams (sequential tar reads; the compressed RLEs of an image validated and decoded in
one vectorised pass; JPEG decoded by torchvision straight into [3, H, W]).

    python benchmarks/data_loading.py            # 300 images x 100 objects, 256 px
    python benchmarks/data_loading.py --objects 48
    python benchmarks/data_loading.py --smoke    # a few samples, seconds (run by the tests)
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO

from sam_train.data.coco import load_coco
from sam_train.data.convert import convert
from sam_train.data.webdataset import ShardDataset


def make_dataset(root: Path, n: int, size: int, objects: int, seed: int = 0) -> tuple[Path, Path]:
    """n JPEG images with `objects` random polygons each + a COCO json of polygon annotations."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)
    image_dir = root / "images"
    image_dir.mkdir(parents=True)
    images, anns = [], []
    for i in range(n):
        colour = rng.uniform(40, 200, (2, 3))  # background: a gradient between two colours
        background = colour[0] + (colour[1] - colour[0]) * ramp[:, None, None] * ramp[None, :, None]
        canvas = Image.fromarray(background.astype(np.uint8))
        draw = ImageDraw.Draw(canvas)
        for _ in range(objects):
            cx, cy = rng.uniform(0.1, 0.9, 2) * size
            rx, ry = rng.uniform(0.03, 0.15, 2) * size
            k = int(rng.choice([3, 4, 24]))  # triangle, rectangle-ish, ellipse
            t = np.linspace(0, 2 * math.pi, k, endpoint=False) + rng.uniform(0, math.pi)
            poly = np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1).clip(0, size - 1)
            draw.polygon([tuple(p) for p in poly.tolist()], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
            anns.append({"id": len(anns), "image_id": i, "category_id": k, "iscrowd": 0,
                         "segmentation": [poly.flatten().round(2).tolist()], "area": 0.0,
                         "bbox": [*poly.min(0).tolist(), *(poly.max(0) - poly.min(0)).tolist()]})
        noise = rng.normal(0, 4, (size, size, 3))  # sensor-like noise, so the JPEGs are not trivially smooth
        pixels = (np.asarray(canvas, np.float64) + noise).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(image_dir / f"{i:06d}.jpg", quality=90)
        images.append({"id": i, "file_name": f"{i:06d}.jpg", "height": size, "width": size})
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": []}))
    return path, image_dir


def naive_sample(coco: COCO, image_dir: Path, image_id: int) -> dict:
    """What fine-tuning scripts do per image: PIL image + annToMask per annotation -> the sample tensors."""
    info = coco.imgs[image_id]
    image = torch.from_numpy(np.array(Image.open(image_dir / info["file_name"]).convert("RGB"))).permute(2, 0, 1)
    masks = np.stack([coco.annToMask(a) for a in coco.imgToAnns[image_id]]).astype(bool)
    return {"image": image, "masks": torch.from_numpy(masks), "id": str(image_id)}


def naive_coco_loader(coco: COCO, image_dir: Path):
    """The usual per-image loop over the whole json."""
    for image_id in coco.getImgIds():
        yield naive_sample(coco, image_dir, image_id)


def samples_per_second(make_iter, repeats: int) -> tuple[float, int]:
    best, count = 0.0, 0
    for _ in range(repeats):
        start, count = time.perf_counter(), 0
        for sample in make_iter():
            count += int(sample["masks"].shape[0] > 0)
        best = max(best, count / (time.perf_counter() - start))
    return best, count


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="images")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--objects", type=int, default=100, help="objects per image (SA-1B: ~100)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (best is reported)")
    parser.add_argument("--smoke", action="store_true", help="a few samples, seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.size, args.objects, args.repeats = 8, 64, 4, 1
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        json_path, image_dir = make_dataset(Path(tmp), args.n, args.size, args.objects)
        convert("coco", json_path, Path(tmp) / "shards", image_dir=image_dir, shard_size=100,
                image_format="keep", progress=False)  # the shards hold the same JPEG files
        coco = load_coco(json_path)
        shards = ShardDataset(Path(tmp) / "shards", shuffle_buffer=min(100, args.n))
        samples_per_second(lambda: naive_coco_loader(coco, image_dir), 1)  # warm the page cache
        naive, n_naive = samples_per_second(lambda: naive_coco_loader(coco, image_dir), args.repeats)
        shard, n_shard = samples_per_second(lambda: iter(shards), args.repeats)
        # same data out of both: every sample's masks (bool [N, H, W], same memory layout) and image
        # (the same JPEG bytes; Pillow and torchvision may round the colour conversion differently)
        for sample in shards:
            reference = naive_sample(coco, image_dir, int(sample["id"]))
            assert torch.equal(sample["masks"], reference["masks"]), sample["id"]
            assert sample["masks"].stride() == reference["masks"].stride(), sample["id"]
            assert (sample["image"].int() - reference["image"].int()).abs().max() <= 1, sample["id"]
    assert n_naive == n_shard == args.n, (n_naive, n_shard, args.n)
    ratio = shard / naive
    print(f"data set: {args.n} images {args.size}x{args.size}, {args.objects} polygon objects each")
    print(f"naive per-image COCO json loader: {naive:8.1f} samples/s")
    print(f"shard reader (ShardDataset):      {shard:8.1f} samples/s")
    print(f"ratio shard / naive: {ratio:.2f}x (goal >= 3x)")
    return ratio


if __name__ == "__main__":
    main()
