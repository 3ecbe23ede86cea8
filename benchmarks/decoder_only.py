"""Samples/s of decoder-only training on cached embeddings vs training with a frozen image encoder.

Both sides train the prompt encoder + mask decoder (image encoder frozen, `finetune=decoder_only`) with
`SamModule.run_prompts` + SAM loss + fused AdamW on the same generated images, timed in alternation:

- frozen encoder: every step runs the image encoder forward on the batch's images (no backward),
  as `sam-train fit finetune=decoder_only` does with image data;
- cached embeddings: the images were encoded once (`sam_train.embed.embed_dataset`, the code behind
  `sam-train embed`); each step reads its batch from the shards (EmbeddingDataset + DataLoader,
  RLE-decoded masks) and never calls the encoder (`data=embeddings`).

The one-off embedding pass is reported too (its images/s bounds how soon the cache pays off).

    python benchmarks/decoder_only.py --model vit_t                   # CPU
    python benchmarks/decoder_only.py --model vit_h --objects 64      # GPU (bf16)
    python benchmarks/decoder_only.py --smoke                         # seconds (run by the tests)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from itertools import cycle

import torch
from common import (
    adamw,
    benchmark_parser,
    check_ratio,
    count_flops,
    describe_device,
    interleaved_seconds,
    make_batch,
    make_module,
    parse_common_args,
    print_table,
    prompt_config,
    sam_train_step,
    setup_run,
    size_overrides,
    synchronize,
)
from torch.utils.data import DataLoader

from sam_train.data.embeddings import EmbeddingDataset, collate_embeddings
from sam_train.embed import embed_dataset
from sam_train.finetune import apply_finetune
from sam_train.models import build_sam

GPU_MODEL = "vit_h"  # default --model on a GPU


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = benchmark_parser(__doc__, gpu_model=GPU_MODEL, objects=16, steps=4,
                         precision_help="autocast of both sides (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--dtype", default="fp16", help="embedding storage: fp16 | bf16 | fp32")
    return parse_common_args(p, argv)


def forever(loader):
    """Epoch after epoch, every batch read from the shards again (itertools.cycle would replay copies)."""
    while True:
        yield from loader


class _Images(torch.utils.data.Dataset):
    """Transformed-sample view of a generated batch (what embed_dataset reads)."""

    def __init__(self, batch):
        self.batch = batch

    def __len__(self) -> int:
        return self.batch["images"].shape[0]

    def __getitem__(self, i: int):
        keep = self.batch["image_ids"] == i
        s = self.batch["images"].shape[-1]
        return {"image": self.batch["images"][i].cpu(), "masks": self.batch["masks"][keep].cpu(),
                "class_ids": self.batch["class_ids"][keep].cpu(), "input_size": (s, s), "original_size": (s, s),
                "id": self.batch["ids"][i], "source": "generated"}


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    device, bf16 = setup_run(args, gpu_model=GPU_MODEL)
    torch.manual_seed(0)
    model = apply_finetune(build_sam(args.model, **size_overrides(args)), freeze=["image_encoder"]).to(device).train()
    cfg = prompt_config(args.iterations)
    module = make_module(model, cfg)
    opt = adamw(model.parameters(), fused=True)
    b = args.batch_size
    n_images = 2 * b  # two distinct batches per side
    data = make_batch(n_images, model.img_size, args.objects, device=device)

    with tempfile.TemporaryDirectory() as tmp:
        synchronize(device)
        start = time.perf_counter()
        embed_dataset(model, _Images(data), tmp, batch_size=b, shard_size=n_images, dtype=args.dtype,
                      precision="bf16" if bf16 else "fp32", progress=False)
        synchronize(device)
        embed_seconds = time.perf_counter() - start
        model.train()
        loader = DataLoader(EmbeddingDataset(root=tmp, img_size=model.img_size), batch_size=b,
                            collate_fn=collate_embeddings, pin_memory=device.type == "cuda")
        cached = forever(loader)
        frozen = cycle([make_batch(b, model.img_size, args.objects, seed=k, device=device) for k in range(2)])

        def next_cached():
            batch = next(cached)
            return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

        steps = {
            "frozen": sam_train_step(module, lambda: next(frozen), opt, cfg, bf16),
            "cached": sam_train_step(module, next_cached, opt, cfg, bf16),
        }
        encoder_calls = []
        hook = model.image_encoder.register_forward_hook(lambda *a: encoder_calls.append(1))
        flops = {name: count_flops(step) for name, step in steps.items()}  # also the warm-up steps
        seconds = interleaved_seconds(steps, device, steps=args.steps, warmup=0)
        hook.remove()
    assert len(encoder_calls) == args.steps + 1, "only the frozen-encoder side may run the image encoder"

    print(f"device: {describe_device(device)}; model {args.model} at {model.img_size} px, batch {b} images x "
          f"{args.objects} objects, {args.iterations} prompt iterations, {'bf16' if bf16 else 'fp32'}; "
          f"median of {args.steps} steps; embeddings stored as {args.dtype}")
    print_table(["path", "images/s", "ms/step", "GFLOP/step"], [
        ["frozen image encoder (encoder forward every step)", f"{b / seconds['frozen']:.3f}",
         f"{1e3 * seconds['frozen']:.0f}", f"{flops['frozen'] / 1e9:.1f}"],
        ["cached embeddings (EmbeddingDataset shards)", f"{b / seconds['cached']:.3f}",
         f"{1e3 * seconds['cached']:.0f}", f"{flops['cached'] / 1e9:.1f}"],
        ["one-off embedding pass (sam-train embed)", f"{n_images / embed_seconds:.3f}",
         f"{1e3 * embed_seconds * b / n_images:.0f}", ""],
    ])
    ratio = check_ratio(seconds["frozen"] / seconds["cached"])
    print(f"FLOP ratio frozen / cached (the speed-up at equal efficiency): {flops['frozen'] / flops['cached']:.2f}")
    print(f"ratio cached / frozen-encoder images/s: {ratio:.2f}x (goal >= 20x for vit_h on a GPU)")
    return ratio


if __name__ == "__main__":
    main()
