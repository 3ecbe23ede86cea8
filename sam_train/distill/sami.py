"""SAMI (EfficientSAM's SAM-leveraged masked image pretraining) on the MAE code: the student ViT sees the
visible patches only, and the MAE decoder predicts the frozen teacher's image embedding of every patch
instead of its pixels. `MaeModule` trains it unchanged (the model returns (loss, pred, mask) as the MAE
does); afterwards the MAE encoder goes into the student SAM with `sam_train.export.mae_to_sam`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sam_train.data.image_only import IMAGENET_MEAN, IMAGENET_STD
from sam_train.distill.losses import feature_tokens, masked_feature_mse
from sam_train.distill.models import embedding_shape, freeze, teacher_embeddings
from sam_train.models.mae import MaskedAutoencoderViT
from sam_train.models.sam import Sam


class SamiModel(nn.Module):
    """MAE encoder + decoder regressing the teacher's features. Input: ImageNet-normalised [B, 3, s, s].

    Args:
        mae: the MAE whose encoder is the student's (its pixel head is replaced by a feature head of the
            teacher's embedding width).
        teacher: frozen teacher SAM, held outside the module tree (no checkpoint, no DDP sync). Its
            embedding is average-pooled to the MAE's patch grid when the grids differ.
        masked_only: loss over hidden patches only instead of all patches.
        pixel_mean, pixel_std: the normalisation of the input images (undone to feed the teacher).
    """

    def __init__(
        self,
        *,
        mae: MaskedAutoencoderViT,
        teacher: Sam,
        masked_only: bool = False,
        pixel_mean: Sequence[float] = IMAGENET_MEAN,
        pixel_std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.mae = mae
        mae.decoder_pred = nn.Linear(mae.decoder_pred.in_features, embedding_shape(teacher)[0])
        nn.init.xavier_uniform_(mae.decoder_pred.weight)
        nn.init.zeros_(mae.decoder_pred.bias)
        object.__setattr__(self, "teacher", freeze(teacher))
        self.teacher: Sam
        self.masked_only = masked_only
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, -1, 1, 1), persistent=False)
        self.norm_pix_loss = False  # MaeModule's reconstruction images do not apply (pixel logging off)

    def no_weight_decay(self) -> set[str]:
        return {f"mae.{name}" for name in self.mae.no_weight_decay()}

    @torch.no_grad()
    def targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, N, C] teacher features on the MAE's patch grid for normalised images [B, 3, s, s]."""
        self.teacher.to(imgs.device)
        raw = ((imgs.float() * self.pixel_std + self.pixel_mean) * 255.0).clamp(0, 255)
        size = self.teacher.img_size
        if raw.shape[-1] != size:
            raw = F.interpolate(raw, (size, size), mode="bilinear", align_corners=False, antialias=True)
        return feature_tokens(teacher_embeddings(self.teacher, raw), self.mae.grid_size)

    def forward(
        self, imgs: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs [B, 3, s, s] -> (loss, predicted features [B, N, C], mask [B, N] with 1 = hidden)."""
        latent, mask, ids_restore = self.mae.forward_encoder(imgs, self.mae.mask_ratio, generator)
        pred = self.mae.forward_decoder(latent, ids_restore)
        loss = masked_feature_mse(pred, self.targets(imgs), mask, masked_only=self.masked_only)
        return loss, pred, mask
