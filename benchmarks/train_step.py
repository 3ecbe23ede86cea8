"""Images/s, peak memory and MFU of one full SAM training step: sam_train vs a naive baseline.

One step = image encoder + the interactive prompt loop (11 decoder iterations per object) + SAM loss +
backward + AdamW. Both sides get the same generated batch (a fixed number of shapes per image), the
same weights and the same prompt schedule settings; they are timed in alternation in one process.

- naive: the official `segment_anything` modules as public fine-tuning scripts use them: fp32, eager
  attention with explicit rel-pos terms, per image an encoder call, per object a Python loop over
  prompt_encoder + mask_decoder, the loss per object, torch's default AdamW.
- sam_train: `SamModule.run_prompts` (encode the batch once, `simulate` all objects of the batch per
  decoder pass, vectorised prompt sampling on the device), SDPA attention with the rel-pos bias, bf16
  autocast on a GPU (fp32 on CPU), fused AdamW, optionally torch.compile / activation checkpointing.

MFU = counted FLOPs per step (torch.utils.flop_counter) / step time / --peak-tflops. The encoder rows
time the image encoder's forward + backward alone (batched, both sides), the part that dominates SAM.

    python benchmarks/train_step.py --model vit_t                       # CPU
    python benchmarks/train_step.py --model vit_b --batch-size 4        # GPU, 1024 px
    python benchmarks/train_step.py --model vit_h --batch-size 4 --grad-checkpointing --skip-baseline
    python benchmarks/train_step.py --model vit_t --ddp 2 --threads 1   # CPU gloo DDP: 1 vs 2 processes
    python benchmarks/train_step.py --model vit_t --skip-baseline --objects 32 --checkpoint-prompt-loop
    python benchmarks/train_step.py --smoke                              # seconds (run by the tests)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import (
    adamw,
    benchmark_parser,
    build_official_sam,
    check_ratio,
    count_flops,
    describe_device,
    fmt_bytes,
    interleaved_seconds,
    make_batch,
    make_module,
    mfu,
    naive_train_step,
    parse_common_args,
    peak_memory,
    print_table,
    prompt_config,
    sam_train_step,
    setup_run,
    size_overrides,
)
from torch import nn

from sam_train.lit.sam_module import SamModule
from sam_train.losses.sam_loss import SamLossConfig
from sam_train.models import build_sam
from sam_train.prompts.interactive import PromptSimulationConfig

H100_BF16_DENSE_TFLOPS = 989.0
GPU_MODEL = "vit_b"  # default --model on a GPU


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = benchmark_parser(__doc__, gpu_model=GPU_MODEL, objects=8, steps=3,
                         precision_help="sam_train side (auto: bf16 on GPU, fp32 on CPU, where bf16 matmuls are slow)")
    p.add_argument("--compile", action="store_true", help="torch.compile the sam_train image encoder")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing (sam_train side)")
    p.add_argument("--checkpoint-prompt-loop", action="store_true",
                   help="also measure sam_train with the prompt loop's decoder + loss recomputed in backward")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"peak of the device for MFU (default {H100_BF16_DENSE_TFLOPS} = H100 bf16 dense on GPU; "
                        "none on CPU: FLOP/s only)")
    p.add_argument("--skip-baseline", action="store_true", help="sam_train rows only (e.g. vit_h memory)")
    p.add_argument("--ddp", type=int, default=0, help="also measure CPU gloo DDP with 1 vs N processes")
    return parse_common_args(p, argv)


def encoder_step_fn(encode, preprocess, images: torch.Tensor, bf16: bool, params):
    def step() -> None:
        ctx = torch.autocast(images.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            out = encode(preprocess(images.float()))
        out.float().square().mean().backward()
        for p in params:
            p.grad = None

    return step


# ----------------------------------------------------------------------------- DDP (CPU, gloo)
class _StepLoss(nn.Module):
    """Wraps the SamModule forward so DDP sees one forward per step (as Lightning's wrapper does)."""

    def __init__(self, module: SamModule, cfg: PromptSimulationConfig) -> None:
        super().__init__()
        self.module, self.cfg = module, cfg

    def forward(self, batch: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
        return self.module.run_prompts(batch, self.cfg, gen).loss


def _ddp_worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(args.threads or 1)
    torch.manual_seed(0)
    cfg = prompt_config(args.iterations)
    module = make_module(build_sam(args.model, **size_overrides(args)), cfg)
    ddp = nn.parallel.DistributedDataParallel(_StepLoss(module, cfg), find_unused_parameters=True)
    opt = adamw(module.parameters(), fused=True)
    batch = make_batch(args.batch_size, module.model.img_size, args.objects, seed=rank)

    def step(i: int) -> None:
        ddp(batch, torch.Generator().manual_seed(i)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(0)  # warm-up
    dist.barrier()
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(i + 1)
    dist.barrier()
    elapsed = torch.tensor(time.perf_counter() - t0)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    if rank == 0:
        Path(out).write_text(str(world * args.batch_size * args.steps / float(elapsed)))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_images_per_second(world: int, args: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result")
        mp.spawn(_ddp_worker, args=(world, _free_port(), args, out), nprocs=world, join=True)
        return float(Path(out).read_text())


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    device, bf16 = setup_run(args, gpu_model=GPU_MODEL)
    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        peak = H100_BF16_DENSE_TFLOPS
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the naive fp32 baseline is what forks run: true fp32

    torch.manual_seed(0)
    ours = build_sam(args.model, grad_checkpointing=args.grad_checkpointing, **size_overrides(args)).to(device).train()
    cfg = prompt_config(args.iterations)
    module = make_module(ours, cfg)
    opt = adamw(ours.parameters(), fused=True)
    batch = make_batch(args.batch_size, ours.img_size, args.objects, device=device)
    steps = {"sam_train": sam_train_step(module, lambda: batch, opt, cfg, bf16)}
    if args.checkpoint_prompt_loop:  # same model and optimiser, only the module's flag differs
        ckpt_module = make_module(ours, cfg, checkpoint_prompt_loop=True)
        steps["sam_train_ckpt"] = sam_train_step(ckpt_module, lambda: batch, opt, cfg, bf16)
    enc_steps = {"sam_train": encoder_step_fn(ours.encode, ours.preprocess, batch["images"], bf16,
                                              list(ours.image_encoder.parameters()))}
    if not args.skip_baseline:
        naive = build_official_sam(args.model, **size_overrides(args)).to(device).train()
        naive.load_state_dict(ours.state_dict())
        naive_opt = torch.optim.AdamW(naive.parameters(), lr=1e-5)
        gen = torch.Generator().manual_seed(0)
        steps = {"naive": lambda: naive_train_step(naive, batch, naive_opt, cfg, SamLossConfig(), gen), **steps}
        enc_steps = {"naive": encoder_step_fn(naive.image_encoder, naive.preprocess, batch["images"], False,
                                              list(naive.image_encoder.parameters())), **enc_steps}

    memory = {name: peak_memory(step, device) for name, step in steps.items()}  # first: see peak_memory
    flops = {name: count_flops(step) for name, step in steps.items()}  # also the warm-up steps
    enc_flops = {name: count_flops(step) for name, step in enc_steps.items()}
    if args.compile:
        ours.image_encoder = torch.compile(ours.image_encoder)
        enc_steps["sam_train"] = encoder_step_fn(ours.encode, ours.preprocess, batch["images"], bf16,
                                                 list(ours.image_encoder.parameters()))
    seconds = interleaved_seconds(steps, device, steps=args.steps, warmup=1 if args.compile else 0)
    enc_seconds = interleaved_seconds(enc_steps, device, steps=args.steps, warmup=1)

    b = args.batch_size
    labels = {
        "naive": "naive (official modules, fp32, eager, per-object loop)",
        "sam_train": f"sam_train ({'bf16' if bf16 else 'fp32'}, SDPA, batched prompts, fused AdamW"
                     f"{', compile' if args.compile else ''}{', act. ckpt' if args.grad_checkpointing else ''})",
        "sam_train_ckpt": "sam_train (same, + prompt loop recomputed in backward)",
    }
    rows = []
    for name in steps:
        t, f = seconds[name], flops[name]
        rows.append([f"{labels[name]}: full step", f"{b / t:.3f}", f"{1e3 * t:.0f}", fmt_bytes(memory[name][0]),
                     f"{f / 1e9:.1f}", f"{f / t / 1e12:.3f}", mfu(f, t, peak)])
    for name in enc_steps:
        t, f = enc_seconds[name], enc_flops[name]
        rows.append([f"{labels[name].split(' (')[0]}: image encoder fwd+bwd", f"{b / t:.3f}", f"{1e3 * t:.0f}", "",
                     f"{f / 1e9:.1f}", f"{f / t / 1e12:.3f}", mfu(f, t, peak)])
    print(f"device: {describe_device(device)}; model {args.model} at {ours.img_size} px, batch {b} images x "
          f"{args.objects} objects, {args.iterations} prompt iterations; median of {args.steps} steps")
    print(f"memory: {next(iter(memory.values()))[1]}; MFU relative to "
          f"{f'{peak} TFLOP/s' if peak else 'n/a (pass --peak-tflops for this CPU)'}")
    print_table(["path", "images/s", "ms/step", "peak memory", "GFLOP/step", "TFLOP/s", "MFU"], rows)
    result = {"sam_train_images_per_s": b / seconds["sam_train"]}
    if not args.skip_baseline:
        result["ratio"] = check_ratio(seconds["naive"] / seconds["sam_train"])
        result["encoder_ratio"] = check_ratio(enc_seconds["naive"] / enc_seconds["sam_train"])
        print(f"ratio encoder fwd+bwd sam_train / naive: {result['encoder_ratio']:.2f}x")
        print(f"ratio sam_train / naive images/s: {result['ratio']:.2f}x (goal >= 2.5x for vit_b at 1024 px on a GPU)")
    if args.checkpoint_prompt_loop:
        result["prompt_loop_memory_ratio"] = memory["sam_train"][0] / max(memory["sam_train_ckpt"][0], 1)
        result["prompt_loop_time_ratio"] = seconds["sam_train_ckpt"] / seconds["sam_train"]
        print(f"prompt loop recomputed in backward: peak memory / {result['prompt_loop_memory_ratio']:.2f}, "
              f"step time x {result['prompt_loop_time_ratio']:.2f}")
    if args.ddp > 1:
        one = ddp_images_per_second(1, args)
        many = ddp_images_per_second(args.ddp, args)
        print(f"CPU gloo DDP, {args.threads or 1} thread(s) per process, {b} images per process per step:")
        print_table(["processes", "images/s"], [[1, f"{one:.3f}"], [args.ddp, f"{many:.3f}"]])
        result["ddp_ratio"] = check_ratio(many / one)
        print(f"ratio DDP {args.ddp} processes / 1 process images/s: {result['ddp_ratio']:.2f}x (ideal {args.ddp}x)")
    return result


if __name__ == "__main__":
    main()
