"""Shared pieces of the training benchmarks: data, the naive baseline, timing, FLOPs, memory, tables.

The naive baseline is what public SAM fine-tuning scripts do with the official `segment_anything`
modules: per image one encoder call, then per object a Python loop over the prompt iterations
(prompt_encoder + mask_decoder on one object at a time), fp32, eager attention with explicit
relative-position terms, the loss of each object computed on its own.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from sam_train.losses.functional import dice_loss, focal_loss, mask_iou
from sam_train.losses.sam_loss import SamLossConfig
from sam_train.models.configs import SamConfig, sam_config
from sam_train.prompts.interactive import PromptSimulationConfig, iteration_schedule

Step = Callable[[], Any]


# ----------------------------------------------------------------------------- command line
def benchmark_parser(description: str | None, *, gpu_model: str, objects: int, steps: int,
                     precision_help: str) -> argparse.ArgumentParser:
    """A parser with the options of every training benchmark (each script passes its own defaults);
    the script adds its own options, then calls `parse_common_args`."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, gpu_model=gpu_model, objects=objects, steps=steps, precision_help=precision_help)
    return p


def add_common_args(p: argparse.ArgumentParser, *, gpu_model: str, objects: int, steps: int,
                    precision_help: str) -> None:
    """The options of every training benchmark; each script passes its own defaults."""
    p.add_argument("--model", default=None,
                   help=f"vit_t | vit_b | vit_l | vit_h (default: {gpu_model} on GPU, vit_t on CPU)")
    p.add_argument("--img-size", type=int, default=None, help="model input side (default: the model's)")
    p.add_argument("--batch-size", type=int, default=4, help="images per step")
    p.add_argument("--objects", type=int, default=objects, help="masks per image")
    p.add_argument("--iterations", type=int, default=11, help="prompt iterations per object")
    p.add_argument("--steps", type=int, default=steps, help="timed steps per side (median reported)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"), help=precision_help)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--smoke", action="store_true", help="vit_t, tiny batch, 3 iterations, 1 step: seconds")


def parse_common_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse `argv`; `--smoke` shrinks the run to vit_t at 128 px (unless --img-size), 2 images x 2 objects,
    3 prompt iterations, 1 timed step."""
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.batch_size, args.objects, args.iterations, args.steps = "vit_t", 2, 2, 3, 1
        args.img_size = args.img_size or 128
    return args


def setup_run(args: argparse.Namespace, *, gpu_model: str) -> tuple[torch.device, bool]:
    """(device, bf16) of the run: applies --threads and fills in the default --model (`gpu_model` on a GPU,
    vit_t on CPU). bf16 autocast is the default on a GPU only (bf16 matmuls are slow on CPU)."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    args.model = args.model or (gpu_model if device.type == "cuda" else "vit_t")
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    return device, bf16


def size_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """`build_sam` keyword overrides from --img-size (none: the model's own input side)."""
    return {"img_size": args.img_size} if args.img_size else {}


