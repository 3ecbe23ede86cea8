"""Checkpoint I/O: every supported layout round-trips; saved files load in the official package."""

from __future__ import annotations

import pytest
import torch
from official import build_official

from sam_train.models import build_sam, sam_config
from sam_train.models.checkpoint import (
    CheckpointError,
    guess_sam_size,
    load_sam_weights,
    load_state_dict_any,
    save_sam_checkpoint,
)


class NotAllowed:
    """A custom class: unpickling it would need arbitrary code, weights_only must refuse it."""

    def __init__(self) -> None:
        self.payload = 1


def _random_sd(seed: int = 0) -> dict[str, torch.Tensor]:
    """vit_t weights with every tensor random (a zero-init rel-pos table would hide a bad mapping)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) for k, v in build_sam("vit_t").state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    ("wrap", "expected"),
    [
        (lambda sd: sd, "official"),
        (lambda sd: {"model": sd, "optimizer": {"lr": 1e-4}, "epoch": 3}, "medsam"),
        (lambda sd: {f"module.{k}": v for k, v in sd.items()}, "ddp"),
        (
            lambda sd: {
                "state_dict": {**{f"net.{k}": v for k, v in sd.items()}, "loss_fn.pos_weight": torch.ones(1)},
                "epoch": 1,
                "pytorch-lightning_version": "2.5.0",
            },
            "lightning+prefix='net.'",
        ),
        (lambda sd: {"state_dict": {f"model.module.{k}": v for k, v in sd.items()}}, "lightning+ddp+prefix='model.'"),
    ],
    ids=["official", "medsam", "ddp", "lightning", "lightning_ddp"],
)
def test_layouts_round_trip(tmp_path, wrap, expected):
    sd = _random_sd()
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(sd), path)
    loaded, fmt = load_state_dict_any(path)
    assert fmt == expected
    _assert_same(sd, loaded)
    model = build_sam("vit_t")
    assert load_sam_weights(model, path) == expected
    _assert_same(sd, model.state_dict())


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_saved_checkpoint_loads_in_official_package(tmp_path, suffix):
    ours = build_sam("vit_t").eval()
    ours.load_state_dict(build_official(sam_config("vit_t"), seed=3).state_dict())  # realistic scales
    path = save_sam_checkpoint(ours, tmp_path / f"sam{suffix}")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the atomic write left no temp file
    if suffix == ".pth":
        sd = torch.load(path, weights_only=True)
    else:
        from safetensors.torch import load_file

        sd = load_file(path)
    ref = build_official(sam_config("vit_t"), seed=0)
    ref.load_state_dict(sd, strict=True)
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 192, 256), generator=gen).float()
    inp = [{"image": image, "original_size": (192, 256), "boxes": torch.tensor([[20.0, 30.0, 150.0, 160.0]])}]
    with torch.no_grad():
        a, b = ref(inp, multimask_output=True)[0], ours(inp, multimask_output=True)[0]
    assert torch.allclose(a["low_res_logits"], b["low_res_logits"], atol=1e-4)
    assert torch.allclose(a["iou_predictions"], b["iou_predictions"], atol=1e-4)
    assert load_state_dict_any(path)[1] == ("official" if suffix == ".pth" else "official+safetensors")


def _tiny_hf_sam():
    """A transformers SamModel with vit_t's dimensions and random (non-trivial) weights."""
    from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

    cfg = sam_config("vit_t")
    vision = SamVisionConfig(
        hidden_size=cfg.encoder_embed_dim,
        output_channels=cfg.prompt_embed_dim,
        num_hidden_layers=cfg.encoder_depth,
        num_attention_heads=cfg.encoder_num_heads,
        image_size=cfg.img_size,
        patch_size=cfg.patch_size,
        window_size=cfg.window_size,
        global_attn_indexes=list(cfg.encoder_global_attn_indexes),
        num_pos_feats=cfg.prompt_embed_dim // 2,
    )
    prompt = SamPromptEncoderConfig(
        hidden_size=cfg.prompt_embed_dim, image_size=cfg.img_size, mask_input_channels=cfg.mask_in_chans
    )
    decoder = SamMaskDecoderConfig(
        hidden_size=cfg.prompt_embed_dim,
        mlp_dim=cfg.decoder_mlp_dim,
        num_attention_heads=cfg.decoder_num_heads,
        num_hidden_layers=cfg.decoder_depth,
        iou_head_hidden_dim=256,
    )
    torch.manual_seed(0)
    model = SamModel(SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder))
    with torch.no_grad():  # HF initialises rel-pos / pos tables to zero and norms to 1: randomise everything
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_hugging_face_layout(tmp_path):
    hf = _tiny_hf_sam()
    hf.save_pretrained(tmp_path / "hf")  # writes model.safetensors, the file HF ships
    sd, fmt = load_state_dict_any(tmp_path / "hf" / "model.safetensors")
    assert fmt == "hf+safetensors"
    ours = build_sam("vit_t").eval()
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in ours.state_dict().items()}
    assert load_sam_weights(ours, tmp_path / "hf") == "hf+safetensors"  # the model directory works too
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 256, 256, generator=gen)
    points = torch.tensor([[[[30.0, 40.0], [100.0, 120.0]]]])
    labels = torch.tensor([[[1, 0]]])
    with torch.no_grad():
        emb_hf, emb = hf.get_image_embeddings(x), ours.image_encoder(x)
        out_hf = hf(image_embeddings=emb_hf, input_points=points, input_labels=labels, multimask_output=True)
        sparse, dense = ours.prompt_encoder(points=(points[0], labels[0]), boxes=None, masks=None)
        masks, iou = ours.mask_decoder(emb, ours.prompt_encoder.get_dense_pe(), sparse, dense, True)
    assert torch.allclose(emb_hf, emb, atol=1e-4)
    assert torch.allclose(out_hf.pred_masks[0], masks, atol=1e-4)
    assert torch.allclose(out_hf.iou_scores[0], iou, atol=1e-4)


