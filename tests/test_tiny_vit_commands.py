"""Every command that takes a model works with the TinyViT family: lite_medsam (real LiteMedSAM weights, at
64 px so the tests are fast) and mobile_sam (at 256 px): fit with each fine-tuning strategy, embed +
decoder-only fit, eval, the predictor, automatic masks, ONNX export, autolabel, the annotation server and
the data engine."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from sam_train.data.image_io import encode_image
from sam_train.data.toy_shapes import make_toy_shapes
from sam_train.models import build_sam
from sam_train.models.checkpoint import load_state_dict_any

ROOT = Path(__file__).resolve().parent.parent
LITE = ["model=lite_medsam", "model.img_size=64"]
MOBILE = ["model=mobile_sam", "model.img_size=256"]
FIT = ["data=toy_shapes", "data.train.n=4", "data.val.n=2", "data.batch_size=2", "trainer=cpu",
       "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
       "trainer.enable_progress_bar=false", "optim.scheduler.warmup_steps=1", "prompts.num_iterations=3",
       "module.report_iterations=[1,3]", "~evaluate"]


def sam_train(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("sam-train")
    out = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _image_dir(tmp_path: Path, n: int = 2) -> Path:
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for s in make_toy_shapes(n, 64, torch.Generator().manual_seed(0)):
        (folder / f"{s['id']}.png").write_bytes(encode_image(s["image"]))
    return folder


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_state_dict_any(run / "checkpoints" / "last.ckpt")[0]


@pytest.mark.slow
def test_fit_every_strategy_with_lite_medsam(tmp_path):
    """full (with layer decay), frozen parts (MedSAM), LoRA, adapters: one sweep through the real CLI."""
    sweep = tmp_path / "sweep"
    sam_train("fit", "-m", *LITE, *FIT, "finetune=full,medsam,lora,adapter", "optim.param_groups.layer_decay=0.8",
              f"hydra.sweep.dir={sweep}", f"data_root={tmp_path / 'data'}")
    bundled = build_sam("lite_medsam", pretrained=True).state_dict()
    for job, strategy in enumerate(("full", "medsam", "lora", "adapter")):
        sd = _weights(sweep / str(job))
        # every run started from the real weights and changed what its strategy trains
        moved = {k for k, v in bundled.items() if k in sd and not torch.equal(v, sd[k])}
        assert moved, strategy
        if strategy == "medsam":  # prompt encoder frozen
            assert not any(k.startswith("prompt_encoder.") for k in moved)
        if strategy in ("lora", "adapter"):
            assert not any(k.startswith("image_encoder.") for k in moved)
            assert any((".lora_" in k) or ("_adapter." in k) for k in sd)
        # BatchNorm statistics stay frozen by default
        assert all(torch.equal(bundled[k], sd[k]) for k in bundled if "running_" in k), strategy


@pytest.mark.slow
def test_embed_then_decoder_only_fit_and_eval_with_lite_medsam(tmp_path):
    data = tmp_path / "data"
    sam_train("embed", *LITE, "data=toy_shapes", "data.train.n=3", "data.val.n=2", f"data_root={data}",
              "progress=false", "dtype=fp32")
    from sam_train.data.embeddings import EmbeddingDataset

    cached = EmbeddingDataset(root=data / "embeddings" / "train", img_size=64)
    assert len(cached) == 3
    sample = cached[0]
    model = build_sam("lite_medsam", pretrained=True, img_size=64).eval()
    image = make_toy_shapes(3, 64, torch.Generator().manual_seed(0))[0]["image"]
    with torch.no_grad():  # the cache holds what the real encoder computes
        emb = model.encode(model.preprocess(image[None].float()))
    assert sample["embedding"].shape == emb.shape[1:] == (256, 16, 16)
    run = tmp_path / "run"
    no_data = [o for o in FIT if not o.startswith("data")]
    sam_train("fit", *LITE, *no_data, "data=embeddings", f"data_root={data}", f"run_dir={run}", "data.batch_size=2")
    sd = _weights(run)
    bundled = model.state_dict()
    assert all(torch.equal(bundled[k], sd[k]) for k in bundled if k.startswith("image_encoder."))
    assert any(not torch.equal(bundled[k], sd[k]) for k in bundled if k.startswith("mask_decoder."))
    out = sam_train("eval", *LITE, f"checkpoint={run / 'checkpoints' / 'last.ckpt'}", f"run_dir={tmp_path / 'ev'}",
                    "data.val.n=2", "data.batch_size=2", "clicks.max_clicks=2", "num_overlays=1",
                    f"data_root={data}")
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics and "box" in out.stdout.lower()


@pytest.mark.slow
@pytest.mark.parametrize("model_args", [LITE, MOBILE], ids=["lite_medsam", "mobile_sam"])
def test_eval_and_onnx_export(model_args, tmp_path):
    import onnxruntime as ort

    name, size = model_args[0].split("=")[1], int(model_args[1].split("=")[1])
    torch.manual_seed(0)
    ckpt = tmp_path / "weights.safetensors"
    from sam_train.models.checkpoint import save_sam_checkpoint

    model = build_sam(name, img_size=size, **({"pretrained": True} if name == "lite_medsam" else {})).eval()
    save_sam_checkpoint(model, ckpt)
    sam_train("eval", *model_args, f"checkpoint={ckpt}", f"run_dir={tmp_path / 'ev'}", "data.val.n=2",
              "data.batch_size=2", "clicks.max_clicks=2", "num_overlays=1", f"data_root={tmp_path / 'data'}")
    assert (tmp_path / "ev" / "metrics.json").is_file()
    onnx = tmp_path / "decoder.onnx"
    sam_train("export", "onnx", *model_args, f"checkpoint={ckpt}", f"out={onnx}")
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    grid = size // 4 // (1 if name == "lite_medsam" else 4)
    emb = torch.randn(1, 256, grid, grid, generator=torch.Generator().manual_seed(1))
    coords = torch.tensor([[[10.0, 12.0], [40.0, 50.0]]]) * size / 64
    labels = torch.tensor([[2.0, 3.0]])
    feeds = {"image_embeddings": emb.numpy(), "point_coords": coords.numpy(), "point_labels": labels.numpy(),
             "mask_input": np.zeros((1, 1, 4 * grid, 4 * grid), np.float32), "has_mask_input": np.zeros(1, np.float32),
             "orig_im_size": np.array([size, size], np.float32)}
    masks, scores, low_res = session.run(None, {k: v for k, v in feeds.items()
                                                 if k in {i.name for i in session.get_inputs()}})
    with torch.no_grad():
        ref_low, ref_iou = model.decode(emb, torch.tensor([0]), coords, labels.long())
    torch.testing.assert_close(torch.from_numpy(low_res), ref_low, rtol=1e-3, atol=1e-3)  # all 4 mask tokens
    torch.testing.assert_close(torch.from_numpy(scores), ref_iou, rtol=1e-3, atol=1e-3)


def test_predictor_and_automatic_masks_with_lite_medsam(tmp_path):
    from sam_train.inference.amg import AutomaticMaskGenerator
    from sam_train.inference.predictor import SamPredictor

    model = build_sam("lite_medsam", pretrained=True, img_size=64).eval()
    sample = make_toy_shapes(1, 64, torch.Generator().manual_seed(2), max_objects=2)[0]
    image = sample["image"].permute(1, 2, 0).numpy()
    predictor = SamPredictor(model)
    predictor.set_image(image)
    mask = sample["masks"][0].numpy()
    ys, xs = np.nonzero(mask)
    masks, scores, low = predictor.predict(boxes=np.array([[xs.min(), ys.min(), xs.max(), ys.max()]]),
                                           multimask_output=False)
    assert masks.shape == (1, 1, 64, 64) and torch.isfinite(scores).all()
    # the real weights segment a shape from its tight box far better than chance
    pred = masks[0, 0].numpy()
    assert 2 * (pred & mask).sum() / (pred.sum() + mask.sum()) > 0.5
    records = AutomaticMaskGenerator(model, points_per_side=4, pred_iou_thresh=0,
                                     stability_score_thresh=0).generate(sample["image"])
    assert records and all(r["segmentation"].shape == (64, 64) for r in records)


@pytest.mark.slow
def test_autolabel_annotate_and_engine_with_lite_medsam(tmp_path):
    from sam_train.engine.annotate import AnnotationServer, AnnotationSession

    images = _image_dir(tmp_path)
    sam_train("autolabel", *LITE, f"source={images}", f"out_dir={tmp_path / 'auto'}",
              "generator.points_per_side=3", "generator.pred_iou_thresh=0", "generator.stability_score_thresh=0")
    stats = json.loads((tmp_path / "auto" / "stats.json").read_text())
    assert stats

    model = build_sam("lite_medsam", pretrained=True, img_size=64)
    server = AnnotationServer(AnnotationSession(model, images, tmp_path / "ann.json")).start()
    try:
        req = urllib.request.Request(server.url + "api/predict",
                                     json.dumps({"image": 0, "points": [[20, 20]], "labels": [1]}).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as res:
            body = json.loads(res.read())
        assert res.status == 200 and body
    finally:
        server.stop()

    sam_train("engine", "recipe=data_engine_demo", *LITE, f"run_dir={tmp_path / 'engine'}",
              "engine.rounds=1", "trainer.max_steps=2", "trainer.val_check_interval=2",
              "optim.scheduler.warmup_steps=1", "trainer.enable_progress_bar=false", "data.train.n=4",
              "data.val.n=2", "data.batch_size=2", "engine.pool.n=2", "engine.autolabel.points_per_side=3",
              f"data_root={tmp_path / 'data'}")
    rounds = json.loads((tmp_path / "engine" / "engine_rounds.json").read_text())
    assert rounds and Path(rounds[0]["weights"]).is_file()
    assert load_state_dict_any(rounds[0]["weights"])[0]["image_encoder.patch_embed.seq.0.c.weight"].shape[-1] == 1


def test_annotate_and_autolabel_default_to_real_lite_medsam():
    from hydra import compose, initialize_config_dir

    from sam_train.cli import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        for command in ("annotate", "autolabel"):
            cfg = compose(command, overrides=["source=x", "out_dir=y"] if command == "autolabel" else [])
            assert cfg.model.name == "lite_medsam" and cfg.model.pretrained, command


@pytest.mark.slow
def test_zero_shot_lite_medsam_on_the_demo_cases(tmp_path):
    """The real weights, no training: held-out box Dice above 0, predictions written (README has the number)."""
    run = tmp_path / "zs"
    out = sam_train("eval", "model=lite_medsam", "data=mni_demo", "evaluate@_global_=default", f"run_dir={run}",
                    f"data_root={tmp_path / 'data'}", "max_batches=2", "num_overlays=1")
    metrics = json.loads((run / "metrics.json").read_text())
    box = [v for k, v in metrics["summary"].items() if k.endswith("box/dice")]
    assert box and min(box) > 0.0, metrics["summary"]
    assert "box dice" in out.stdout
    assert list((run / "predictions").glob("*.nii.gz"))