# ----------------------------------------------------------------------------- models
def build_official_sam(name: str, **overrides: Any):
    """The official `segment_anything.Sam` with the hyper-parameters of our registered size `name`."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    cfg: SamConfig = sam_config(name, **overrides)
    grid = cfg.img_size // cfg.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=cfg.encoder_depth, embed_dim=cfg.encoder_embed_dim, img_size=cfg.img_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=cfg.encoder_num_heads,
            patch_size=cfg.patch_size, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=cfg.encoder_global_attn_indexes, window_size=cfg.window_size,
            out_chans=cfg.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=cfg.prompt_embed_dim, image_embedding_size=(grid, grid),
            input_image_size=(cfg.img_size, cfg.img_size), mask_in_chans=cfg.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=cfg.decoder_depth, embedding_dim=cfg.prompt_embed_dim,
                                          mlp_dim=cfg.decoder_mlp_dim, num_heads=cfg.decoder_num_heads),
            transformer_dim=cfg.prompt_embed_dim, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def adamw(params, *, fused: bool) -> torch.optim.AdamW:
    """AdamW; `fused=True` uses the single-kernel implementation where this torch has it."""
    params = [p for p in params if p.requires_grad]
    if fused:
        try:
            return torch.optim.AdamW(params, lr=1e-5, fused=True)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.AdamW(params, lr=1e-5)


# ----------------------------------------------------------------------------- data
def make_batch(batch_size: int, img_size: int, objects: int, *, seed: int = 0, device="cpu") -> dict[str, Any]:
    """A `collate_sam`-format batch of generated shapes: exactly `objects` masks per image (ellipses and
    rectangles, 3-25% of the side, painted onto noise), all at model-input resolution S x S."""
    g = torch.Generator().manual_seed(seed)
    s = img_size
    yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32), indexing="ij")
    images = (torch.rand(batch_size, 3, s, s, generator=g) * 60 + 40).to(torch.uint8)
    masks = []
    for b in range(batch_size):
        for j in range(objects):
            cx, cy = (torch.rand(2, generator=g) * 0.7 + 0.15) * s
            rx, ry = (torch.rand(2, generator=g) * 0.22 + 0.03) * s
            if j % 2:
                mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
            else:
                mask = ((xx - cx).abs() <= rx) & ((yy - cy).abs() <= ry)
            images[b][:, mask] = (torch.rand(3, 1, generator=g) * 120 + 130).to(torch.uint8)
            masks.append(mask)
    return {
        "images": images.to(device),
        "masks": torch.stack(masks).to(device),
        "image_ids": torch.arange(batch_size).repeat_interleave(objects).to(device),
        "input_sizes": torch.full((batch_size, 2), s, dtype=torch.int64, device=device),
        "original_sizes": torch.full((batch_size, 2), s, dtype=torch.int64, device=device),
        "class_ids": torch.full((batch_size * objects,), -1, dtype=torch.int64, device=device),
        "ids": [f"bench_{b}" for b in range(batch_size)],
        "meta": [{} for _ in range(batch_size)],
    }


# ----------------------------------------------------------------------------- naive baseline
def _randint(n: int, g: torch.Generator) -> int:
    return int(torch.randint(0, n, (), generator=g))


def naive_object_loss(model, emb, pe, gt: torch.Tensor, cfg: PromptSimulationConfig, loss_cfg: SamLossConfig,
                      g: torch.Generator) -> torch.Tensor:
    """One object's interactive loop, the way per-object fine-tuning scripts write it. gt: bool [S, S]."""
    s = gt.shape[-1]
    ys, xs = torch.nonzero(gt, as_tuple=True)
    use_box = bool(torch.rand((), generator=g) < cfg.box_probability)
    coords, labels, box = [], [], None
    if use_box:
        box = torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).float()
        side = (box[2:] - box[:2]).repeat(2)
        noise = (torch.randn(4, generator=g).to(box.device) * cfg.box_noise_std * side).clamp(-cfg.box_max_noise,
                                                                                              cfg.box_max_noise)
        box = (box + noise).clamp(0, s - 1)[None]
    else:
        k = _randint(len(ys), g)
        coords, labels = [[float(xs[k]), float(ys[k])]], [1]
    prev, pred, total = None, None, 0.0
    gt_low = None
    for t, new_prompt in enumerate(iteration_schedule(cfg, g)):
        if new_prompt and t > 0:
            ey, ex = torch.nonzero(pred ^ gt, as_tuple=True)
            if len(ey) == 0:
                ey, ex = ys, xs
            k = _randint(len(ey), g)
            coords.append([float(ex[k]), float(ey[k])])
            labels.append(int(gt[ey[k], ex[k]]))
        points = None
        if coords:
            points = (torch.tensor([coords], device=gt.device), torch.tensor([labels], device=gt.device))
        sparse, dense = model.prompt_encoder(points=points, boxes=box, masks=prev)
        multimask = cfg.multimask_for_single_point and not use_box and len(coords) == 1
        low, iou = model.mask_decoder(image_embeddings=emb, image_pe=pe, sparse_prompt_embeddings=sparse,
                                      dense_prompt_embeddings=dense, multimask_output=multimask)
        if gt_low is None:
            gt_low = F.interpolate(gt[None, None].float(), size=low.shape[-2:], mode="area") >= 0.5
        mask_loss = loss_cfg.focal_weight * focal_loss(low, gt_low) + loss_cfg.dice_weight * dice_loss(low, gt_low)
        best = int(mask_loss.detach().argmin())
        iou_loss = ((iou - mask_iou(low.detach() > 0, gt_low)) ** 2).mean()
        total = total + mask_loss[0, best] + loss_cfg.iou_weight * iou_loss
        prev = low[:, best : best + 1].detach()
        pred = F.interpolate(prev, size=(s, s), mode="bilinear", align_corners=False)[0, 0] > 0
    return total


