"""A tiny MAE learns on real photographs (scikit-image), in one process and in 2-process CPU DDP."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import webdataset as wds
from PIL import Image
from skimage import data as skdata
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import ConcatDataset, DataLoader
from torchvision.transforms import v2

from sam_train.data.image_only import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderDataset,
    ImageOnlyDataModule,
    image_webdataset,
    mae_train_transform,
)
from sam_train.data.sample import DataError
from sam_train.export.mae_to_sam import export_mae_to_sam
from sam_train.lit.mae_module import MaeModule
from sam_train.models import build_sam
from sam_train.models.mae import MaskedAutoencoderViT, build_mae

# 64 px, patch 8 (64 patches, 16 visible), width 64, depth 2: ~200 CPU steps of a few ms each.
TINY = dict(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=64, decoder_depth=1)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "camera",
          "coins", "moon", "clock", "brick", "colorwheel")  # fmt: skip
STEPS = 200
BASE_LR = 0.032  # x 16 images / 256 = lr 2e-3 (a tiny model learns fast at a higher lr than MAE's ViTs)


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    """Real photographs shrunk to <= 160 px, so 64 px crops hold edges and texture, in sub-folders."""
    root = tmp_path_factory.mktemp("photos")
    for i, name in enumerate(PHOTOS):
        im = Image.fromarray(getattr(skdata, name)()).convert("RGB")
        im.thumbnail((160, 160))
        (root / f"part{i % 2}").mkdir(exist_ok=True)
        im.save(root / f"part{i % 2}" / f"{name}.png")
    return root


def eval_batch(root: Path) -> torch.Tensor:
    """Deterministic centre crops of every photo, [12, 3, 64, 64] normalised."""
    tf = v2.Compose(
        [
            v2.Resize(64),
            v2.CenterCrop(64),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    return torch.stack([tf(img) for img in ImageFolderDataset(root)])


def eval_loss(model: MaskedAutoencoderViT, imgs: torch.Tensor) -> float:
    """Masked-patch loss on fixed images with fixed masks (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = model(imgs, generator=torch.Generator().manual_seed(7))[0].item()
    model.train(was_training)
    return loss


def test_dataset_yields_normalised_crops(photo_dir):
    ds = ImageFolderDataset(photo_dir, transform=mae_train_transform(64))
    assert len(ds) == len(PHOTOS)
    x = ds[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert -2.2 < x.min() < x.max() < 2.7  # ImageNet-normalised range of [0, 1] pixels


def test_webdataset_shards_and_datamodule(photo_dir, tmp_path):
    files = sorted(photo_dir.rglob("*.png"))
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / f"shard-{shard}.tar")) as sink:
            for f in files[shard::2]:
                sink.write({"__key__": f.stem, "png": f.read_bytes()})
    urls = str(tmp_path / "shard-{0..1}.tar")
    images = list(image_webdataset(urls, transform=mae_train_transform(64), shuffle_buffer=4))
    assert len(images) == len(files) and all(x.shape == (3, 64, 64) for x in images)
    assert len(list(image_webdataset(urls, resampled=True, epoch_length=30))) == 30  # endless shards, fixed epoch
    with wds.TarWriter(str(tmp_path / "bad.tar")) as sink:
        sink.write({"__key__": "notes", "txt": b"no image here"})
    with pytest.raises(DataError, match=r"bad.tar:notes: no image member"):
        list(image_webdataset(str(tmp_path / "bad.tar")))

    dm = ImageOnlyDataModule(root=str(photo_dir), img_size=64, batch_size=4, num_workers=0)
    assert next(iter(dm.train_dataloader())).shape == (4, 3, 64, 64)
    dm = ImageOnlyDataModule(shards=urls, img_size=64, batch_size=4, num_workers=0, epoch_length=8)
    assert [b.shape[0] for b in dm.train_dataloader()] == [4, 4]
    with pytest.raises(ValueError, match="exactly one"):
        ImageOnlyDataModule(root=str(photo_dir), shards=urls)


