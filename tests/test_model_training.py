"""Training properties of the model: gradients, ragged batching, SDPA, checkpointing, compile, bf16."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sam_train.models import build_sam
from sam_train.models.common import LayerNorm2d
from sam_train.models.image_encoder import Attention, Block

SIZE = 256  # vit_t input side
LOW = SIZE // 4  # low-res mask side


def _ragged_prompts(counts: list[int], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Mixed prompts for sum(counts) objects, padded to a common K with label -1.

    Object j cycles through: 1 click, box, 3 clicks + mask, mask only, box + 1 click + mask.
    """
    k = 4
    coords, labels, has_mask = [], [], []
    for j in range(sum(counts)):
        kind = j % 5
        xy = torch.rand(k, 2, generator=gen) * (SIZE - 1)
        lbl = torch.full((k,), -1)
        if kind == 0:
            lbl[0] = 1
        elif kind == 1:
            xy[:2] = torch.tensor([[20.0, 30.0], [180.0, 200.0]]) + j
            lbl[:2] = torch.tensor([2, 3])
        elif kind == 2:
            lbl[:3] = torch.tensor([1, 0, 1])
        elif kind == 4:
            xy[1:3] = torch.tensor([[40.0, 50.0], [150.0, 120.0]])
            lbl[:3] = torch.tensor([1, 2, 3])
        coords.append(xy)
        labels.append(lbl)
        has_mask.append(kind in (2, 3, 4))
    return {
        "image_ids": torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)),
        "point_coords": torch.stack(coords),
        "point_labels": torch.stack(labels),
        "mask_inputs": torch.randn(sum(counts), 1, LOW, LOW, generator=gen),
        "has_mask": torch.tensor(has_mask),
    }


def _select(prompts: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {k: v[rows] for k, v in prompts.items()}
    out["image_ids"] = torch.zeros_like(out["image_ids"])
    return out


def _images(b: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, SIZE, SIZE), generator=gen).float()


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Zero-initialised tables (rel-pos, pos_embed) would make some checks vacuous: fill them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model


def _loss(model, images, prompts, targets):
    emb = model.encode(model.preprocess(images))
    low_res, iou = model.decode(emb, **prompts)
    loss = F.binary_cross_entropy_with_logits(low_res, targets) + (iou - 0.5).pow(2).mean()
    return loss, low_res, iou


def test_gradients_reach_every_parameter(gen):
    torch.manual_seed(0)
    model = _randomise(build_sam("vit_t")).train()
    prompts = _ragged_prompts([3, 2], gen)
    assert set(prompts["point_labels"].unique().tolist()) == {-1, 0, 1, 2, 3}
    targets = (torch.rand(5, 4, LOW, LOW, generator=gen) > 0.5).float()
    loss, _, _ = _loss(model, _images(2, gen), prompts, targets)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached: {missing}"
    for part in ("image_encoder", "prompt_encoder", "mask_decoder"):
        assert any(n.startswith(part) for n, _ in model.named_parameters())


def test_batched_ragged_equals_single_image(gen):
    torch.manual_seed(0)
    model = _randomise(build_sam("vit_t")).eval()
    counts = [2, 1, 3]
    images = _images(3, gen)
    prompts = _ragged_prompts(counts, gen)
    with torch.no_grad():
        emb = model.encode(model.preprocess(images))
        low_res, iou = model.decode(emb, **prompts)
        for i in range(3):
            rows = (prompts["image_ids"] == i).nonzero().flatten()
            emb_i = model.encode(model.preprocess(images[i : i + 1]))
            assert torch.allclose(emb[i : i + 1], emb_i, atol=1e-5)
            low_i, iou_i = model.decode(emb_i, **_select(prompts, rows))
            assert torch.allclose(low_res[rows], low_i, atol=1e-4), i
            assert torch.allclose(iou[rows], iou_i, atol=1e-5), i
            for r in rows:  # and each object alone: no object leaks into another
                low_r, _ = model.decode(emb_i, **_select(prompts, r[None]))
                assert torch.allclose(low_res[r], low_r[0], atol=1e-4)


def test_sdpa_matches_explicit_attention(gen):
    torch.manual_seed(0)
    attn = _randomise(Attention(96, num_heads=3, use_rel_pos=True, input_size=(8, 8)))
    ref = copy.deepcopy(attn)
    ref.use_sdpa = False
    x = torch.randn(2, 8, 8, 96, generator=gen, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, out_ref = attn(x), ref(x_ref)
    assert torch.allclose(out, out_ref, atol=1e-5)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-4)
    for (name, p), p_ref in zip(attn.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p.grad, p_ref.grad, atol=1e-4), name


