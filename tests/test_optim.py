"""Parameter groups (no-decay membership, layer decay) and warm-up schedules (exact lr values)."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from sam_train.finetune import LoraConfig, apply_finetune
from sam_train.models import build_sam
from sam_train.optim import param_groups, warmup_cosine_schedule, warmup_poly_schedule, warmup_step_schedule


def _by_name(groups):
    return {n: g for g in groups for n in g["param_names"]}


def test_no_decay_membership():
    model = build_sam("vit_t")
    groups = _by_name(param_groups(model, lr=1e-3, weight_decay=0.1))
    no_decay = {
        "image_encoder.pos_embed",
        "image_encoder.blocks.0.attn.rel_pos_h",
        "image_encoder.blocks.3.attn.rel_pos_w",
        "image_encoder.blocks.0.norm1.weight",
        "image_encoder.blocks.0.attn.qkv.bias",
        "image_encoder.neck.1.weight",  # LayerNorm2d
        "prompt_encoder.point_embeddings.2.weight",
        "prompt_encoder.not_a_point_embed.weight",
        "prompt_encoder.no_mask_embed.weight",
        "mask_decoder.iou_token.weight",
        "mask_decoder.mask_tokens.weight",
        "mask_decoder.transformer.norm_final_attn.weight",
    }
    decay = {
        "image_encoder.patch_embed.proj.weight",
        "image_encoder.blocks.0.attn.qkv.weight",
        "image_encoder.blocks.1.mlp.lin2.weight",
        "image_encoder.neck.2.weight",
        "prompt_encoder.mask_downscaling.0.weight",
        "mask_decoder.transformer.layers.0.self_attn.q_proj.weight",
        "mask_decoder.output_upscaling.0.weight",
        "mask_decoder.iou_prediction_head.layers.2.weight",
    }
    for name in no_decay:
        assert groups[name]["weight_decay"] == 0.0, name
    for name in decay:
        assert groups[name]["weight_decay"] == 0.1, name
    assert set(groups) == {n for n, _ in model.named_parameters()}  # every parameter exactly once
    assert sum(len(g["params"]) for g in param_groups(model, lr=1e-3, weight_decay=0.1)) == len(groups)


def test_layer_decay_scales():
    model = build_sam("vit_t")  # depth 4: embeddings layer 0, blocks 1..4, neck 5
    decay, lr = 0.6, 1e-3
    groups = _by_name(param_groups(model, lr=lr, weight_decay=0.1, layer_decay=decay))
    expected = {
        "image_encoder.patch_embed.proj.weight": 0.6**5,
        "image_encoder.pos_embed": 0.6**5,
        "image_encoder.blocks.0.attn.qkv.weight": 0.6**4,  # first block
        "image_encoder.blocks.3.mlp.lin1.weight": 0.6**1,  # last block
        "image_encoder.neck.0.weight": 1.0,
        "prompt_encoder.mask_downscaling.0.weight": 1.0,
        "mask_decoder.iou_token.weight": 1.0,
    }
    for name, scale in expected.items():
        assert groups[name]["lr"] == pytest.approx(lr * scale), name
        assert groups[name]["lr_scale"] == pytest.approx(scale), name


def test_only_trainable_parameters_and_lora_layer_ids():
    model = apply_finetune(build_sam("vit_t"), freeze=["prompt_encoder"], lora=LoraConfig(rank=2))
    groups = param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    names = _by_name(groups)
    assert set(names) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("prompt_encoder") for n in names)
    assert names["image_encoder.blocks.3.attn.qkv.lora_B.default.weight"]["lr"] == pytest.approx(0.5)
    assert names["image_encoder.blocks.0.attn.qkv.lora_A.default.weight"]["lr"] == pytest.approx(0.5**4)
    torch.optim.AdamW(groups)  # torch accepts the groups (param_names, lr_scale) as they are
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(build_sam("vit_t").requires_grad_(False), lr=1.0, weight_decay=0.0)


def _lrs(make, steps: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_step_schedule_values():
    lrs = _lrs(lambda o: warmup_step_schedule(o, warmup_steps=4, milestones=[10, 20], gamma=0.1), 25)
    assert lrs[0] == pytest.approx(2.0 * 1 / 4)
    assert lrs[2] == pytest.approx(2.0 * 3 / 4)
    assert lrs[3] == pytest.approx(2.0) and lrs[9] == pytest.approx(2.0)
    assert lrs[10] == pytest.approx(0.2) and lrs[19] == pytest.approx(0.2)
    assert lrs[20] == pytest.approx(0.02) and lrs[24] == pytest.approx(0.02)


def test_warmup_cosine_schedule_values():
    lrs = _lrs(lambda o: warmup_cosine_schedule(o, warmup_steps=2, total_steps=12, min_lr_ratio=0.1), 15)
    assert lrs[:2] == pytest.approx([1.0, 2.0])
    assert lrs[2] == pytest.approx(2.0)  # cosine starts at the peak
    assert lrs[7] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # half way: mean of peak and floor
    assert lrs[4] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2))))
    assert lrs[12] == pytest.approx(0.2) and lrs[14] == pytest.approx(0.2)


def test_warmup_poly_schedule_values():
    # SAMed: lr = base * (1 - (it - warmup) / (max_it - warmup)) ** 0.9 after warm-up.
    lrs = _lrs(lambda o: warmup_poly_schedule(o, warmup_steps=5, total_steps=25), 26)
    assert lrs[4] == pytest.approx(2.0)
    assert lrs[15] == pytest.approx(2.0 * 0.5**0.9)
    assert lrs[25] == pytest.approx(0.0)


def test_schedules_pickle_and_resume():
    for make in (
        lambda o: warmup_step_schedule(o, 3, [5]),
        lambda o: warmup_cosine_schedule(o, 3, 10),
        lambda o: warmup_poly_schedule(o, 3, 10),
    ):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make(opt)
        for _ in range(4):
            opt.step()
            sched.step()
        clone = pickle.loads(pickle.dumps(sched))  # would fail with closures / lambdas inside
        assert clone.lr_lambdas[0](6) == sched.lr_lambdas[0](6)
        opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        resumed = make(opt2)
        resumed.load_state_dict(pickle.loads(pickle.dumps(sched.state_dict())))
        assert resumed.get_last_lr() == sched.get_last_lr()
    with pytest.raises(ValueError, match="total_steps"):
        warmup_cosine_schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 10, 10)
