"""Fine-tuning strategies: frozen parts stay fixed, LoRA trains only LoRA, adapters start as identity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from official import build_official

from sam_train.finetune import AdapterConfig, LoraConfig, apply_finetune, merge_and_export_state_dict
from sam_train.models import build_sam, sam_config
from sam_train.models.checkpoint import save_sam_checkpoint
from sam_train.optim import param_groups

SIZE, LOW = 256, 64


def _base_model():
    """vit_t with the official model's (realistic) random weights."""
    model = build_sam("vit_t")
    model.load_state_dict(build_official(sam_config("vit_t"), seed=0).state_dict())
    return model


def _batch(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Two images, three objects: a click, a box, clicks + mask prompt."""
    return {
        "images": torch.randint(0, 256, (2, 3, SIZE, SIZE), generator=gen).float(),
        "image_ids": torch.tensor([0, 0, 1]),
        "point_coords": torch.tensor(
            [[[60.0, 80.0], [0, 0]], [[20.0, 30.0], [200.0, 180.0]], [[120.0, 100.0], [30.0, 40.0]]]
        ),
        "point_labels": torch.tensor([[1, -1], [2, 3], [1, 0]]),
        "mask_inputs": torch.randn(3, 1, LOW, LOW, generator=gen),
        "has_mask": torch.tensor([False, False, True]),
        "targets": (torch.rand(3, 1, LOW, LOW, generator=gen) > 0.5).float(),
    }


def _outputs(model, batch):
    emb = model.encode(model.preprocess(batch["images"]))
    keys = ("image_ids", "point_coords", "point_labels", "mask_inputs", "has_mask")
    return model.decode(emb, **{k: batch[k] for k in keys})


def _train(model, batch, steps: int = 3) -> None:
    opt = torch.optim.AdamW(param_groups(model, lr=1e-3, weight_decay=0.1), lr=1e-3)
    model.train()
    for _ in range(steps):
        low_res, iou = _outputs(model, batch)
        loss = F.binary_cross_entropy_with_logits(low_res[:, :1], batch["targets"]) + iou.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(before, model) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}


@pytest.mark.parametrize("frozen", [["image_encoder"], ["prompt_encoder", "mask_decoder"]])
def test_frozen_parts_unchanged_after_training(gen, frozen):
    model = apply_finetune(_base_model(), freeze=frozen)
    before = _snapshot(model)
    _train(model, _batch(gen))
    changed = _changed(before, model)
    for name in before:
        if name.split(".")[0] in frozen:
            assert name not in changed, name
    trained = [n for n in before if n.split(".")[0] not in frozen]
    # Nearly everything else moved (AdamW moves any parameter with a non-zero gradient).
    assert len(changed) >= 0.9 * len(trained)


def test_lora_run_changes_only_lora_parameters(gen):
    base = _base_model()
    model = apply_finetune(_base_model(), freeze=["prompt_encoder", "mask_decoder"], lora=LoraConfig(rank=4))
    lora_names = {n for n, _ in model.named_parameters() if ".lora_" in n}
    assert len(lora_names) == 2 * len(model.image_encoder.blocks)  # A and B on each block's qkv
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora_names
    batch = _batch(gen)
    with torch.no_grad():  # B starts at zero: the LoRA model is the base model
        for a, b in zip(_outputs(model.eval(), batch), _outputs(base.eval(), batch), strict=True):
            assert torch.allclose(a, b, atol=1e-5)
    before = _snapshot(model)
    _train(model, batch)
    assert _changed(before, model) == lora_names

    # q / v only (SAMed): the merged qkv weight's k rows are untouched, q and v rows moved.
    merged = merge_and_export_state_dict(model)
    dim = model.image_encoder.blocks[0].norm1.normalized_shape[0]
    for i in range(len(model.image_encoder.blocks)):
        key = f"image_encoder.blocks.{i}.attn.qkv.weight"
        old, new = base.state_dict()[key], merged[key]
        assert torch.equal(old[dim : 2 * dim], new[dim : 2 * dim])
        assert not torch.equal(old[:dim], new[:dim]) and not torch.equal(old[2 * dim :], new[2 * dim :])


def test_merged_lora_export_loads_in_official_package(tmp_path, gen):
    model = apply_finetune(_base_model(), lora=LoraConfig(rank=2, alpha=4.0, qkv_parts=("q", "k", "v")))
    batch = _batch(gen)
    _train(model, batch, steps=2)
    path = save_sam_checkpoint(merge_and_export_state_dict(model), tmp_path / "merged.pth")
    ref = build_official(sam_config("vit_t"), seed=1)
    ref.load_state_dict(torch.load(path, weights_only=True), strict=True)
    points = (batch["point_coords"][:1], batch["point_labels"][:1])
    with torch.no_grad():
        x = model.preprocess(batch["images"][:1])
        emb, emb_ref = model.encode(x), ref.image_encoder(x)
        assert torch.allclose(emb, emb_ref, atol=1e-4)
        low, low_ref = (
            m.mask_decoder(e, m.prompt_encoder.get_dense_pe(), *m.prompt_encoder(points, None, None), True)[0]
            for m, e in ((model, emb), (ref, emb_ref))
        )
    assert torch.allclose(low, low_ref, atol=1e-3)
    with pytest.raises(Exception, match="merge_and_export_state_dict"):  # unmerged LoRA keys are refused
        save_sam_checkpoint(model, tmp_path / "raw.pth")


def test_adapters_start_as_identity_and_train_alone(gen):
    base = _base_model().eval()
    model = apply_finetune(_base_model(), freeze=["prompt_encoder"], adapter=AdapterConfig(mlp_ratio=0.25)).eval()
    adapter_names = {n for n, _ in model.named_parameters() if "_adapter." in n}
    assert len(adapter_names) == 4 * 2 * len(model.image_encoder.blocks)  # down/up weight+bias, 2 per block
    # Base keys keep their official names: the base checkpoint still matches every non-adapter key.
    assert {n for n in model.state_dict() if "_adapter." not in n} == set(base.state_dict())
    batch = _batch(gen)
    with torch.no_grad():
        for a, b in zip(_outputs(model, batch), _outputs(base, batch), strict=True):
            assert torch.equal(a, b)
    before = _snapshot(model)
    _train(model, batch)
    changed = _changed(before, model)
    assert not {n for n in changed if n.startswith(("image_encoder", "prompt_encoder")) and n not in adapter_names}
    assert adapter_names <= changed
    assert any(n.startswith("mask_decoder") for n in changed)
    with pytest.raises(ValueError, match="include_adapters"):
        merge_and_export_state_dict(model)
    assert adapter_names <= set(merge_and_export_state_dict(model, include_adapters=True))


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="unknown SAM part 'decoder'"):
        apply_finetune(build_sam("vit_t"), freeze=["decoder"])
    with pytest.raises(ValueError, match="would also freeze"):
        apply_finetune(build_sam("vit_t"), freeze=["image_encoder"], lora=LoraConfig())
    with pytest.raises(ValueError, match="qkv_parts"):
        apply_finetune(build_sam("vit_t"), lora={"qkv_parts": ["q", "x"]})
    with pytest.raises(ValueError, match="nothing left to train"):
        apply_finetune(build_sam("vit_t"), freeze=["image_encoder", "prompt_encoder", "mask_decoder"])
