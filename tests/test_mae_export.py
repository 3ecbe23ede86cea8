"""MAE -> SAM export: block weights carried over, position grid bicubic-resampled, SAM's own init elsewhere."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch

from sam_train.export.mae_to_sam import export_mae_to_sam, mae_to_sam_state_dict
from sam_train.models import build_sam
from sam_train.models.checkpoint import CheckpointError
from sam_train.models.mae import build_mae
from sam_train.models.pos_embed import interpolate_pos_embed_grid


def _cubic(t: float, a: float = -0.75) -> list[float]:
    """Keys cubic-convolution weights of the 4 taps at offsets -1, 0, 1, 2 for fractional position t."""

    def k(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        if x < 2:
            return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
        return 0.0

    return [k(t + 1), k(t), k(1 - t), k(2 - t)]


def _bicubic_numpy(grid: np.ndarray, out: int) -> np.ndarray:
    """Independent separable bicubic resize of [n, n, C] (half-pixel centres, edge taps clamped)."""

    def resize_axis0(x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        rows = []
        for i in range(out):
            src = (i + 0.5) * n / out - 0.5
            base = math.floor(src)
            taps = [min(max(base + o, 0), n - 1) for o in (-1, 0, 1, 2)]
            rows.append(sum(w * x[j] for w, j in zip(_cubic(src - base), taps, strict=True)))
        return np.stack(rows)

    return resize_axis0(resize_axis0(grid).transpose(1, 0, 2)).transpose(1, 0, 2)


def _random_mae(name: str, seed: int, **overrides):
    torch.manual_seed(seed)
    mae = build_mae(name, **overrides)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mae.parameters():  # every weight distinct, position table included
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return mae


def _to_official_layout(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """facebookresearch/mae checkpoint: {"model": state dict with timm names (mlp.fc1 / mlp.fc2)}."""
    return {
        "model": {k.replace(".mlp.lin1.", ".mlp.fc1.").replace(".mlp.lin2.", ".mlp.fc2."): v for k, v in sd.items()}
    }


def test_export_carries_blocks_and_resamples_position_grid():
    mae = _random_mae("mae_vit_t", seed=0)  # 128 px -> 8x8 grid; SAM vit_t: 256 px -> 16x16
    sd = mae_to_sam_state_dict(mae.state_dict(), "vit_t", img_size=256)
    assert all(k.startswith("image_encoder.") for k in sd)
    sam = build_sam("vit_t")
    result = sam.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys
    assert {k.split(".")[0] for k in result.missing_keys} == {"prompt_encoder", "mask_decoder"}

    mae_sd = mae.state_dict()
    block_keys = [k for k in sd if k.startswith("image_encoder.blocks.") and ".rel_pos_" not in k]
    assert len(block_keys) == 4 * 12
    for key in block_keys:
        assert torch.equal(sd[key], mae_sd[key.removeprefix("image_encoder.")]), key
    assert torch.equal(sd["image_encoder.patch_embed.proj.weight"], mae.patch_embed.proj.weight)

    # position grid: class token dropped, 8x8 -> 16x16 bicubic, against two independent resamplers
    grid = mae.pos_embed[0, 1:].reshape(8, 8, -1).numpy().astype(np.float64)
    expected = torch.from_numpy(_bicubic_numpy(grid, 16)).float()[None]
    torch.testing.assert_close(sd["image_encoder.pos_embed"], expected, atol=1e-5, rtol=1e-5)
    timm_ref = timm.layers.resample_abs_pos_embed(mae.pos_embed.detach(), [16, 16], antialias=False)
    torch.testing.assert_close(sd["image_encoder.pos_embed"], timm_ref[:, 1:].reshape(1, 16, 16, -1))

    # what SAM adds is SAM's initialisation: zero relative-position tables, fresh neck; MAE-only parts dropped
    rel = [v for k, v in sd.items() if ".rel_pos_" in k]
    assert len(rel) == 2 * 4 and all(torch.all(v == 0) for v in rel)
    assert torch.all(sd["image_encoder.neck.1.weight"] == 1) and sd["image_encoder.neck.0.weight"].abs().sum() > 0
    assert not any(k.endswith(("cls_token", "image_encoder.norm.weight")) or "decoder" in k for k in sd)


def test_export_vit_b_from_timm_224_to_1024():
    """The issue's case: a timm-named ViT-B/16 at 224 px (14x14) into SAM vit_b at 1024 px (64x64)."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False)
    sd = mae_to_sam_state_dict({"model": vit.state_dict()}, "vit_b", img_size=1024)
    grid = vit.pos_embed[0, 1:].detach().reshape(14, 14, -1).numpy().astype(np.float64)
    expected = torch.from_numpy(_bicubic_numpy(grid, 64)).float()[None]
    torch.testing.assert_close(sd["image_encoder.pos_embed"], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(sd["image_encoder.blocks.11.mlp.lin1.weight"], vit.blocks[11].mlp.fc1.weight)
    assert torch.equal(sd["image_encoder.blocks.3.attn.qkv.bias"], vit.blocks[3].attn.qkv.bias)
    assert sd["image_encoder.blocks.2.attn.rel_pos_h"].shape == (127, 64)  # global block: 2 x 64 - 1


def test_interpolate_pos_embed_layouts_agree():
    g = torch.Generator().manual_seed(0)
    seq = torch.randn(1, 1 + 36, 8, generator=g)
    out = interpolate_pos_embed_grid(seq, (10, 10))
    assert out.shape == (1, 101, 8) and torch.equal(out[:, 0], seq[:, 0])
    grid = interpolate_pos_embed_grid(seq[:, 1:].reshape(1, 6, 6, 8), 10)
    torch.testing.assert_close(out[:, 1:].reshape(1, 10, 10, 8), grid)
    with pytest.raises(ValueError, match="square grid"):
        interpolate_pos_embed_grid(torch.zeros(1, 7, 8), 4)


@pytest.mark.parametrize("layout", ["official", "lightning", "lightning_compiled_ddp"])
def test_exported_checkpoint_loads_with_build_sam(layout, tmp_path):
    mae = _random_mae("mae_vit_t", seed=1)
    sd = mae.state_dict()
    if layout == "official":
        ckpt = _to_official_layout(sd)
    elif layout == "lightning":  # a Lightning checkpoint of MaeModule (attribute `model`)
        ckpt = {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3, "global_step": 100}
    else:  # the same with wrapper names (torch.compile inside, DDP outside): strip_wrapper_names drops them
        ckpt = {"state_dict": {f"module.model._orig_mod.{k}": v for k, v in sd.items()}, "epoch": 3}
    torch.save(ckpt, tmp_path / "mae.pth")
    out = export_mae_to_sam(tmp_path / "mae.pth", tmp_path / "sam_init.pth", "vit_t", img_size=256)
    sam = build_sam("vit_t", checkpoint=out)
    direct = mae_to_sam_state_dict(sd, "vit_t", img_size=256)
    sam_sd = sam.state_dict()
    for key, value in direct.items():
        assert torch.equal(sam_sd[key], value), key
    # the written file is the official flat layout: every SAM part present
    saved = torch.load(out, weights_only=True)
    assert set(saved) == set(sam_sd)
    with torch.no_grad():
        emb = sam.encode(torch.randn(1, 3, 256, 256))
    assert emb.shape == (1, 64, 16, 16) and torch.isfinite(emb).all()


def test_export_rejects_mismatched_sizes(tmp_path):
    sd = build_mae("mae_vit_t").state_dict()
    with pytest.raises(CheckpointError, match="does not fit the SAM encoder"):
        mae_to_sam_state_dict(sd, "vit_t", encoder_depth=2, encoder_global_attn_indexes=(1,))
    torch.save({"optimizer": {}}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="bad.pth"):
        export_mae_to_sam(tmp_path / "bad.pth", tmp_path / "out.pth", "vit_t", img_size=256)
