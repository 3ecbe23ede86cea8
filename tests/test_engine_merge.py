"""Semi-automatic merge, de-duplication and matching on RLEs, checked against numpy set arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam_train.data.rle import encode_masks
from sam_train.engine.merge import dedup, from_rles, iou_matrix, match_scores, merge_proposals


def rect(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def np_iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / max((a | b).sum(), 1)


def test_rle_roundtrip_and_iou_match_numpy(gen):
    masks = torch.rand(6, 20, 30, generator=gen) > 0.6
    rles = encode_masks(masks)
    assert torch.equal(from_rles(rles, (20, 30)), masks)
    m = masks.numpy()
    ref = np.array([[np_iou(a, b) for b in m[3:]] for a in m[:3]])
    np.testing.assert_allclose(iou_matrix(rles[:3], rles[3:]), ref, atol=1e-12)


def test_merge_overlapping_proposals_never_overwrites_or_duplicates():
    h, w = 40, 40
    a, b = rect(h, w, 0, 20, 0, 20), rect(h, w, 25, 40, 25, 40)
    proposals = np.stack([
        a.copy(),                      # 0: duplicate of existing a
        rect(h, w, 10, 30, 0, 20),     # 1: half on a
        rect(h, w, 0, 20, 22, 40),     # 2: free space
        rect(h, w, 0, 20, 19, 21),     # 3: 50% on a and on proposal 2 -> rejected
        rect(h, w, 22, 40, 0, 21),     # 4: free space, plus one row on a (below)
        rect(h, w, 0, 20, 23, 40),     # 5: near-duplicate of proposal 2, lower score
        b | rect(h, w, 24, 25, 25, 40),  # 6: existing b grown by one row
    ])
    proposals[4] |= rect(h, w, 19, 20, 0, 20)  # 20 px on a out of 398 -> 5% <= max_overlap: accepted, trimmed
    scores = [0.99, 0.98, 0.97, 0.96, 0.95, 0.90, 0.94]
    existing = encode_masks(np.stack([a, b]))
    result = merge_proposals(existing, encode_masks(proposals), scores, max_overlap=0.1)

    out = from_rles(result.rles, (h, w)).numpy()
    # existing masks first and bit-identical
    assert result.rles[:2] == existing and np.array_equal(out[0], a) and np.array_equal(out[1], b)
    assert result.model_made == [False, False] + [True] * len(result.accepted)
    assert result.accepted == [2, 4]
    assert set(result.rejected) == {0, 1, 3, 5, 6}
    assert "overlaps labelled pixels" in result.rejected[0]
    # no label pixel changes hands: all output masks are pairwise disjoint (trim=True)
    for i in range(len(out)):
        for j in range(i + 1, len(out)):
            assert not (out[i] & out[j]).any(), (i, j)
    # accepted ones are the proposals minus what was already claimed
    assert np.array_equal(out[2], proposals[2])
    assert np.array_equal(out[3], proposals[4] & ~a)
    # and no accepted mask duplicates an existing one
    assert max(np_iou(out[i], out[j]) for i in (2, 3) for j in (0, 1)) < 0.05


@pytest.mark.parametrize("trim", [True, False])
def test_merge_random_invariants(gen, trim):
    for _ in range(10):
        h, w = 24, 24
        existing = torch.zeros(3, h, w, dtype=torch.bool)
        proposals = torch.zeros(8, h, w, dtype=torch.bool)
        for masks in (existing, proposals):
            for m in masks:
                y0, x0 = (int(v) for v in torch.randint(0, 18, (2,), generator=gen))
                hh, ww = (int(v) for v in torch.randint(3, 10, (2,), generator=gen))
                m[y0:y0 + hh, x0:x0 + ww] = True
        scores = torch.rand(8, generator=gen).tolist()
        result = merge_proposals(encode_masks(existing), encode_masks(proposals), scores, max_overlap=0.2, trim=trim)
        out = from_rles(result.rles, (h, w)).numpy()
        ex, pr = existing.numpy(), proposals.numpy()
        assert np.array_equal(out[:3], ex)
        claimed = ex.any(0)
        order = np.argsort(-np.asarray(scores), kind="stable")
        expected = []
        for i in order:  # the rule restated in numpy
            if (pr[i] & claimed).sum() / pr[i].sum() <= 0.2:
                expected.append(int(i))
                claimed = claimed | pr[i]
        assert result.accepted == expected
        for k, i in enumerate(result.accepted):
            assert np.array_equal(out[3 + k], (pr[i] & ~ex.any(0) & ~out[3:3 + k].any(0)) if trim else pr[i])


def test_merge_rejects_bad_arguments():
    with pytest.raises(ValueError, match="same length"):
        merge_proposals([], encode_masks(np.ones((2, 4, 4), bool)), [0.5])
    with pytest.raises(ValueError, match="max_overlap"):
        merge_proposals([], [], [], max_overlap=1.0)


def test_dedup_drops_near_duplicates_keeps_best():
    h, w = 30, 30
    masks = np.stack([rect(h, w, 0, 10, 0, 10), rect(h, w, 0, 10, 0, 11), rect(h, w, 15, 25, 15, 25),
                      rect(h, w, 0, 10, 0, 20)])
    # IoU(0,1) = 100/110 = 0.91, IoU(1,3) = 0.55, IoU(0,3) = 0.5
    kept = dedup(encode_masks(masks), [0.5, 0.9, 0.7, 0.6], iou_thresh=0.8)
    assert kept == [1, 2, 3]
    assert dedup(encode_masks(masks), [0.5, 0.9, 0.7, 0.6], iou_thresh=0.4) == [1, 2]


def test_match_scores_one_to_one():
    h, w = 20, 20
    gt = np.stack([rect(h, w, 0, 10, 0, 10), rect(h, w, 12, 20, 12, 20)])
    pred = np.stack([rect(h, w, 0, 10, 0, 9),    # IoU 0.9 with gt 0
                     rect(h, w, 0, 10, 0, 8),    # IoU 0.8 with gt 0: a duplicate, not a second hit
                     rect(h, w, 0, 5, 15, 20)])  # nothing
    s = match_scores(encode_masks(pred), encode_masks(gt))
    assert (s["tp"], s["num_pred"], s["num_gt"]) == (1, 3, 2)
    assert s["recall"] == 0.5 and s["precision"] == pytest.approx(1 / 3)