def naive_train_step(model, batch: dict[str, Any], optimizer, cfg: PromptSimulationConfig, loss_cfg: SamLossConfig,
                     g: torch.Generator) -> float:
    """Per image: encode it alone, loop over its objects, backward; then one optimiser step."""
    optimizer.zero_grad(set_to_none=True)
    n = batch["masks"].shape[0]
    total = 0.0
    for b in range(batch["images"].shape[0]):
        emb = model.image_encoder(model.preprocess(batch["images"][b : b + 1].float()))
        pe = model.prompt_encoder.get_dense_pe()
        loss = 0.0
        for j in torch.nonzero(batch["image_ids"] == b).flatten().tolist():
            loss = loss + naive_object_loss(model, emb, pe, batch["masks"][j], cfg, loss_cfg, g)
        (loss / n).backward()
        total += float(loss.detach()) / n
    optimizer.step()
    return total


# ----------------------------------------------------------------------------- sam_train side
def prompt_config(iterations: int) -> PromptSimulationConfig:
    """The SAM paper's prompt simulation with `iterations` decoder passes (2 mask-only when they fit)."""
    return PromptSimulationConfig(num_iterations=iterations, num_mask_only=min(2, iterations - 1))


def make_module(model: torch.nn.Module, cfg: PromptSimulationConfig, **kwargs: Any):
    """The LightningModule whose run_prompts is the training step's forward (no Trainer needed)."""
    from sam_train.lit.sam_module import SamModule

    return SamModule(model=model, prompts=cfg, loss=SamLossConfig(), optimizer=torch.optim.AdamW,
                     param_groups=lambda m: [{"params": [p for p in m.parameters() if p.requires_grad]}], **kwargs)


def sam_train_step(module, next_batch: Callable[[], dict[str, Any]], optimizer, cfg: PromptSimulationConfig,
                   bf16: bool) -> Step:
    """One sam_train training step as Lightning runs SamModule.training_step + the optimiser; the batch
    is either `images` (encoded in the step) or cached `embeddings` (decoder-only)."""
    count = [0]

    def step() -> None:
        batch = next_batch()
        gen = torch.Generator(device=module.device).manual_seed(count[0])
        count[0] += 1
        ctx = torch.autocast(module.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            loss = module.run_prompts(batch, cfg, gen).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# ----------------------------------------------------------------------------- measurement
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)




def count_flops(step: Step) -> int:
    """FLOPs of one call of `step` counted by torch.utils.flop_counter (matmuls, convs, attention)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(step: Step, device: torch.device) -> tuple[int, str]:
    """(bytes, method) of one `step`. CUDA: torch.cuda.max_memory_allocated (weights, optimiser state,
    activations). CPU: growth of the peak resident set (ru_maxrss) over the RSS before the step, in a
    forked child so earlier runs in this process do not hide it (call before other steps have run)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: one step, report the peak RSS growth, exit without cleanup
        code = 1
        try:
            # the parent's OpenMP pool does not survive fork(): a parallel region with more than one
            # thread would wait forever for it (the step's peak memory does not depend on threads)
            torch.set_num_threads(1)
            os.close(read)
            before = _rss_bytes()
            step()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            os.write(write, str(max(peak - before, 0)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not text:
        raise RuntimeError(f"memory measurement child failed (wait status {status})")
    return int(text), "CPU peak RSS growth (ru_maxrss, forked child)"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def mfu(flops: float, seconds: float, peak_tflops: float | None) -> str:
    if not peak_tflops:
        return "n/a"
    return f"{100 * flops / seconds / (peak_tflops * 1e12):.1f}%"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A markdown table (pastes into scaling.md as is)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print(line(r))


def check_ratio(ratio: float) -> float:
    if not (math.isfinite(ratio) and ratio > 0):
        raise RuntimeError(f"benchmark ratio is not a positive finite number: {ratio}")
    return ratio


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads, load avg {load:.1f})"


def interleaved_seconds(steps_by_name: dict[str, Step], device: torch.device, *, steps: int,
                        warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each step, timed in alternation (A B A B ...) so that a change of
    machine load affects all of them alike."""
    for step in steps_by_name.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps_by_name}
    for _ in range(steps):
        for name, step in steps_by_name.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}
