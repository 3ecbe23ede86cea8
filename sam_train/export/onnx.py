"""ONNX export of SAM's prompt encoder + mask decoder (the part that runs per click in a browser or app).

The graph has the official `SamOnnxModel` interface, so the official web demo and onnxruntime code work:
inputs
    image_embeddings [1, C, h, w]   from the image encoder (run separately, once per image)
    point_coords     [1, N, 2]      (x, y) in model-input pixels (after resize-longest-side); N is dynamic
    point_labels     [1, N]         -1 padding, 0 negative, 1 positive, 2 box top-left, 3 box bottom-right
    mask_input       [1, 1, 4h, 4w] previous low-res logits (zeros when has_mask_input is 0)
    has_mask_input   [1]            1.0 to use mask_input, 0.0 otherwise
    orig_im_size     [2]            (H, W) of the original image, float
outputs
    masks            [1, k, H, W]   logits at the original size (threshold at 0)
    iou_predictions  [1, k]
    low_res_masks    [1, k, 4h, 4w]
with k = 4 (single-mask token first, then the 3 multimask tokens) or k = 1 with return_single_mask.
Without box corners, append a padding point (0, 0) labelled -1, as the official predictor does.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sam_train.models.sam import Sam

INPUT_NAMES = ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size"]
OUTPUT_NAMES = ["masks", "iou_predictions", "low_res_masks"]


class SamDecoderOnnx(nn.Module):
    """Prompt encoder + mask decoder + mask upscaling, written without data-dependent Python control flow.

    Args:
        model: the SAM whose prompt encoder and mask decoder are exported (shared, not copied).
        return_single_mask: output one mask per call, chosen like the official model: the single-mask
            token when there are more than 2 points (padding included), otherwise the multimask output
            with the highest predicted IoU.
    """

    def __init__(self, model: Sam, *, return_single_mask: bool = False) -> None:
        super().__init__()
        self.model = model
        self.return_single_mask = return_single_mask

    def _select_single(
        self, masks: torch.Tensor, iou: torch.Tensor, num_points: torch.Tensor | int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Arithmetic instead of an `if` on the point count, so the choice stays inside the graph.
        bias = torch.zeros_like(iou)
        bias[:, 0] = 1000.0
        best = torch.argmax(iou + (num_points - 2.5) * bias, dim=1, keepdim=True)  # [B, 1]
        index = best[:, :, None, None].expand(-1, 1, masks.shape[2], masks.shape[3])
        return masks.gather(1, index), iou.gather(1, best)

    def _upscale(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """Low-res logits -> original-size logits; sizes come from the orig_im_size tensor (dynamic)."""
        img_size = self.model.img_size
        masks = F.interpolate(masks, size=(img_size, img_size), mode="bilinear", align_corners=False)
        size = orig_im_size.to(torch.float32)
        # Resize-longest-side geometry, as in sam_train.models.resize.preprocess_shape, on tensors.
        input_size = torch.floor(size * (img_size / torch.max(size)) + 0.5).to(torch.int64)
        masks = masks[..., : input_size[0], : input_size[1]]
        h, w = orig_im_size.to(torch.int64)[0], orig_im_size.to(torch.int64)[1]
        return F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pe = self.model.prompt_encoder
        sparse = pe.embed_labelled_points(point_coords, point_labels)
        # Blend instead of torch.where on a bool so a float has_mask_input works as in the official graph.
        has_mask = has_mask_input.reshape(-1, 1, 1, 1).to(sparse.dtype)
        no_mask = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dense = has_mask * pe.mask_downscaling(mask_input) + (1 - has_mask) * no_mask
        low_res, iou = self.model.mask_decoder.predict_masks(image_embeddings, pe.get_dense_pe(), sparse, dense)
        if self.return_single_mask:
            low_res, iou = self._select_single(low_res, iou, point_coords.shape[1])
        return self._upscale(low_res, orig_im_size), iou, low_res


def example_inputs(model: Sam, num_points: int = 2) -> tuple[torch.Tensor, ...]:
    """Dummy inputs of the right shapes and dtypes for tracing (one image, num_points points)."""
    c = model.prompt_encoder.embed_dim
    h, w = model.prompt_encoder.image_embedding_size
    return (
        torch.randn(1, c, h, w),
        torch.randint(0, model.img_size, (1, num_points, 2)).float(),
        torch.randint(0, 4, (1, num_points)).float(),
        torch.randn(1, 1, 4 * h, 4 * w),
        torch.tensor([1.0]),
        torch.tensor([float(model.img_size), float(model.img_size)]),
    )


def export_decoder_onnx(
    model: Sam,
    path: str | Path,
    *,
    opset: int = 17,
    return_single_mask: bool = False,
    dynamo: bool = False,
) -> Path:
    """Write the prompt encoder + mask decoder of `model` to an ONNX file (see the module docstring).

    The number of points is a dynamic axis; the model is exported in eval mode on the CPU.
    dynamo=False (default) uses the TorchScript-based exporter, which writes opset 17 like the official
    export; dynamo=True uses the torch.export-based exporter, which needs opset >= 18 (its down-conversion
    of the resize ops fails). Returns the path written.
    """
    if dynamo and opset < 18:
        raise ValueError(f"the dynamo ONNX exporter needs opset >= 18, got opset={opset}; use dynamo=False for 17")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    wrapper = SamDecoderOnnx(model, return_single_mask=return_single_mask).eval()
    if dynamo:
        points = torch.export.Dim("num_points", min=1, max=1024)
        dynamic: dict[str, Any] = {"dynamic_shapes": {name: None for name in INPUT_NAMES}}
        dynamic["dynamic_shapes"].update(point_coords={1: points}, point_labels={1: points})
    else:
        dynamic = {"dynamic_axes": {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}}
    with warnings.catch_warnings():
        # The tracer warns about the decoder's "one image embedding" shape check: true for every call here.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            wrapper,
            example_inputs(model),
            str(path),
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            opset_version=opset,
            dynamo=dynamo,
            **dynamic,
        )
    return path
