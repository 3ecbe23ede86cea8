"""Loss terms against numpy hand computations; min-over-3 selection and its gradients."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sam_train.losses import SamLossConfig, dice_loss, focal_loss, global_num_objects, iou_l1, iou_mse, mask_iou
from sam_train.losses.sam_loss import resize_gt, sam_loss

LOGITS = np.array([[1.0, -2.0], [0.5, 3.0]])
TARGET = np.array([[1.0, 0.0], [0.0, 1.0]])


def np_focal(x: np.ndarray, t: np.ndarray, alpha: float = 0.25, gamma: float = 2.0) -> float:
    p = 1.0 / (1.0 + np.exp(-x))
    ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    a_t = alpha * t + (1 - alpha) * (1 - t)
    return float(np.mean(a_t * (1 - p_t) ** gamma * ce))


def np_dice(x: np.ndarray, t: np.ndarray, eps: float = 1.0) -> float:
    p = 1.0 / (1.0 + np.exp(-x))
    return float(1 - (2 * (p * t).sum() + eps) / (p.sum() + t.sum() + eps))


def t4(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)[None, None]


def test_focal_matches_hand_computation():
    got = focal_loss(t4(LOGITS), t4(TARGET))
    assert got.shape == (1, 1)
    assert got.item() == pytest.approx(np_focal(LOGITS, TARGET), rel=1e-10)
    assert focal_loss(t4(LOGITS), t4(TARGET), alpha=0.5, gamma=0.0).item() == pytest.approx(
        np_focal(LOGITS, TARGET, 0.5, 0.0), rel=1e-10
    )


def test_dice_matches_hand_computation():
    x = np.array([[0.0, 2.0, -1.0], [1.0, -3.0, 0.2], [4.0, -0.5, 0.0]])
    t = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert dice_loss(t4(x), t4(t)).item() == pytest.approx(np_dice(x, t), rel=1e-10)
    assert dice_loss(t4(x), t4(t), eps=0.0).item() == pytest.approx(np_dice(x, t, 0.0), rel=1e-10)


def test_targets_broadcast_over_masks():
    logits = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    gt = torch.rand(2, 1, 4, 4) > 0.5
    focal = focal_loss(logits, gt)
    assert focal.shape == (2, 3)
    assert focal[1, 2].item() == pytest.approx(np_focal(logits[1, 2].numpy(), gt[1, 0].double().numpy()))


def test_mask_iou_and_iou_losses():
    pred = torch.tensor([[1, 1, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)
    gt = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 1]], dtype=torch.bool)
    assert mask_iou(pred[None, None], gt[None, None]).item() == pytest.approx(2 / 5)
    empty = torch.zeros(1, 3, 3, dtype=torch.bool)
    assert mask_iou(empty, empty).item() == 1.0  # nothing to find, nothing found
    p, t = torch.tensor([[0.9, 0.1]]), torch.tensor([[0.5, 0.4]], requires_grad=True)
    assert torch.allclose(iou_mse(p, t), torch.tensor([[0.16, 0.09]]))
    assert torch.allclose(iou_l1(p, t), torch.tensor([[0.4, 0.3]]))
    assert not iou_mse(p, t).requires_grad  # the target is detached


def test_sam_loss_single_mask_equals_hand_computation():
    x = np.array([[2.0, -1.0, 0.5], [-0.3, 1.5, -2.0], [0.1, -0.1, 3.0]])
    t = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=bool)
    logits = torch.zeros(1, 4, 3, 3, dtype=torch.float64)
    logits[0, 0] = torch.tensor(x)
    logits[0, 1:] = -5.0  # other tokens must not count
    iou_pred = torch.tensor([[0.3, 0.9, 0.9, 0.9]], dtype=torch.float64)
    out = sam_loss(logits, iou_pred, torch.tensor(t)[None], multimask=False, num_objects=2.0)
    pred = x > 0
    actual_iou = (pred & t).sum() / (pred | t).sum()
    expected = (20 * np_focal(x, t.astype(float)) + np_dice(x, t.astype(float)) + (0.3 - actual_iou) ** 2) / 2
    # rel 1e-6: the IoU target is computed in float32
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert out["iou"].item() == pytest.approx((0.3 - actual_iou) ** 2 / 2, rel=1e-6)
    assert out["selected"].tolist() == [0]
    l1 = sam_loss(logits, iou_pred, torch.tensor(t)[None], False, 2.0, SamLossConfig(iou_loss="l1", iou_weight=0.0))
    assert l1["loss"].item() == pytest.approx((20 * np_focal(x, t.astype(float)) + np_dice(x, t.astype(float))) / 2)


def test_medsam_loss_config_is_bce_plus_dice():
    """configs/loss/medsam.yaml: focal without class weight or focusing is binary cross-entropy, 1 : 1 with dice."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from sam_train.cli import CONFIG_DIR

    cfg = instantiate(OmegaConf.load(CONFIG_DIR / "loss" / "medsam.yaml"))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    gt = torch.rand(3, 8, 8, generator=g) > 0.6
    out = sam_loss(logits, torch.zeros(3, 4, dtype=torch.float64), gt, multimask=False, num_objects=3.0, cfg=cfg)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], gt.double())
    dice = np.mean([np_dice(logits[i, 0].numpy(), gt[i].double().numpy()) for i in range(3)])
    assert out["focal"].item() == pytest.approx(bce.item(), rel=1e-9)
    assert out["loss"].item() == pytest.approx(bce.item() + dice + out["iou"].item(), rel=1e-9)


