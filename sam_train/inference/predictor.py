"""Interactive inference: encode an image once, then decode many batched prompts against it.

Behaves like the official `segment_anything.SamPredictor.predict_torch`, except that prompts are
given in ORIGINAL image coordinates (the predictor scales them) and images are resized with
`sam_train.models.resize` (antialiased torch bilinear) instead of PIL.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sam_train.models.resize import resize_longest_side, scale_boxes, scale_coords
from sam_train.models.sam import Sam


def image_to_tensor(image: Any) -> torch.Tensor:
    """uint8 RGB image as [3, H, W] tensor or [H, W, 3] numpy array -> uint8 [3, H, W] tensor."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"numpy image must be HWC RGB with 3 channels, got shape {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        shape = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"image must be a uint8 [3, H, W] tensor or HWC numpy RGB array, got {shape}")
    return image


class SamPredictor:
    """Caches one image embedding and predicts masks for batches of prompts.

    Args:
        model: a `Sam` (switch it to eval mode yourself if it was training).
    """

    def __init__(self, model: Sam) -> None:
        self.model = model
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        """Forget the current image."""
        self.features: torch.Tensor | None = None
        self.input_size: tuple[int, int] | None = None
        self.original_size: tuple[int, int] | None = None

    @property
    def is_image_set(self) -> bool:
        return self.features is not None

    @torch.no_grad()
    def set_image(self, image: Any) -> None:
        """Encode an image: uint8 [3, H, W] tensor or [H, W, 3] numpy RGB array (any size)."""
        image = image_to_tensor(image)
        original_size = (int(image.shape[1]), int(image.shape[2]))
        resized = resize_longest_side(image.to(self.device), self.model.img_size)
        self.set_resized_image(resized[None], original_size)

    @torch.no_grad()
    def set_resized_image(self, image: torch.Tensor, original_size: tuple[int, int]) -> None:
        """Encode [1, 3, h, w] 0-255 pixels whose longest side is already `img_size` (uint8 or float).

        Used for images transformed outside the predictor, e.g. adversarially perturbed ones.
        """
        if image.ndim != 4 or image.shape[:2] != (1, 3) or max(image.shape[-2:]) != self.model.img_size:
            raise ValueError(
                f"resized image must be [1, 3, h, w] with max(h, w) = {self.model.img_size}, got {tuple(image.shape)}"
            )
        features = self.model.encode(self.model.preprocess(image.to(self.device)))
        self.set_image_embedding(features, (int(image.shape[-2]), int(image.shape[-1])), original_size)

    def set_image_embedding(
        self, embedding: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> None:
        """Use a cached [1, C, h, w] embedding of an image resized to `input_size` from `original_size`."""
        if embedding.ndim == 3:
            embedding = embedding[None]
        if embedding.ndim != 4 or embedding.shape[0] != 1:
            raise ValueError(f"image embedding must be [1, C, h, w], got {tuple(embedding.shape)}")
        self.features = embedding.to(self.device)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.original_size = (int(original_size[0]), int(original_size[1]))

    def get_image_embedding(self) -> torch.Tensor:
        """The cached [1, C, h, w] embedding."""
        if self.features is None:
            raise RuntimeError("no image set: call set_image(...) first")
        return self.features

    def _to_input(self, x: Any, name: str, shape_hint: str, ndim: int, dtype: torch.dtype) -> torch.Tensor:
        t = torch.as_tensor(x, device=self.device)
        if t.ndim != ndim:
            raise ValueError(f"{name} must be {shape_hint}, got shape {tuple(t.shape)}")
        return t.to(dtype)

    @torch.no_grad()
    def predict(
        self,
        point_coords: Any | None = None,
        point_labels: Any | None = None,
        boxes: Any | None = None,
        mask_input: Any | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Predict masks for M prompts on the current image.

        Args:
            point_coords: [M, K, 2] (x, y) in original image pixels, or None.
            point_labels: [M, K] 1 positive, 0 negative, -1 padding (required with point_coords).
            boxes: [M, 4] (x0, y0, x1, y1) in original image pixels, or None.
            mask_input: [M, 1, 4h, 4w] low-res logits of a previous prediction, or None.
            multimask_output: 3 candidate masks per prompt instead of 1.
            return_logits: return mask logits instead of thresholded bool masks.
        Returns:
            masks [M, k, H, W] (bool, or float logits), iou_predictions [M, k], low-res logits [M, k, 4h, 4w],
            with k = 3 if multimask_output else 1.
        """
        if self.features is None or self.original_size is None or self.input_size is None:
            raise RuntimeError("no image set: call set_image(...) first")
        long_side = self.model.img_size
        coords = labels = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be given with point_coords")
            coords = self._to_input(point_coords, "point_coords", "[M, K, 2]", 3, torch.float32)
            labels = self._to_input(point_labels, "point_labels", "[M, K]", 2, torch.int64)
            if coords.shape[-1] != 2 or labels.shape != coords.shape[:2]:
                raise ValueError(
                    "point_coords [M, K, 2] and point_labels [M, K] disagree: "
                    f"{tuple(coords.shape)} vs {tuple(labels.shape)}"
                )
            coords = scale_coords(coords, self.original_size, long_side)
        box_t = None
        if boxes is not None:
            box_t = self._to_input(boxes, "boxes", "[M, 4]", 2, torch.float32)
            if box_t.shape[-1] != 4:
                raise ValueError(f"boxes must be [M, 4] (x0, y0, x1, y1), got {tuple(box_t.shape)}")
            box_t = scale_boxes(box_t, self.original_size, long_side)
        masks_t = None
        if mask_input is not None:
            masks_t = self._to_input(mask_input, "mask_input", "[M, 1, 4h, 4w]", 4, torch.float32)
            expected = self.model.prompt_encoder.mask_input_size
            if masks_t.shape[1] != 1 or tuple(masks_t.shape[-2:]) != tuple(expected):
                raise ValueError(f"mask_input must be [M, 1, {expected[0]}, {expected[1]}], got {tuple(masks_t.shape)}")
        sizes = {t.shape[0] for t in (coords, box_t, masks_t) if t is not None}
        if len(sizes) > 1:
            raise ValueError(f"points, boxes and mask_input must have the same number of prompts M, got {sizes}")
        return self.predict_torch(coords, labels, box_t, masks_t, multimask_output, return_logits)

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As `predict`, but prompts already in model-input coordinates (no checks, no scaling).

        Same signature and results as the official `SamPredictor.predict_torch`.
        """
        if self.features is None or self.original_size is None or self.input_size is None:
            raise RuntimeError("no image set: call set_image(...) first")
        points = None if point_coords is None else (point_coords, point_labels)
        sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        low_res, iou = self.model.mask_decoder(
            image_embeddings=self.features,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )
        masks = self.model.postprocess_masks(low_res, self.input_size, self.original_size)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou, low_res