def test_single_process_training_reduces_loss(photo_dir, tmp_path):
    torch.manual_seed(0)
    model = build_mae("mae_vit_t", **TINY)
    imgs = eval_batch(photo_dir)
    before = eval_loss(model, imgs)
    module = MaeModule(model=model, base_lr=BASE_LR, warmup_steps=20, image_log_every_n_steps=100, num_log_images=4)
    train = ConcatDataset([ImageFolderDataset(photo_dir, transform=mae_train_transform(64))] * 300)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=STEPS,
        logger=pl.loggers.TensorBoardLogger(tmp_path, name="tb", version=""),
        log_every_n_steps=50,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(train, batch_size=16, shuffle=True, drop_last=True))
    after = eval_loss(model, imgs)
    assert module.effective_batch_size() == 16 and module.scaled_lr == pytest.approx(2e-3)
    assert before > 1.0 and after < 0.8 and after < 0.65 * before, (before, after)

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0}).Reload()
    recon = events.Images("train/reconstruction")
    assert [e.step for e in recon] == [0, 100]
    assert (recon[0].width, recon[0].height) == (4 * 66 + 2, 3 * 66 + 2)  # 4 images x (original, masked, recon)
    assert len(events.Scalars("train/loss")) == STEPS // 50

    # the Lightning checkpoint (read weights-only) exports into a SAM of the same encoder shape
    (ckpt,) = (tmp_path / "tb" / "checkpoints").glob("*.ckpt")
    sam_size = dict(patch_size=8, encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4)
    sam_size.update(encoder_global_attn_indexes=(1,), window_size=4)
    out = export_mae_to_sam(ckpt, tmp_path / "sam_init.safetensors", "vit_t", img_size=128, **sam_size)
    sam = build_sam("vit_t", checkpoint=out, img_size=128, **sam_size)
    assert torch.equal(sam.image_encoder.blocks[1].mlp.lin2.weight, model.blocks[1].mlp.lin2.weight)


DDP_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import lightning.pytorch as pl
    import torch
    from torch.utils.data import ConcatDataset, DataLoader

    sys.path.insert(0, sys.argv[3])
    from test_mae_training import BASE_LR, STEPS, TINY, eval_batch, eval_loss
    from sam_train.data.image_only import ImageFolderDataset, mae_train_transform
    from sam_train.lit.mae_module import MaeModule
    from sam_train.models.mae import build_mae

    torch.set_num_threads(1)
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    pl.seed_everything(0, verbose=False)
    model = build_mae("mae_vit_t", **TINY)
    imgs = eval_batch(root)
    before = eval_loss(model, imgs)
    module = MaeModule(model=model, base_lr=BASE_LR, warmup_steps=20, image_log_every_n_steps=0)
    train = ConcatDataset([ImageFolderDataset(root, transform=mae_train_transform(64))] * 300)
    trainer = pl.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_steps=STEPS, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(train, batch_size=8, shuffle=True, drop_last=True))
    torch.save(
        {"before": before, "after": eval_loss(model, imgs), "lr": module.scaled_lr,
         "effective_batch": module.effective_batch_size(), "state_dict": model.state_dict()},
        out / f"rank{trainer.global_rank}.pt",
    )
    """
)


def test_ddp_two_process_training_reduces_loss_and_keeps_ranks_in_sync(photo_dir, tmp_path):
    script = tmp_path / "mae_ddp.py"
    script.write_text(DDP_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(photo_dir), str(tmp_path), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for res in ranks:
        # 2 ranks x 8 images -> effective batch 16 -> the same lr as the single-process run
        assert res["effective_batch"] == 16 and res["lr"] == pytest.approx(2e-3)
        assert res["before"] > 1.0 and res["after"] < 0.8 and res["after"] < 0.65 * res["before"], res
    sd0, sd1 = ranks[0]["state_dict"], ranks[1]["state_dict"]
    assert sd0.keys() == sd1.keys()
    for key in sd0:
        assert torch.equal(sd0[key], sd1[key]), key