def test_min_over_three_selects_best_and_only_it_gets_gradients():
    gt = torch.zeros(1, 4, 4, dtype=torch.bool)
    gt[0, :2, :2] = True
    good = torch.where(gt[0], 4.0, -4.0)
    logits = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    logits[0, 2] = good  # token 2 is the best multimask output
    logits.requires_grad_(True)
    iou_pred = torch.full((1, 4), 0.5, requires_grad=True)
    out = sam_loss(logits, iou_pred, gt, multimask=torch.tensor([True]), num_objects=1.0)
    assert out["selected"].tolist() == [2]
    out["loss"].backward()
    per_token = logits.grad.abs().flatten(2).sum(-1)[0]
    assert per_token[2] > 0
    assert per_token[0] == 0 and per_token[1] == 0 and per_token[3] == 0
    assert (iou_pred.grad[0, 1:] != 0).all() and iou_pred.grad[0, 0] == 0  # IoU head: all 3 masks


def test_mixed_batch_equals_sum_of_single_objects():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    iou_pred = torch.rand(3, 4, generator=g, dtype=torch.float64)
    gt = torch.rand(3, 32, 32, generator=g) > 0.6
    multimask = torch.tensor([True, False, True])
    for resolution in ("low_res", "input"):
        cfg = SamLossConfig(resolution=resolution)
        batched = sam_loss(logits, iou_pred, gt, multimask, 3.0, cfg)
        singles = [
            sam_loss(logits[i : i + 1], iou_pred[i : i + 1], gt[i : i + 1], bool(multimask[i]), 3.0, cfg)
            for i in range(3)
        ]
        for key in ("loss", "focal", "dice", "iou"):
            assert batched[key].item() == pytest.approx(sum(s[key].item() for s in singles), rel=1e-9)
        assert batched["selected"].tolist() == [int(s["selected"]) for s in singles]
        assert batched["selected"][1] == 0 and batched["selected"][0] >= 1


def test_low_res_gt_is_area_downsampled():
    gt = torch.zeros(1, 4, 4, dtype=torch.bool)
    gt[0, :2, :2] = True  # fully covered block
    gt[0, 2, 2:] = True  # half-covered block: counts as foreground
    gt[0, 0, 2] = True  # quarter-covered block: background
    assert resize_gt(gt, (2, 2))[0].tolist() == [[True, False], [False, True]]


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="resolution"):
        SamLossConfig(resolution="full")
    with pytest.raises(ValueError, match="iou_loss"):
        SamLossConfig(iou_loss="huber")
    with pytest.raises(ValueError, match=r"\[M, 4, h, w\]"):
        sam_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3), torch.zeros(1, 4, 4, dtype=torch.bool), False, 1.0)


def test_global_num_objects_without_distributed():
    assert global_num_objects(7) == 7.0
    assert global_num_objects(0) == 1.0


_WORKER = """
import sys
import torch.distributed as dist
from sam_train.losses.distributed import global_num_objects
rank, counts = int(sys.argv[1]), [3, 6]
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
print(global_num_objects(counts[rank]))
dist.destroy_process_group()
"""


def test_global_num_objects_all_reduces_over_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(rank), str(tmp_path / "init")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    # (3 + 6) / world size 2, on both ranks: DDP's gradient mean then equals the global per-object mean
    assert [float(out) for out, _ in outs] == [4.5, 4.5]
