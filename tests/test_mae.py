"""MAE model: masking, patchify, loss on hidden patches, sin-cos tables, timm / official-MAE weight parity."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer

from sam_train.lit.mae_module import MaeModule, reconstruction_grid
from sam_train.models.mae import build_mae, load_timm_state_dict, num_masked_patches, random_masking
from sam_train.models.pos_embed import get_2d_sincos_pos_embed

TINY = dict(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=1)


@pytest.mark.parametrize(("n", "ratio", "hidden"), [(196, 0.75, 147), (64, 0.75, 48), (10, 0.75, 8), (16, 0.5, 8)])
def test_masking_hides_exactly_round_ratio_per_sample(n, ratio, hidden, gen):
    x = torch.randn(5, n, 3, generator=gen)
    x_masked, mask, _ = random_masking(x, ratio, gen)
    assert num_masked_patches(n, ratio) == hidden
    assert x_masked.shape == (5, n - hidden, 3)
    assert mask.sum(dim=1).tolist() == [hidden] * 5
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert len({tuple(m.tolist()) for m in mask}) > 1  # per-sample masks, not one shared pattern


def test_masking_ids_restore_original_order(gen):
    b, n = 4, 49
    x = torch.arange(n, dtype=torch.float32)[None, :, None].repeat(b, 1, 2) + torch.arange(b)[:, None, None] * 100
    x_masked, mask, ids_restore = random_masking(x, 0.75, gen)
    # the kept tokens are exactly the visible positions of the mask
    for i in range(b):
        assert sorted(x_masked[i, :, 0].sub(100 * i).long().tolist()) == torch.nonzero(mask[i] == 0).flatten().tolist()
    # appending placeholders for the hidden tokens and gathering with ids_restore gives the original order back
    full = torch.cat([x_masked, torch.full((b, n - x_masked.shape[1], 2), -1.0)], dim=1)
    restored = torch.gather(full, 1, ids_restore[..., None].expand(-1, -1, 2))
    visible = mask[..., None] == 0
    assert torch.equal(torch.where(visible, x, torch.full_like(x, -1.0)), restored)
    # same generator seed -> same masks
    again = random_masking(x, 0.75, torch.Generator().manual_seed(1234))[1]
    assert torch.equal(again, random_masking(x, 0.75, torch.Generator().manual_seed(1234))[1])


def test_patchify_layout_and_roundtrip(gen):
    model = build_mae("mae_vit_t", **TINY)
    imgs = torch.randn(2, 3, 64, 64, generator=gen)
    patches = model.patchify(imgs)
    assert patches.shape == (2, 64, 8 * 8 * 3)
    # patch (row 2, col 5) is token 2 * 8 + 5, flattened as (pixel row, pixel col, channel)
    expected = imgs[1, :, 16:24, 40:48].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[1, 2 * 8 + 5], expected)
    assert torch.equal(model.unpatchify(patches), imgs)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_only_on_hidden_patches(norm_pix, gen):
    model = build_mae("mae_vit_t", **TINY, norm_pix_loss=norm_pix)
    imgs = torch.randn(3, 3, 64, 64, generator=gen)
    pred = torch.randn(3, 64, 192, generator=gen)
    mask = torch.zeros(3, 64)
    mask[:, torch.randperm(64, generator=gen)[:48]] = 1
    loss = model.forward_loss(imgs, pred, mask)
    # hand computation: per-patch normalised targets (unbiased variance, eps 1e-6), mean over hidden patches
    target = model.patchify(imgs)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / torch.sqrt(target.var(-1, keepdim=True) + 1e-6)
    per_patch = ((pred - target) ** 2).mean(-1)
    torch.testing.assert_close(loss, per_patch[mask.bool()].mean())
    # changing predictions of visible patches leaves the loss unchanged; hidden ones change it
    visible_changed = torch.where(mask[..., None].bool(), pred, pred + 10.0)
    torch.testing.assert_close(model.forward_loss(imgs, visible_changed, mask), loss)
    assert model.forward_loss(imgs, torch.where(mask[..., None].bool(), pred + 1.0, pred), mask) > loss + 0.5


def test_forward_shapes_and_gradients(gen):
    model = build_mae("mae_vit_t", **TINY)
    loss, pred, mask = model(torch.randn(2, 3, 64, 64, generator=gen), generator=gen)
    loss.backward()
    assert pred.shape == (2, 64, 192) and mask.sum().item() == 2 * 48
    assert model.pos_embed.grad is None and model.decoder_pos_embed.grad is None  # fixed tables
    assert model.cls_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_sincos_table_matches_hand_formula():
    d, g = 16, 4
    table = get_2d_sincos_pos_embed(d, g, cls_token=True)
    assert table.shape == (1 + g * g, d) and torch.all(table[0] == 0)
    for row in range(g):
        for col in range(g):
            expected = []
            for coord in (col, row):  # MAE layout: first half encodes the column, second half the row
                freqs = [10000 ** (-k / (d // 4)) for k in range(d // 4)]
                expected += [math.sin(coord * w) for w in freqs] + [math.cos(coord * w) for w in freqs]
            torch.testing.assert_close(table[1 + row * g + col], torch.tensor(expected), atol=1e-6, rtol=0)


def _perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random offsets on every weight (norm weights, biases, cls token too) so each mapping matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return module.eval()


def _timm_on_visible(ref: VisionTransformer, imgs: torch.Tensor, mask: torch.Tensor, ids_restore: torch.Tensor):
    """timm's modules on the visible tokens, in the shuffled order our encoder keeps them."""
    tokens = ref.patch_embed(imgs) + ref.pos_embed[:, 1:]
    keep = int((mask[0] == 0).sum())
    ids_keep = torch.argsort(ids_restore, dim=1)[:, :keep]
    tokens = torch.gather(tokens, 1, ids_keep[..., None].expand(-1, -1, tokens.shape[-1]))
    cls = (ref.cls_token + ref.pos_embed[:, :1]).expand(imgs.shape[0], -1, -1)
    return ref.norm(ref.blocks(torch.cat([cls, tokens], dim=1)))


