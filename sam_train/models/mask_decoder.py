"""SAM's mask decoder: IoU token + mask tokens through a two-way transformer, hypernetwork MLPs."""

from __future__ import annotations

import torch
from torch import nn

from sam_train.models.common import MLP, LayerNorm2d


class MaskDecoder(nn.Module):
    """Predicts masks and their IoU from image and prompt embeddings.

    Args:
        transformer_dim: channel width of the transformer.
        transformer: the two-way transformer.
        num_multimask_outputs: masks predicted for ambiguous prompts (a 4th single-mask token is added).
        activation: activation of the upscaling path.
        iou_head_depth, iou_head_hidden_dim: MLP predicting mask quality.
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        image_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict masks for M prompts (objects).

        Args:
            image_embeddings: [B, C, h, w]. Official use: B = 1, shared by all M prompts.
            image_pe: [1, C, h, w] positional encoding of the embedding grid.
            sparse_prompt_embeddings: [M, N, C].
            dense_prompt_embeddings: [M, C, h, w].
            multimask_output: return the 3 multimask outputs instead of the single mask.
            image_ids: [M] index of each prompt's image in `image_embeddings` (batched training);
                None: a single image embedding is shared by all M prompts (official use), or B == M.
        Returns:
            masks [M, 3 or 1, 4h, 4w] low-res logits, iou_pred [M, 3 or 1].
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, image_ids
        )
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sl], iou_pred[:, sl]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        image_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All mask tokens: masks [M, 4, 4h, 4w], iou_pred [M, 4]."""
        m = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(m, -1, -1).to(sparse_prompt_embeddings.dtype)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)

        if image_ids is not None:
            src = image_embeddings[image_ids]
        elif image_embeddings.shape[0] == 1:
            src = image_embeddings.expand(m, -1, -1, -1)
        elif image_embeddings.shape[0] == m:
            src = image_embeddings
        else:
            raise ValueError(
                f"image_embeddings has batch {image_embeddings.shape[0]} for {m} prompts: pass image_ids"
            )
        src = src + dense_prompt_embeddings
        pos_src = image_pe.expand(m, -1, -1, -1)
        b, c, h, w = src.shape

        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
        return masks, self.iou_prediction_head(iou_token_out)
