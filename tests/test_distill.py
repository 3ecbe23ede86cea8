"""Distillation pieces in process: the embedding loss and where its gradients go, cached vs on-the-fly
teacher targets, the student's shape check, SAMI's masked feature loss, the registered demo student."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from sam_train.data.sample import collate_sam
from sam_train.data.toy_shapes import ToyShapesDataset
from sam_train.data.transforms import SamTransform
from sam_train.distill import DistillDataModule, DistillModule, embedding_mse, masked_feature_mse, with_teacher_decoder
from sam_train.distill.models import check_compatible, embedding_shape, teacher_embeddings
from sam_train.errors import SamTrainError
from sam_train.models import build_sam
from sam_train.optim import param_groups


def teacher_and_student():
    torch.manual_seed(0)
    teacher = build_sam("vit_t")
    torch.manual_seed(1)
    student = with_teacher_decoder(build_sam("vit_t", encoder_depth=2), teacher)
    return teacher, student


def distill_module(student, teacher):
    return DistillModule(
        model=student, teacher=teacher, optimizer=partial(torch.optim.AdamW, lr=1e-3),
        param_groups=partial(param_groups, lr=1e-3, weight_decay=0.0),
    )


def toy_images(n=3, hflip_p=0.0):
    return ToyShapesDataset(n=n, size=64, seed=0, transform=SamTransform(256, hflip_p=hflip_p, max_objects=1))


def test_embedding_mse_is_the_mean_squared_error_and_detaches_the_target():
    student = torch.randn(2, 4, 3, 3, requires_grad=True)
    target = torch.randn(2, 4, 3, 3, requires_grad=True)
    loss = embedding_mse(student, target)
    assert torch.allclose(loss, ((student - target) ** 2).mean())
    loss.backward()
    assert student.grad is not None and target.grad is None
    with pytest.raises(ValueError, match="student"):
        embedding_mse(student, target[:, :2])


def test_embedding_loss_and_gradients_reach_only_the_student_encoder():
    teacher, student = teacher_and_student()
    module = distill_module(student, teacher)
    batch = collate_sam([toy_images()[i] for i in range(2)])
    loss = module.embedding_loss(batch)
    assert loss.item() > 0
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for part in (student.prompt_encoder, student.mask_decoder):  # the teacher's decoder, frozen in the student
        assert all(p.grad is None for p in part.parameters())
    grads = [p.grad for p in student.image_encoder.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    # the teacher is in no checkpoint: the module's state is the student SAM alone
    assert all(k.startswith("model.") for k in module.state_dict())
    assert len(module.state_dict()) == len(student.state_dict())
    # the optimiser sees the encoder only
    names = [n for g in module.param_groups_factory(student) for n in g["param_names"]]
    assert names and all(n.startswith("image_encoder.") for n in names)


def test_cached_teacher_and_on_the_fly_give_the_same_loss(tmp_path):
    teacher, student = teacher_and_student()
    dm = DistillDataModule(train=toy_images(6), batch_size=3, teacher_embeddings=tmp_path / "emb", cache=True,
                           cache_batch_size=4)  # other batches than training: the same targets anyway
    dm.teacher = teacher
    dm.prepare_data()
    assert sorted(p.name for p in (tmp_path / "emb").iterdir())[:2] == [".complete", "embeddings-000000.safetensors"]
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["teacher_embeddings"].shape == (3, *embedding_shape(teacher))
    assert torch.allclose(batch["teacher_embeddings"], teacher_embeddings(teacher, batch["images"]), atol=1e-5)
    cached = distill_module(student, None).embedding_loss(batch)
    fly = distill_module(student, teacher).embedding_loss({k: v for k, v in batch.items() if k != "teacher_embeddings"})
    assert torch.allclose(cached, fly, rtol=1e-5, atol=0), (cached, fly)


def test_cache_needs_a_deterministic_transform_and_the_ids_it_holds(tmp_path):
    teacher, _ = teacher_and_student()
    dm = DistillDataModule(train=toy_images(hflip_p=0.5), teacher_embeddings=tmp_path / "emb", cache=True)
    dm.teacher = teacher
    with pytest.raises(SamTrainError, match="hflip_p=0"):
        dm.prepare_data()
    dm = DistillDataModule(train=toy_images(2), teacher_embeddings=tmp_path / "emb2", cache=True)
    dm.teacher = teacher
    dm.prepare_data()
    other = DistillDataModule(train=ToyShapesDataset(n=3, size=64, seed=1, transform=SamTransform(256)),
                              teacher_embeddings=tmp_path / "emb2", batch_size=3)
    other.setup("fit")
    with pytest.raises(SamTrainError, match="toy_00002"):
        next(iter(other.train_dataloader()))


def test_student_must_have_the_teachers_embedding_shape():
    with pytest.raises(SamTrainError, match=r"student: embedding \[64, 16, 16\] at 256 px .* \[256, 64, 64\]"):
        check_compatible(build_sam("lite_medsam_tiny"), build_sam("vit_t"))


def test_masked_feature_mse_all_or_hidden_patches():
    pred, target = torch.zeros(1, 4, 2), torch.tensor([[[1.0, 1.0], [2.0, 2.0], [0.0, 0.0], [3.0, 3.0]]])
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    assert masked_feature_mse(pred, target, mask).item() == pytest.approx((1 + 4 + 0 + 9) / 4)
    assert masked_feature_mse(pred, target, mask, masked_only=True).item() == pytest.approx((1 + 9) / 2)


def test_sami_model_regresses_teacher_features_with_gradients_in_the_mae_only():
    from sam_train.distill.sami import SamiModel
    from sam_train.models.mae import build_mae

    teacher, _ = teacher_and_student()
    model = SamiModel(mae=build_mae("mae_vit_t"), teacher=teacher)
    imgs = torch.randn(2, 3, 128, 128)
    loss, pred, mask = model(imgs, generator=torch.Generator().manual_seed(0))
    assert pred.shape == (2, 64, 64) and mask.shape == (2, 64)  # 8 x 8 patches, the teacher's 64 channels
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert model.mae.decoder_pred.weight.grad is not None and model.mae.blocks[0].attn.qkv.weight.grad is not None
    assert "mae.pos_embed" in model.no_weight_decay()


def test_demo_student_is_a_drop_in_for_lite_medsam_at_a_fraction_of_the_flops(tmp_path):
    from torch.utils.flop_counter import FlopCounterMode

    from sam_train.models.checkpoint import save_sam_checkpoint

    teacher, student = build_sam("lite_medsam"), build_sam("lite_medsam_tiny")
    assert embedding_shape(student) == embedding_shape(teacher) == (256, 64, 64)
    assert student.pixel_norm == teacher.pixel_norm == "min_max"
    path = save_sam_checkpoint(with_teacher_decoder(student, teacher), tmp_path / "student.pth")
    loaded = build_sam("lite_medsam_tiny", checkpoint=path)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in loaded.state_dict().items())
    x = torch.zeros(1, 3, 256, 256)
    flops = {}
    for name, model in (("teacher", teacher), ("student", student)):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            out = model.image_encoder(x)
        flops[name] = counter.get_total_flops()
        assert out.shape == (1, 256, 64, 64)
    assert flops["teacher"] > 5 * flops["student"], flops
