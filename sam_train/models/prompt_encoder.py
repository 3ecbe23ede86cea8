"""SAM's prompt encoder: points, boxes and dense masks -> sparse and dense prompt embeddings."""

from __future__ import annotations

import math

import torch
from torch import nn

from sam_train.models.common import LayerNorm2d

# Point labels, as in the official ONNX model: box corners are points with labels 2 and 3, so
# objects with point and box prompts can share one padded [M, K] tensor.
PAD, NEGATIVE, POSITIVE, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = -1, 0, 1, 2, 3


class PositionEmbeddingRandom(nn.Module):
    """Positional encoding with random spatial frequencies (Tancik et al., Fourier features)."""

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))
        self.positional_encoding_gaussian_matrix: torch.Tensor

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """[..., 2] coordinates normalised to [0, 1] -> [..., 2 * num_pos_feats]."""
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix.to(coords.dtype)
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of an (h, w) grid of pixel centres -> [C, h, w]."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1)  # [h, w, (x, y)]
        return self._pe_encoding(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords_input: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """[B, N, 2] (x, y) pixel coordinates in an image of `image_size` (h, w) -> [B, N, C]."""
        coords = coords_input.clone()
        coords[:, :, 0] = coords[:, :, 0] / image_size[1]
        coords[:, :, 1] = coords[:, :, 1] / image_size[0]
        return self._pe_encoding(coords.to(torch.float))


class PromptEncoder(nn.Module):
    """Encodes prompts for SAM's mask decoder.

    Args:
        embed_dim: prompt embedding width.
        image_embedding_size: (h, w) of the image embedding.
        input_image_size: (H, W) of the padded model input.
        mask_in_chans: hidden channels used to downscale mask prompts.
        activation: activation of the mask downscaling convs.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.num_point_embeddings = 4  # positive / negative point, 2 box corners
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid -> [1, C, h, w]."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def embed_labelled_points(self, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[M, K, 2] pixel coords with [M, K] labels in {-1, 0, 1, 2, 3} -> [M, K, C] tokens."""
        emb = self.pe_layer.forward_with_coords(points + 0.5, self.input_image_size)  # pixel centres
        labels = labels[..., None]
        emb = torch.where(labels == PAD, self.not_a_point_embed.weight.to(emb.dtype), emb)
        for label, table in enumerate(self.point_embeddings):
            emb = emb + (labels == label).to(emb.dtype) * table.weight.to(emb.dtype)
        return emb

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        if pad:  # a padding point stands in for the absent box, as in the official model
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), PAD)], dim=1)
        return self.embed_labelled_points(points, labels)

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = boxes.reshape(-1, 2, 2)
        labels = torch.tensor([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT], device=boxes.device).expand(corners.shape[0], 2)
        return self.embed_labelled_points(corners, labels)

    def embed_masks(self, masks: torch.Tensor, has_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[M, 1, 4h, 4w] mask logits -> [M, C, h, w]; objects with has_mask False get no_mask_embed."""
        dense = self.mask_downscaling(masks)
        if has_mask is not None:
            no_mask = self.no_mask_embed.weight.reshape(1, -1, 1, 1).to(dense.dtype)
            dense = torch.where(has_mask.reshape(-1, 1, 1, 1), dense, no_mask)
        return dense

    def no_mask_dense(self, batch: int) -> torch.Tensor:
        """Dense embedding of 'no mask prompt' -> [batch, C, h, w]."""
        h, w = self.image_embedding_size
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, h, w)

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Official signature.

        Args:
            points: ([B, N, 2] coords, [B, N] labels) or None.
            boxes: [B, 4] (x0, y0, x1, y1) or None.
            masks: [B, 1, 4h, 4w] or None.
        Returns:
            sparse [B, N', C] and dense [B, C, h, w] embeddings.
        """
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1
        device = self.point_embeddings[0].weight.device
        sparse = torch.empty((bs, 0, self.embed_dim), device=device)
        if points is not None:
            sparse = torch.cat([sparse, self._embed_points(points[0], points[1], pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)
        dense = self.embed_masks(masks) if masks is not None else self.no_mask_dense(bs)
        return sparse, dense
