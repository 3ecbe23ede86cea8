"""The SAM model: image encoder + prompt encoder + mask decoder, trainable end to end."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sam_train.models.image_encoder import ImageEncoderViT
from sam_train.models.mask_decoder import MaskDecoder
from sam_train.models.prompt_encoder import PromptEncoder
from sam_train.models.tiny_vit import TinyViT

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
PIXEL_NORMS = ("mean_std", "min_max")


def best_mask_token(iou_pred: torch.Tensor, multimask: bool | torch.Tensor) -> torch.Tensor:
    """[M] int64 mask token per object: where `multimask` (a bool or [M] bool), the multimask output
    (tokens 1-3) with the highest predicted IoU, as for an ambiguous lone click; elsewhere token 0."""
    best = iou_pred[:, 1:].detach().argmax(dim=1) + 1
    return best * torch.as_tensor(multimask, device=iou_pred.device)


def upsample_logits(low_res: torch.Tensor, size: int) -> torch.Tensor:
    """[M, 1, 4h, 4w] low-res logits of one token -> [M, size, size] (bilinear, as SAM's postprocessing)."""
    return F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)[:, 0]


def postprocess_logits(
    masks: torch.Tensor, img_size: int, input_size: tuple[int, ...], original_size: tuple[int, ...]
) -> torch.Tensor:
    """[M, k, h, w] logits over the padded S x S model input (any grid) -> [M, k, H0, W0] at the original size:
    upsampled to S, cropped to the resized image's (h, w) = input_size, resized to original_size (SAM's)."""
    masks = F.interpolate(masks, (img_size, img_size), mode="bilinear", align_corners=False)
    masks = masks[..., : input_size[0], : input_size[1]]
    return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)


