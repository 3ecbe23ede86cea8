"""Distillation losses: pure tensor functions, no model, trainer or collective inside."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def embedding_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MobileSAM's decoupled distillation loss: mean squared error between image embeddings.

    Args:
        student: [B, C, h, w] student image embeddings (carry the gradient).
        teacher: [B, C, h, w] teacher image embeddings (targets; detached here).
    Returns:
        scalar, mean over every element in fp32. Under DDP the gradients that Lightning averages over
        ranks then equal the single-process gradient of the global batch (equal per-rank batches).
    """
    if student.shape != teacher.shape:
        raise ValueError(f"embedding_mse: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")
    return F.mse_loss(student.float(), teacher.detach().float())


def feature_tokens(embeddings: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, C, h, w] embeddings -> [B, grid * grid, C] tokens, average-pooled to a grid x grid raster
    (row-major, the patch order of `MaskedAutoencoderViT.patchify`); no pooling when h = w = grid."""
    if embeddings.shape[-2:] != (grid, grid):
        embeddings = F.adaptive_avg_pool2d(embeddings, grid)
    return embeddings.flatten(2).transpose(1, 2)


def masked_feature_mse(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, masked_only: bool = False
) -> torch.Tensor:
    """SAMI (EfficientSAM) reconstruction loss: the student, seeing only the visible patches, predicts the
    teacher's feature of every patch.

    Args:
        pred: [B, N, C] predicted features; target: [B, N, C] teacher features (detached here).
        mask: [B, N], 1 = hidden from the student, 0 = visible.
        masked_only: average over hidden patches only (MAE's choice) instead of over all patches.
    Returns:
        scalar: mean over patches (all, or hidden only) of the per-patch MSE, in fp32.
    """
    per_patch = (pred.float() - target.detach().float()).pow(2).mean(dim=-1)  # [B, N]
    if not masked_only:
        return per_patch.mean()
    weight = mask.float()
    return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)