def _check_parity(ref: VisionTransformer, ours, imgs: torch.Tensor) -> None:
    with torch.no_grad():
        # all tokens (ratio 0): our output, unshuffled with ids_restore, equals timm's forward_features
        latent, _, ids_restore = ours.forward_encoder(imgs, 0.0, torch.Generator().manual_seed(0))
        patches = torch.gather(latent[:, 1:], 1, ids_restore[..., None].expand(-1, -1, latent.shape[-1]))
        expected = ref.forward_features(imgs)
        torch.testing.assert_close(latent[:, 0], expected[:, 0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(patches, expected[:, 1:], atol=1e-4, rtol=1e-4)
        # visible tokens only (ratio 0.75)
        latent, mask, ids_restore = ours.forward_encoder(imgs, 0.75, torch.Generator().manual_seed(1))
        torch.testing.assert_close(latent, _timm_on_visible(ref, imgs, mask, ids_restore), atol=1e-4, rtol=1e-4)


def test_timm_vit_base_patch16_224_parity(gen):
    torch.manual_seed(0)
    ref = _perturbed(timm.create_model("vit_base_patch16_224", pretrained=False), seed=1)
    ours = build_mae("mae_vit_b").eval()
    timm_keys = {k for k in ref.state_dict() if not k.startswith("head.")}
    ours_encoder = {k for k in ours.state_dict() if not k.startswith(("decoder_", "mask_token"))}
    assert len(timm_keys) == len(ours_encoder) == 150  # 12 blocks x 12 + cls, pos, patch (2), norm (2)
    assert {k.replace(".mlp.fc", ".mlp.lin") for k in timm_keys} == ours_encoder
    missing = load_timm_state_dict(ours, ref.state_dict())
    assert missing and all(k.startswith(("decoder_", "mask_token")) for k in missing)
    torch.testing.assert_close(ours.blocks[7].mlp.lin2.weight, ref.blocks[7].mlp.fc2.weight, rtol=0, atol=0)
    _check_parity(ref, ours, torch.randn(1, 3, 224, 224, generator=gen))


def test_official_mae_checkpoint_layout_loads_encoder_and_decoder(gen):
    """`{"model": ...}` as facebookresearch/mae writes it: timm encoder names + timm decoder blocks."""
    torch.manual_seed(0)
    ref = _perturbed(VisionTransformer(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=0), 2)
    decoder = _perturbed(torch.nn.ModuleList(TimmBlock(32, num_heads=16, qkv_bias=True) for _ in range(1)), 3)
    model_sd = dict(ref.state_dict())
    model_sd.update({f"decoder_blocks.{k}": v for k, v in decoder.state_dict().items()})
    g = torch.Generator().manual_seed(4)
    extra = {
        "decoder_embed.weight": (32, 64), "decoder_embed.bias": (32,), "mask_token": (1, 1, 32),
        "decoder_pos_embed": (1, 65, 32), "decoder_norm.weight": (32,), "decoder_norm.bias": (32,),
        "decoder_pred.weight": (192, 32), "decoder_pred.bias": (192,),
    }  # fmt: skip
    model_sd.update({k: torch.randn(s, generator=g) for k, s in extra.items()})
    ours = build_mae("mae_vit_t", **TINY).eval()
    assert load_timm_state_dict(ours, {"model": model_sd}["model"]) == []
    assert torch.equal(ours.decoder_blocks[0].mlp.lin1.weight, decoder[0].mlp.fc1.weight)
    assert torch.equal(ours.decoder_pred.weight, model_sd["decoder_pred.weight"])
    _check_parity(ref, ours, torch.randn(3, 3, 64, 64, generator=gen))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_timm_state_dict(build_mae("mae_vit_t", **{**TINY, "embed_dim": 32}), model_sd)


def test_param_groups_and_schedule():
    model = build_mae("mae_vit_t", **TINY)
    groups = MaeModule(model=model).param_groups()
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert id(model.cls_token) in no_decay and id(model.mask_token) in no_decay
    assert id(model.blocks[0].norm1.weight) in no_decay and id(model.blocks[0].attn.qkv.bias) in no_decay
    assert id(model.blocks[0].attn.qkv.weight) in decay and id(model.patch_embed.proj.weight) in decay
    assert id(model.pos_embed) not in decay | no_decay  # fixed, not optimised
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert decay | no_decay == trainable and not decay & no_decay


def test_reconstruction_grid_rows(gen):
    model = build_mae("mae_vit_t", **TINY, norm_pix_loss=False)
    imgs = torch.rand(2, 3, 64, 64, generator=gen) * 0.2  # inside the displayable range after un-normalising
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    pred = torch.randn(2, 64, 192, generator=gen)
    mask = (torch.rand(2, 64, generator=gen) > 0.5).float()
    grid = reconstruction_grid(model, imgs, pred, mask, mean=mean, std=std)
    assert grid.shape == (3, 3 * 66 + 2, 2 * 66 + 2) and 0 <= grid.min() and grid.max() <= 1
    original = grid[:, 2:66, 2:66]
    masked = grid[:, 68:132, 2:66]
    recon = grid[:, 134:198, 2:66]
    hidden = model.unpatchify(mask[..., None].expand(-1, -1, 192))[0].bool()
    torch.testing.assert_close(original, imgs[0] * 0.25 + 0.5)
    assert torch.all(masked[hidden] == 0.5) and torch.equal(masked[~hidden], original[~hidden])
    assert torch.equal(recon[~hidden], original[~hidden])
    torch.testing.assert_close(recon[hidden], (model.unpatchify(pred)[0] * 0.25 + 0.5).clamp(0, 1)[hidden])


def test_grad_checkpointing_and_bf16_autocast(gen):
    imgs = torch.randn(2, 3, 64, 64, generator=gen)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_mae("mae_vit_t", **TINY, grad_checkpointing=ckpt)
        loss, _, _ = model(imgs, generator=torch.Generator().manual_seed(3))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0], grads[1])  # recomputation changes memory, not results
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_bf16, pred, _ = model(imgs, generator=torch.Generator().manual_seed(3))
    assert pred.dtype == torch.bfloat16 and loss_bf16.dtype == torch.float32  # the loss is computed in fp32
    assert abs(loss_bf16.item() - loss.item()) < 0.05 * loss.item()
