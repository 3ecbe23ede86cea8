"""`sam-train embed` + EmbeddingDataset: cached embeddings equal `Sam.encode`, decoder-only fit never encodes."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from sam_train import cli
from sam_train.data.embeddings import EmbeddingDataModule, EmbeddingDataset, collate_embeddings
from sam_train.data.sample import DataError, collate_sam
from sam_train.data.toy_shapes import ToyShapesDataset
from sam_train.data.transforms import SamTransform
from sam_train.embed import embed_dataset
from sam_train.models.image_encoder import ImageEncoderViT


@pytest.fixture
def toy():
    return ToyShapesDataset(n=5, size=48, seed=3, max_objects=3, transform=SamTransform(256))


@pytest.mark.parametrize(("dtype", "atol"), [("fp32", 1e-5), ("fp16", 2e-3)])
def test_shards_hold_encode_output_and_masks(tiny_sam, toy, tmp_path, dtype, atol):
    paths = embed_dataset(tiny_sam, toy, tmp_path, batch_size=3, shard_size=2, dtype=dtype, progress=False)
    assert [p.name for p in paths] == [f"embeddings-00000{i}.safetensors" for i in range(3)]  # 2 + 2 + 1 images
    ds = EmbeddingDataset(root=tmp_path, img_size=256)
    assert len(ds) == 5
    samples = [toy[i] for i in range(5)]
    ref = collate_sam(samples)
    with torch.no_grad():
        expected = tiny_sam.encode(tiny_sam.preprocess(ref["images"]))
    batch = collate_embeddings([ds[i] for i in range(5)])
    assert batch["embeddings"].dtype == torch.float32
    torch.testing.assert_close(batch["embeddings"], expected, atol=atol, rtol=atol)
    assert set(batch) == set(ref) - {"images"} | {"embeddings"}
    for key in ("masks", "image_ids", "input_sizes", "original_sizes", "class_ids"):
        assert torch.equal(batch[key], ref[key]), key
    assert batch["ids"] == ref["ids"] and batch["meta"] == ref["meta"]


def test_max_objects_subsamples_and_errors(tiny_sam, toy, tmp_path):
    embed_dataset(tiny_sam, toy, tmp_path / "e", batch_size=5, dtype="bf16", progress=False)
    full = EmbeddingDataset(root=tmp_path / "e")
    one = EmbeddingDataset(root=tmp_path / "e", max_objects=1, dtype=None)
    for i in range(len(full)):
        masks = one[i]["masks"]
        assert masks.shape[0] == 1 and one[i]["embedding"].dtype == torch.bfloat16
        assert any(torch.equal(masks[0], m) for m in full[i]["masks"])  # a subset of the stored masks
    with pytest.raises(DataError, match="img_size=256, but the model expects img_size=1024"):
        EmbeddingDataset(root=tmp_path / "e", img_size=1024)
    with pytest.raises(DataError, match="run `sam-train embed` first"):
        EmbeddingDataset(root=tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "embeddings-000000.safetensors").write_bytes(b"not a shard")
    with pytest.raises(DataError, match="unreadable embedding shard"):
        EmbeddingDataset(root=tmp_path / "bad")


def test_embed_command_then_decoder_only_fit_never_encodes(tmp_path, monkeypatch):
    root = tmp_path / "data"
    cli.main(["embed", f"data_root={root}", "data.train.n=4", "data.val.n=2", "batch_size=4", "progress=false"])
    assert len(EmbeddingDataset(root=root / "embeddings" / "train")) == 4

    calls = []
    monkeypatch.setattr(ImageEncoderViT, "forward", lambda self, x: calls.append(x.shape) or 1 / 0)
    from sam_train.commands.fit import fit

    with initialize_config_dir(str(cli.CONFIG_DIR), version_base="1.3"):
        cfg = compose("fit", overrides=[
            "data=embeddings", f"data_root={root}", f"run_dir={tmp_path / 'run'}", "trainer=cpu",
            "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
            "trainer.enable_progress_bar=false", "data.batch_size=2", "optim.scheduler.warmup_steps=1",
            "prompts.num_iterations=3", "module.report_iterations=[1,3]", "logger=csv",
        ])
    assert cfg.finetune.freeze == ["image_encoder"]  # data=embeddings selects decoder-only fine-tuning
    metrics = fit(cfg)
    assert calls == []
    assert torch.isfinite(torch.tensor(metrics["train/loss"])) and "val/iou" in metrics
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_embeddings_datamodule_collates_decoder_only_batches(tiny_sam, toy, tmp_path):
    embed_dataset(tiny_sam, toy, tmp_path, batch_size=5, progress=False)
    dm = EmbeddingDataModule(root=tmp_path, train=EmbeddingDataset(root=tmp_path), batch_size=2)
    batch = next(iter(dm.train_dataloader()))
    assert "images" not in batch and batch["embeddings"].shape == (2, 64, 16, 16)
    assert batch["masks"].shape[0] == batch["image_ids"].shape[0] == batch["class_ids"].shape[0]