def test_activation_checkpointing_same_outputs_and_grads(gen):
    torch.manual_seed(0)
    plain = _randomise(build_sam("vit_t")).train()
    ckpt = build_sam("vit_t", grad_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    for blk in ckpt.image_encoder.blocks:
        # On the attention, not the block: non-reentrant recomputation stops early, before block hooks.
        blk.attn.register_forward_hook(lambda *_: calls.append(1))
    images, prompts = _images(2, gen), _ragged_prompts([2, 1], gen)
    targets = (torch.rand(3, 4, LOW, LOW, generator=gen) > 0.5).float()
    loss_a, low_a, _ = _loss(plain, images, prompts, targets)
    loss_b, low_b, _ = _loss(ckpt, images, prompts, targets)
    assert torch.allclose(low_a, low_b, atol=1e-5)
    loss_a.backward()
    loss_b.backward()
    depth = len(ckpt.image_encoder.blocks)
    assert len(calls) == 2 * depth  # each block ran again in backward: checkpointing is active
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_matches_eager(gen, backend):
    """aot_eager traces the train step with dynamo + AOTAutograd (no C++ toolchain); inductor also generates code."""
    torch.manual_seed(0)
    model = _randomise(build_sam("vit_t")).train()
    images, prompts = _images(2, gen), _ragged_prompts([2, 1], gen)
    targets = (torch.rand(3, 4, LOW, LOW, generator=gen) > 0.5).float()

    def step(m):
        m.zero_grad()
        loss, low, _ = _loss(m, images, prompts, targets)
        loss.backward()
        return low.detach(), [p.grad.clone() for p in m.parameters()]

    low, grads = step(model)
    compiled = copy.deepcopy(model)
    try:
        compiled.encode = torch.compile(compiled.encode, backend=backend, fullgraph=True)
        compiled.decode = torch.compile(compiled.decode, backend=backend, fullgraph=True)
        low_c, grads_c = step(compiled)
    except Exception as err:  # a clear failure (not a skip): compile is part of the performance story
        pytest.fail(f"torch.compile(backend={backend!r}) failed on this CPU: {type(err).__name__}: {err}")
    assert torch.allclose(low, low_c, atol=1e-4)
    for (name, _), g, g_c in zip(model.named_parameters(), grads, grads_c, strict=True):
        assert torch.allclose(g, g_c, atol=1e-4, rtol=1e-3), name


def test_bf16_autocast_finite_and_norms_in_fp32(gen):
    torch.manual_seed(0)
    model = _randomise(build_sam("vit_t")).eval()
    seen: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
    for m in model.modules():
        if isinstance(m, nn.LayerNorm | LayerNorm2d):
            m.register_forward_hook(lambda mod, inp, out: seen.append((mod, inp[0].detach(), out.detach())))
    prompts = _ragged_prompts([2], gen)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        emb = model.encode(model.preprocess(_images(1, gen)))
        low_res, iou = model.decode(emb, **prompts)
    assert emb.dtype == torch.bfloat16  # autocast really ran the matmuls / convs in bf16
    assert torch.isfinite(low_res).all() and torch.isfinite(iou).all() and torch.isfinite(emb).all()
    assert any(x.dtype == torch.bfloat16 for _, x, _ in seen)  # some norms did get bf16 input
    for mod, x, out in seen:
        w, b = mod.weight.float(), mod.bias.float()
        if isinstance(mod, LayerNorm2d):  # channels-first: normalise over dim 1
            ref = F.layer_norm(x.float().permute(0, 2, 3, 1), (x.shape[1],), w, b, mod.eps).permute(0, 3, 1, 2)
        else:
            ref = F.layer_norm(x.float(), mod.normalized_shape, w, b, mod.eps)
        # fp32 statistics rounded once to the output dtype; a bf16 reduction would be off by far more.
        ulp = 2.0**-7 if out.dtype == torch.bfloat16 else 1e-5
        assert torch.allclose(out.float(), ref, atol=1e-5, rtol=ulp), type(mod).__name__
        assert out.dtype in (x.dtype, torch.float32)


def test_drop_path_is_stochastic_in_training_only(gen):
    x = torch.randn(8, 4, 4, 32, generator=gen)
    always = Block(dim=32, num_heads=2, window_size=0, input_size=(4, 4), drop_path=1.0).train()
    assert torch.equal(always(x), x)  # both residual branches dropped for every sample
    assert not torch.allclose(always.eval()(x), x)  # eval never drops
    half = Block(dim=32, num_heads=2, window_size=0, input_size=(4, 4), drop_path=0.5)
    half.load_state_dict(always.state_dict())
    assert torch.equal(half.eval()(x), always(x))
    half.train()
    torch.manual_seed(0)
    y1 = half(x)
    torch.manual_seed(1)
    y2 = half(x)
    assert not torch.allclose(y1, y2)