class Sam(nn.Module):
    """Segment Anything. Submodule names and state-dict keys equal the official package's.

    Args:
        image_encoder: backbone producing [B, C, h, w] image embeddings.
        prompt_encoder: encodes points, boxes and masks.
        mask_decoder: predicts masks and IoU from both.
        pixel_mean, pixel_std: normalisation of 0-255 RGB input (pixel_norm="mean_std").
        pixel_norm: "mean_std" (official SAM, MobileSAM) or "min_max" (LiteMedSAM: each image scaled to
            [0, 1] by its own minimum and maximum).
    """

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        *,
        image_encoder: ImageEncoderViT | TinyViT,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: tuple[float, float, float] = PIXEL_MEAN,
        pixel_std: tuple[float, float, float] = PIXEL_STD,
        pixel_norm: str = "mean_std",
    ) -> None:
        super().__init__()
        if pixel_norm not in PIXEL_NORMS:
            raise ValueError(f"Sam: pixel_norm must be one of {PIXEL_NORMS}, got {pixel_norm!r}")
        self.pixel_norm = pixel_norm
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)
        self.pixel_mean: torch.Tensor
        self.pixel_std: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def img_size(self) -> int:
        return self.image_encoder.img_size

    # ----------------------------------------------------------------- pre/post-processing
    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] or [3, H, W] 0-255 images, longest side already resized -> normalised, padded to S x S.

        min_max scales each image by the minimum and maximum of what it is given: pass the unpadded image
        (or content whose minimum is 0, as zero-padded medical slices are) to match LiteMedSAM exactly.
        """
        x = x.float()
        if self.pixel_norm == "min_max":
            dims = tuple(range(x.ndim - 3, x.ndim))
            lo = x.amin(dim=dims, keepdim=True)
            x = (x - lo) / (x.amax(dim=dims, keepdim=True) - lo).clamp_min(1e-8)
        else:
            x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.img_size - w, 0, self.img_size - h))

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: tuple[int, ...], original_size: tuple[int, ...]
    ) -> torch.Tensor:
        """[M, k, 4h, 4w] low-res logits -> [M, k, H0, W0] logits at the original image size.

        input_size is the (h, w) of the resized image before padding.
        """
        return postprocess_logits(masks, self.img_size, input_size, original_size)

    # ----------------------------------------------------------------- batched training API
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] normalised, padded images -> [B, C, h, w] image embeddings."""
        return self.image_encoder(images)

    def decode(
        self,
        image_embeddings: torch.Tensor,
        image_ids: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_inputs: torch.Tensor | None = None,
        has_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode all M objects of a batch at once, all 4 mask tokens.

        Args:
            image_embeddings: [B, C, h, w].
            image_ids: [M] image index of each object.
            point_coords: [M, K, 2] (x, y) in model-input pixels; box corners are points labelled 2/3.
            point_labels: [M, K] in {-1 pad, 0 negative, 1 positive, 2 box top-left, 3 box bottom-right}.
            mask_inputs: [M, 1, 4h, 4w] previous low-res logits, or None.
            has_mask: [M] bool, which objects use mask_inputs (None: all of them).
        Returns:
            low-res logits [M, 4, 4h, 4w] (token 0 = single mask, 1-3 = multimask), iou_pred [M, 4].
        """
        sparse = self.prompt_encoder.embed_labelled_points(point_coords, point_labels)
        if mask_inputs is None:
            dense = self.prompt_encoder.no_mask_dense(point_coords.shape[0])
        else:
            dense = self.prompt_encoder.embed_masks(mask_inputs, has_mask)
        return self.mask_decoder.predict_masks(
            image_embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense.to(sparse.dtype), image_ids
        )

    def batch_embeddings(self, batch: dict[str, Any]) -> torch.Tensor:
        """[B, C, h, w] image embeddings of a collated batch: its cached `embeddings` when it carries them,
        the encoder's remaining units run on its cached `features` (entering unit `encoder_unit`), else
        its `images` (0-255, resized) preprocessed and encoded."""
        if "embeddings" in batch:
            return batch["embeddings"]
        if "features" in batch:
            return self.image_encoder.forward_from(batch["features"], batch["encoder_unit"])
        return self.encode(self.preprocess(batch["images"]))

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_ids: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        *,
        multimask: bool | torch.Tensor,
        mask_inputs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode (see `decode`), keep one mask token per object (`best_mask_token`) and upsample it.

        Returns:
            the chosen low-res logits [M, 1, 4h, 4w] (to feed back as the next mask prompt) and their
            logits upsampled to the model input, [M, S, S] (threshold at `mask_threshold`).
        """
        low_res, iou_pred = self.decode(image_embeddings, image_ids, point_coords, point_labels, mask_inputs)
        token = best_mask_token(iou_pred, multimask)
        chosen = low_res[torch.arange(len(token), device=low_res.device), token][:, None]
        return chosen, upsample_logits(chosen, self.img_size)

    # ----------------------------------------------------------------- official-style forward
    def forward(self, batched_input: list[dict[str, Any]], multimask_output: bool) -> list[dict[str, torch.Tensor]]:
        """Same inputs and outputs as `segment_anything.Sam.forward`, but differentiable.

        Each input dict: 'image' [3, H, W] (longest side resized), 'original_size' (H0, W0), and optional
        'point_coords' [N, P, 2], 'point_labels' [N, P], 'boxes' [N, 4], 'mask_inputs' [N, 1, 4h, 4w].
        Each output dict: 'masks' [N, k, H0, W0] bool, 'iou_predictions' [N, k], 'low_res_logits' [N, k, 4h, 4w].
        """
        images = torch.stack([self.preprocess(x["image"]) for x in batched_input], dim=0)
        embeddings = self.image_encoder(images)
        outputs = []
        for record, emb in zip(batched_input, embeddings, strict=True):
            points = None
            if "point_coords" in record:
                points = (record["point_coords"], record["point_labels"])
            sparse, dense = self.prompt_encoder(
                points=points, boxes=record.get("boxes"), masks=record.get("mask_inputs")
            )
            low_res, iou = self.mask_decoder(
                image_embeddings=emb.unsqueeze(0),
                image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
            masks = self.postprocess_masks(low_res, record["image"].shape[-2:], record["original_size"])
            outputs.append(
                {"masks": masks > self.mask_threshold, "iou_predictions": iou, "low_res_logits": low_res}
            )
        return outputs
