"""The batched interactive loop: equal to a per-object loop, paper schedule, mask feedback, clicks."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from prompt_reference import per_object_reference

from sam_train.losses import SamLossConfig, sam_loss
from sam_train.prompts.interactive import PromptSimulationConfig, loss_schedule, simulate

S = 256  # vit_t input size; low-res logits are 64 x 64


@pytest.fixture
def scene(tiny_sam):
    """vit_t, embeddings of 2 random images, 3 + 2 disc/rectangle objects."""
    g = torch.Generator().manual_seed(0)
    model = tiny_sam.eval()
    images = torch.rand(2, 3, S, S, generator=g) * 255
    with torch.no_grad():
        emb = model.encode(model.preprocess(images))
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    gts = []
    for i in range(5):
        cx, cy = torch.randint(50, 206, (2,), generator=g).tolist()
        r = int(torch.randint(15, 45, (1,), generator=g))
        gts.append(
            ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r) if i % 2 else ((xx - cx).abs() < r) & ((yy - cy).abs() < r // 2)
        )
    return model, emb, torch.stack(gts), torch.tensor([0, 0, 0, 1, 1])


def loss_for(m: int, **kw) -> functools.partial:
    return functools.partial(sam_loss, num_objects=float(m), cfg=SamLossConfig(**kw))


def assert_same(a, b, atol=1e-5):
    assert a.schedule == b.schedule and a.num_prompts == b.num_prompts
    assert torch.equal(a.is_box, b.is_box)
    assert torch.equal(a.point_labels, b.point_labels)
    torch.testing.assert_close(a.point_coords, b.point_coords, atol=1e-4, rtol=0)
    assert torch.equal(a.selected, b.selected)
    torch.testing.assert_close(a.ious, b.ious, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.low_res_logits, b.low_res_logits, atol=atol, rtol=0)
    torch.testing.assert_close(a.iou_pred, b.iou_pred, atol=atol, rtol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_batched_loop_equals_per_object_loop(scene, seed):
    model, emb, gt, ids = scene
    cfg = PromptSimulationConfig()
    with torch.no_grad():
        a = simulate(model.decode, emb, gt, ids, cfg, torch.Generator().manual_seed(seed), loss_fn=loss_for(5))
        b = per_object_reference(
            model.decode, emb, gt, ids, cfg, torch.Generator().manual_seed(seed), loss_fn=loss_for(5)
        )
    assert_same(a, b)
    assert a.is_box.any() and not a.is_box.all()  # both kinds of first prompt are exercised
    assert (a.point_labels == 1).sum() > 3 and (a.point_labels == 0).sum() > 3  # both kinds of click
    torch.testing.assert_close(torch.stack([x["loss"] for x in a.losses]), torch.stack([x["loss"] for x in b.losses]))
    torch.testing.assert_close(a.loss, b.loss)


def test_batched_gradients_equal_per_object_gradients(scene):
    model, emb, gt, ids = scene
    cfg = PromptSimulationConfig(num_iterations=4, num_mask_only=1, box_jitter="uniform_expand")
    grads = []
    for fn in (simulate, per_object_reference):
        model.zero_grad()
        out = fn(
            model.decode, emb, gt, ids, cfg, torch.Generator().manual_seed(3), loss_fn=loss_for(5, resolution="input")
        )
        out.loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.mask_decoder.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("resolution", ["low_res", "input"])
def test_checkpointed_iterations_give_the_same_loss_and_gradients(scene, resolution):
    """Recomputing each iteration's decoder + loss in backward changes memory, not the maths: same loss,
    same gradients for the decoder, the prompt encoder and the image embeddings (the encoder's input)."""
    model, emb, gt, ids = scene
    cfg = PromptSimulationConfig(num_iterations=5, num_mask_only=2)
    results, grads, calls = [], [], []

    def decode(*args):
        calls[-1] += 1
        return model.decode(*args)

    for ckpt in (False, True):
        model.zero_grad()
        calls.append(0)
        leaf = emb.clone().requires_grad_(True)
        out = simulate(decode, leaf, gt, ids, cfg, torch.Generator().manual_seed(7),
                       loss_fn=loss_for(5, resolution=resolution), checkpoint_iterations=ckpt)
        out.loss.backward()
        params = [*model.mask_decoder.parameters(), *model.prompt_encoder.parameters()]
        grads.append(torch.cat([p.grad.flatten() for p in params if p.grad is not None] + [leaf.grad.flatten()]))
        results.append(out)
    assert calls == [5, 10]  # checkpointed: every iteration's decoder ran again in backward
    assert grads[0].abs().sum() > 0
    assert_same(results[0], results[1], atol=1e-6)
    torch.testing.assert_close(results[0].loss, results[1].loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_loss_iterations_train_the_first_and_random_others_without_changing_the_simulated_user(scene):
    """RITM-style iterative training: the unscored iterations still move the simulated user on (same
    prompts, same masks fed back) but run without gradients; the loss is the scored iterations' loss."""
    model, emb, gt, ids = scene
    base = dict(num_iterations=5, num_mask_only=0, box_probability=1.0)  # no draw for the mask-only schedule
    cfg = PromptSimulationConfig(**base, loss_iterations=2)
    spy = Spy(model.decode)
    leaf = emb.clone().requires_grad_(True)
    part = simulate(spy, leaf, gt, ids, cfg, torch.Generator().manual_seed(3), loss_fn=loss_for(5))
    scored = part.with_loss
    assert scored[0] and sum(scored) == 2 and len(part.losses) == 2
    assert [call[3][0].requires_grad for call in spy.calls] == scored  # no graph kept for the others
    part.loss.backward()
    grad_part = leaf.grad.clone()

    g = torch.Generator().manual_seed(3)
    torch.randperm(4, generator=g)  # the draw of loss_schedule, so the rest of the stream lines up
    leaf.grad = None
    full = simulate(model.decode, leaf, gt, ids, PromptSimulationConfig(**base), g, loss_fn=loss_for(5))
    assert full.with_loss == [True] * 5
    assert_same(part, full)
    want = sum(out["loss"] for out, on in zip(full.losses, scored, strict=True) if on)
    torch.testing.assert_close(part.loss, want)
    want.backward()
    torch.testing.assert_close(grad_part, leaf.grad)
    g = torch.Generator().manual_seed(3)
    assert loss_schedule(PromptSimulationConfig(**base, loss_iterations=6), g) == [True] * 5  # more than there are
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(3).get_state())  # and nothing drawn
    with pytest.raises(ValueError, match="loss_iterations"):
        PromptSimulationConfig(**base, loss_iterations=0)


def test_without_loss_highest_predicted_iou_is_fed_back(scene):
    model, emb, gt, ids = scene
    cfg = PromptSimulationConfig(box_probability=0.0, box_jitter="none")
    with torch.no_grad():
        a = simulate(model.decode, emb, gt, ids, cfg, torch.Generator().manual_seed(4), return_all=True)
        b = per_object_reference(model.decode, emb, gt, ids, cfg, torch.Generator().manual_seed(4))
    assert_same(a, b)
    assert a.loss is None and a.all_logits.shape == (11, 5, 1, 64, 64)
    assert (a.selected[0] >= 1).all() and (a.selected[1:] == 0).all()  # multimask only for one click


class Spy:
    """Wraps Sam.decode and records what the loop sends to it."""

    def __init__(self, decode):
        self.decode, self.calls = decode, []

    def __call__(self, emb, ids, coords, labels, mask_inputs, has_mask):
        out = self.decode(emb, ids, coords, labels, mask_inputs, has_mask)
        self.calls.append((coords, labels, mask_inputs, out))
        return out


def test_loop_follows_the_paper_schedule_and_feeds_back_chosen_logits(scene):
    model, emb, gt, ids = scene
    spy, multimask_args = Spy(model.decode), []

    def loss_fn(logits, iou_pred, gt_masks, multimask):
        multimask_args.append(multimask)
        out = sam_loss(logits, iou_pred, gt_masks, multimask, 5.0)
        # Token 3 for multimask objects: neither the loss's nor the IoU head's pick on this model,
        # so the test sees that the loop honours whatever the loss selected.
        out["selected"] = torch.where(torch.as_tensor(multimask), 3, out["selected"])
        return out

    res = simulate(
        spy, emb, gt, ids, PromptSimulationConfig(), torch.Generator().manual_seed(5), loss_fn=loss_fn, return_all=True
    )
    assert len(spy.calls) == 11  # one batched decoder pass per iteration, all objects at once
    assert all(c[0].shape[0] == 5 for c in spy.calls)
    assert res.num_prompts == [sum(res.schedule[: t + 1]) for t in range(11)] and res.num_prompts[-1] == 9
    assert spy.calls[0][2] is None
    for t in range(1, 11):
        assert torch.equal(spy.calls[t][2], res.all_logits[t - 1])  # previous chosen logits ...
        assert not spy.calls[t][2].requires_grad  # ... detached
        tokens = (
            spy.calls[t - 1][3][0].detach().gather(1, res.selected[t - 1][:, None, None, None].expand(-1, 1, 64, 64))
        )
        assert torch.equal(tokens, res.all_logits[t - 1])  # the loss's selected token
    assert (res.selected[0][~res.is_box] == 3).all() and (res.selected[0][res.is_box] == 0).all()
    box = res.is_box
    assert torch.equal(multimask_args[0], ~box) and all(mm is False for mm in multimask_args[1:])
    assert res.point_labels.shape == (5, 10)
    assert (res.point_labels[box, -2:] == torch.tensor([2, 3])).all()
    assert (res.point_labels[~box, 0] == 1).all() and (res.point_labels[~box, -1] == -1).all()
    assert res.loss.requires_grad and res.ious.shape == (11, 5)


def test_new_clicks_lie_in_the_previous_error_region(scene):
    model, emb, gt, ids = scene
    spy = Spy(model.decode)
    with torch.no_grad():
        res = simulate(spy, emb, gt, ids, PromptSimulationConfig(), torch.Generator().manual_seed(6), return_all=True)
    checked = 0
    for t in range(1, 11):
        if not res.schedule[t]:
            assert torch.equal(spy.calls[t][1], spy.calls[t - 1][1])  # mask-only: the prompts do not change
            continue
        pred = F.interpolate(res.all_logits[t - 1], size=(S, S), mode="bilinear", align_corners=False)[:, 0] > 0
        n = res.num_prompts[t]
        slot = torch.where(res.is_box, n - 2, n - 1)  # the newest click sits before the box / padding
        coords, labels = spy.calls[t][0], spy.calls[t][1]
        click = coords[torch.arange(5), slot].long()
        label = labels[torch.arange(5), slot]
        inside_gt = gt[torch.arange(5), click[:, 1], click[:, 0]]
        inside_pred = pred[torch.arange(5), click[:, 1], click[:, 0]]
        assert torch.equal(label == 1, inside_gt & ~inside_pred)  # false negative -> positive click
        assert torch.equal(label == 0, inside_pred & ~inside_gt)  # false positive -> negative click
        checked += 1
    assert checked == 8


def test_same_seed_same_prompts(scene):
    model, emb, gt, ids = scene
    cfg = PromptSimulationConfig(num_iterations=4, num_mask_only=1)
    with torch.no_grad():
        a, b, c = (simulate(model.decode, emb, gt, ids, cfg, torch.Generator().manual_seed(s)) for s in (7, 7, 8))
    assert torch.equal(a.point_coords, b.point_coords) and torch.equal(a.low_res_logits, b.low_res_logits)
    assert not torch.equal(a.point_coords, c.point_coords)


def test_bad_inputs_are_rejected(scene):
    model, emb, gt, ids = scene
    cfg, g = PromptSimulationConfig(), torch.Generator()
    empty = gt.clone()
    empty[2] = False
    with pytest.raises(ValueError, match="empty masks"):
        simulate(model.decode, emb, empty, ids, cfg, g)
    with pytest.raises(ValueError, match="bool"):
        simulate(model.decode, emb, gt.float(), ids, cfg, g)
    with pytest.raises(ValueError, match="image_ids"):
        simulate(model.decode, emb, gt, ids[:3], cfg, g)


def test_sam_predict_masks_is_decode_best_token_upsample(scene):
    """Sam.predict_masks: one decoder pass, the best multimask token where asked (else token 0), upsampled to S;
    Sam.batch_embeddings: the batch's cached embeddings, else its images encoded."""
    model, emb, gt, ids = scene
    m = len(ids)
    coords = torch.rand(m, 2, 2, generator=torch.Generator().manual_seed(5)) * S
    labels = torch.tensor([[1, -1]] * m)
    multimask = torch.tensor([True, False, True, True, False])
    with torch.no_grad():
        chosen, logits = model.predict_masks(emb, ids, coords, labels, multimask=multimask)
        low, iou = model.decode(emb, ids, coords, labels)
    token = torch.where(multimask, iou[:, 1:].argmax(1) + 1, 0)
    expected = low[torch.arange(m), token][:, None]
    assert torch.equal(chosen, expected) and logits.shape == (m, S, S)
    torch.testing.assert_close(logits, F.interpolate(expected, (S, S), mode="bilinear", align_corners=False)[:, 0])
    assert model.batch_embeddings({"embeddings": emb, "images": None}) is emb
    images = torch.rand(1, 3, S, S, generator=torch.Generator().manual_seed(6)) * 255
    with torch.no_grad():
        torch.testing.assert_close(model.batch_embeddings({"images": images}), model.encode(model.preprocess(images)))
