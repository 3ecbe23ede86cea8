"""Parity with the official segment-anything package (keep green forever)."""

from __future__ import annotations

import pytest
import torch
from official import build_official

from sam_train.models import build_sam, sam_config

TOL = 1e-4


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def _prompts(size: int, gen: torch.Generator) -> dict[str, dict]:
    """Each prompt kind for N=2 objects in a size x size model input."""
    pts = torch.rand(2, 3, 2, generator=gen) * size * 0.8
    lbl = torch.tensor([[1, 0, 1], [1, 1, 0]])
    box = torch.tensor([[0.1, 0.2, 0.6, 0.7], [0.3, 0.1, 0.9, 0.5]]) * size
    low = size // 4
    masks = torch.randn(2, 1, low, low, generator=gen)
    return {
        "point": {"point_coords": pts[:, :1], "point_labels": lbl[:, :1]},
        "multi_point": {"point_coords": pts, "point_labels": lbl},
        "box": {"boxes": box},
        "box_point": {"boxes": box, "point_coords": pts[:, :1], "point_labels": lbl[:, :1]},
        "mask": {"mask_inputs": masks},
        "point_mask": {"point_coords": pts, "point_labels": lbl, "mask_inputs": masks},
    }


@pytest.mark.parametrize("size", ["vit_t", pytest.param("vit_b", marks=pytest.mark.slow)])
def test_outputs_match_official(size):
    cfg = sam_config(size)
    ref = build_official(cfg)
    ours = build_sam(size).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(0)
    h, w = cfg.img_size * 3 // 4, cfg.img_size
    image = torch.randint(0, 256, (3, h, w), generator=gen).float()
    original = (h * 2, w * 2)
    with torch.no_grad():
        x = ours.preprocess(image)[None]
        emb_ref, emb = ref.image_encoder(ref.preprocess(image)[None]), ours.image_encoder(x)
        assert maxdiff(emb_ref, emb) <= TOL
        for kind, prompt in _prompts(cfg.img_size, gen).items():
            points = (prompt["point_coords"], prompt["point_labels"]) if "point_coords" in prompt else None
            args = dict(points=points, boxes=prompt.get("boxes"), masks=prompt.get("mask_inputs"))
            s_ref, d_ref = ref.prompt_encoder(**args)
            s, d = ours.prompt_encoder(**args)
            assert maxdiff(s_ref, s) <= TOL, kind
            assert maxdiff(d_ref, d) <= TOL, kind
            for multimask in (True, False):
                m_ref, i_ref = ref.mask_decoder(emb_ref, ref.prompt_encoder.get_dense_pe(), s_ref, d_ref, multimask)
                m, i = ours.mask_decoder(emb, ours.prompt_encoder.get_dense_pe(), s, d, multimask)
                assert maxdiff(m_ref, m) <= TOL, (kind, multimask)
                assert maxdiff(i_ref, i) <= TOL, (kind, multimask)
                post_ref = ref.postprocess_masks(m_ref, (h, w), original)
                assert maxdiff(post_ref, ours.postprocess_masks(m, (h, w), original)) <= TOL


def test_full_forward_matches_official():
    """The official list-of-dicts `forward` (preprocess + encode + decode + postprocess)."""
    cfg = sam_config("vit_t")
    ref = build_official(cfg)
    ours = build_sam("vit_t").eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 200, 256), generator=gen).float()
    prompt = _prompts(cfg.img_size, gen)["box_point"]
    inp = [{"image": image, "original_size": (300, 384), **prompt}] * 2
    with torch.no_grad():
        out_ref, out = ref(inp, True), ours(inp, True)
    for a, b in zip(out_ref, out, strict=True):
        assert maxdiff(a["low_res_logits"], b["low_res_logits"]) <= TOL
        assert maxdiff(a["iou_predictions"], b["iou_predictions"]) <= TOL
        assert (a["masks"] != b["masks"]).float().mean() < 1e-3


def test_batched_decode_equals_official_prompt_encoding(tiny_sam):
    """`Sam.decode` (labelled points, box corners as labels 2/3) equals the official prompt path."""
    model = tiny_sam.eval()
    gen = torch.Generator().manual_seed(3)
    s = model.img_size
    emb = torch.randn(1, model.prompt_encoder.embed_dim, s // 16, s // 16, generator=gen)
    pts = torch.rand(2, 2, 2, generator=gen) * s
    lbl = torch.tensor([[1, 0], [1, 1]])
    box = torch.tensor([[10.0, 20, 150, 200], [30, 40, 90, 100]])
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(points=(pts, lbl), boxes=box, masks=None)
        m_ref, i_ref = model.mask_decoder.predict_masks(emb, model.prompt_encoder.get_dense_pe(), sparse, dense)
        coords = torch.cat([pts, box.view(2, 2, 2)], dim=1)
        labels = torch.cat([lbl, torch.tensor([[2, 3], [2, 3]])], dim=1)
        m, i = model.decode(emb, torch.zeros(2, dtype=torch.long), coords, labels)
    assert torch.allclose(m, m_ref, atol=TOL) and torch.allclose(i, i_ref, atol=TOL)


def test_vit_split_forward_equals_forward_at_every_unit(gen):
    """SAM's ViT splits like TinyViT: patch embedding (+ position embedding), then one unit per block."""
    from sam_train.models.registry import build_sam

    encoder = build_sam("vit_t").image_encoder.eval()
    x = torch.randn(1, 3, encoder.img_size, encoder.img_size, generator=gen)
    with torch.no_grad():
        full = encoder(x)
        for k in range(len(encoder.units()) + 1):
            assert torch.equal(encoder.forward_from(encoder.forward_until(x, k), k), full), k
    order = [encoder.unit_of(name) for name, _ in encoder.named_parameters()]
    assert order == sorted(order) and order[-1] == len(encoder.units()) == encoder.depth + 1
