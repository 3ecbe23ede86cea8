"""ONNX export of prompt encoder + mask decoder: onnxruntime equals PyTorch (ours and the official graph)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from official import official_and_ours
from segment_anything.utils.onnx import SamOnnxModel

from sam_train.export.onnx import INPUT_NAMES, export_decoder_onnx

TOL = 1e-4


@pytest.fixture(scope="module")
def models():
    return official_and_ours("vit_t")


@pytest.fixture(scope="module")
def sessions(models, tmp_path_factory):
    out = {}
    for single in (False, True):
        path = export_decoder_onnx(
            models[1], tmp_path_factory.mktemp("onnx") / "decoder.onnx", return_single_mask=single
        )
        out[single] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return out


def _inputs(num_points: int, with_mask: bool, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    coords = torch.rand(1, num_points, 2, generator=gen) * 200
    labels = torch.tensor([[1, 0, 2, 3][i % 4] for i in range(num_points)], dtype=torch.float32)[None]
    if num_points == 1:  # a lone click gets the padding point, as the official predictor adds
        coords = torch.cat([coords, torch.zeros(1, 1, 2)], dim=1)
        labels = torch.cat([labels, torch.tensor([[-1.0]])], dim=1)
    return (
        torch.randn(1, 64, 16, 16, generator=gen),
        coords,
        labels,
        torch.randn(1, 1, 64, 64, generator=gen) * 3,
        torch.tensor([1.0 if with_mask else 0.0]),
        torch.tensor([300.0, 400.0]),
    )


@pytest.mark.parametrize("num_points", [1, 3])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("single", [False, True])
def test_onnx_matches_pytorch(models, sessions, num_points, with_mask, single):
    ref, ours = models
    inputs = _inputs(num_points, with_mask, torch.Generator().manual_seed(num_points + 10 * with_mask))
    got = sessions[single].run(None, {n: x.numpy() for n, x in zip(INPUT_NAMES, inputs, strict=True)})

    # PyTorch reference 1: our model's own batched API + postprocessing.
    emb, coords, labels, mask, has_mask, _ = inputs
    with torch.no_grad():
        low, iou = ours.decode(emb, torch.zeros(1, dtype=torch.long), coords, labels.long(), mask, has_mask.bool())
    if single:
        # more than 2 points (padding included) -> single-mask token, else best multimask output
        best = 0 if coords.shape[1] > 2 else 1 + int(iou[0, 1:].argmax())
        low, iou = low[:, best : best + 1], iou[:, best : best + 1]
    with torch.no_grad():
        masks = ours.postprocess_masks(low, (192, 256), (300, 400))
    expected = [masks, iou, low]
    # PyTorch reference 2: the official SamOnnxModel on the same weights.
    with torch.no_grad():
        official = SamOnnxModel(ref, return_single_mask=single)(*inputs)
    k = 1 if single else 4
    assert got[0].shape == (1, k, 300, 400) and got[1].shape == (1, k) and got[2].shape == (1, k, 64, 64)
    for a, b, c in zip(got, expected, official, strict=True):
        assert np.abs(a - b.numpy()).max() <= TOL
        assert np.abs(a - c.numpy()).max() <= TOL


def test_graph_has_dynamic_points_and_opset(sessions, tmp_path, models):
    import onnx

    path = export_decoder_onnx(models[1], tmp_path / "d.onnx", opset=17)
    graph = onnx.load(str(path))
    assert any(o.domain in ("", "ai.onnx") and o.version == 17 for o in graph.opset_import)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    assert dims["point_coords"] == [1, "num_points", 2] and dims["point_labels"] == [1, "num_points"]
    assert [i.name for i in sessions[False].get_inputs()] == INPUT_NAMES


@pytest.mark.slow
def test_dynamo_exporter_matches_pytorch(models, tmp_path):
    """The torch.export-based exporter (opset 18) gives the same graph behaviour."""
    with pytest.raises(ValueError, match="opset >= 18"):
        export_decoder_onnx(models[1], tmp_path / "x.onnx", dynamo=True)
    path = export_decoder_onnx(models[1], tmp_path / "dyn.onnx", opset=18, dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for num_points in (1, 3):
        inputs = _inputs(num_points, True, torch.Generator().manual_seed(num_points))
        got = session.run(None, {n: x.numpy() for n, x in zip(INPUT_NAMES, inputs, strict=True)})
        with torch.no_grad():
            official = SamOnnxModel(models[0], return_single_mask=False)(*inputs)
        for a, c in zip(got, official, strict=True):
            assert np.abs(a - c.numpy()).max() <= TOL