def test_safetensors_round_trip(tmp_path):
    sd = _random_sd(2)
    path = save_sam_checkpoint({f"module.{k}": v for k, v in sd.items()}, tmp_path / "w.safetensors")
    loaded, fmt = load_state_dict_any(path)
    assert fmt == "official+safetensors"
    _assert_same(sd, loaded)


def test_partial_checkpoint_error_names_file_keys_and_size(tmp_path):
    sd = _random_sd()
    del sd["mask_decoder.iou_token.weight"]
    sd["image_encoder.neck.0.weight"] = torch.zeros(32, 96, 1, 1)
    sd["image_encoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_sam_weights(build_sam("vit_t"), path)
    msg = str(err.value)
    assert str(path) in msg
    assert "missing 1 key(s): mask_decoder.iou_token.weight" in msg
    assert "unexpected 1 key(s): image_encoder.extra.weight" in msg
    assert "image_encoder.neck.0.weight (32, 96, 1, 1) vs model (64, 96, 1, 1)" in msg


def test_wrong_size_error_says_which_size(tmp_path):
    with torch.device("meta"):
        vit_b = build_sam("vit_b").state_dict()
    # Expanded scalars: vit_b's shapes without writing 375 MB (torch.save stores the 1-element storage).
    sd = {k: torch.zeros(()).expand(v.shape) for k, v in vit_b.items()}
    path = tmp_path / "sam_vit_b.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"(?s)sam_vit_b\.pth.*looks like vit_b .*the model is vit_t"):
        build_sam("vit_t", checkpoint=path)


def test_guess_sam_size():
    for name in ("vit_t", "vit_b", "vit_l", "vit_h"):
        with torch.device("meta"):
            sd = build_sam(name).state_dict()
        assert guess_sam_size(sd) == name
    with torch.device("meta"):
        assert guess_sam_size(build_sam("vit_t", img_size=512).state_dict()) == "vit_t"  # other resolution
        assert guess_sam_size(build_sam("vit_t", encoder_depth=5).state_dict()) is None


def test_pickle_needing_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": _random_sd(), "config": NotAllowed()}, path)
    with pytest.raises(CheckpointError, match=r"(?s)evil\.pth.*arbitrary code.*weights_only=True"):
        load_state_dict_any(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    torch.save({"lr": torch.tensor(1.0)}, path)
    with pytest.raises(CheckpointError, match=r"notes\.pth: no SAM weights found"):
        load_state_dict_any(path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_state_dict_any(tmp_path / "missing.pth")
