"""Evaluation runner (sam_train.eval.loop / volumes): filled-box Dice against a numpy computation, the
attack path at eps = 0, and the 3D reassembly + NIfTI geometry with ground-truth predictions."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from sam_train.commands.eval import evaluate_after_fit, load_eval_model
from sam_train.data.datamodule import SamDataModule
from sam_train.data.medical import MedicalSliceDataset
from sam_train.data.mni import prepare_mni_demo
from sam_train.data.toy_shapes import ToyShapesDataset
from sam_train.data.transforms import SamTransform
from sam_train.eval.loop import run_evaluation
from sam_train.eval.saving import load_label_volume, read_geometry
from sam_train.eval.volumes import VolumeCollector
from sam_train.models.checkpoint import save_sam_checkpoint


def toy_datamodule(n: int = 4) -> SamDataModule:
    val = ToyShapesDataset(n=n, size=40, seed=3, transform=SamTransform(256))
    return SamDataModule(train=None, val=val, batch_size=2)


def numpy_filled_box_dice(dataset) -> float:
    """Dice of the filled tight box per (image, class), summed over the image's objects, averaged."""
    sums = defaultdict(lambda: np.zeros(3))
    for i in range(len(dataset)):
        sample = dataset[i]
        for mask, cls in zip(sample["masks"].numpy(), sample["class_ids"].tolist(), strict=True):
            ys, xs = np.nonzero(mask)
            box = np.zeros_like(mask)
            box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
            sums[(sample["id"], cls)] += [(box & mask).sum(), box.sum(), mask.sum()]
    return float(np.mean([2 * i / (p + g) for i, p, g in sums.values()]))


def test_evaluate_after_fit_filled_box_matches_numpy(tiny_sam, tmp_path):
    dm = toy_datamodule()
    cfg = OmegaConf.create(
        {
            "seed": 0,
            "evaluate": {
                "modes": ["box", "filled_box"],
                "num_overlays": 3,
                "device": "cpu",
                "volumes": {"enabled": True},
            },
        }
    )
    flat = evaluate_after_fit(cfg, tiny_sam, dm, tmp_path)
    assert set(flat) == {"eval/box/dice", "eval/box/iou", "eval/filled_box/dice", "eval/filled_box/iou"}
    assert abs(flat["eval/filled_box/dice"] - numpy_filled_box_dice(dm.val)) < 1e-9
    assert 0.0 <= flat["eval/box/dice"] <= 1.0
    assert flat["eval/box/iou"] <= flat["eval/box/dice"] + 1e-12  # IoU <= Dice for every case
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["summary"] == flat
    assert metrics["num_images"] == 4
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 3
    assert not (tmp_path / "predictions").exists()  # toy data: no volumes, no 2D prediction format asked


def test_attack_with_eps_zero_reports_clean_equal_attacked(tiny_sam, tmp_path):
    opts = {
        "modes": ["filled_box"],
        "num_overlays": 0,
        "seed": 0,
        "attack": {"eps": [0.0], "steps": 1, "max_images": 2, "prompts": ["point", "box"]},
    }
    result = run_evaluation(tiny_sam, toy_datamodule(2).val_dataloader(), opts, tmp_path)
    attack = result["attack"]
    assert attack["num_objects"] > 0
    for prompt in ("point", "box"):
        assert attack["clean"][prompt] == attack["attacked"][0.0][prompt]
        assert (
            result["summary"][f"eval/attack/clean/{prompt}/iou"] == result["summary"][f"eval/attack/eps=0/{prompt}/iou"]
        )
    assert attack["embedding_distance"][0.0] == 0.0


def test_volumes_of_ground_truth_slices_are_exact_with_image_geometry(tmp_path):
    root = prepare_mni_demo(tmp_path / "mni", n_cases=6)
    dataset = MedicalSliceDataset(root, subset="val", val_fraction=0.34, min_area=0)
    collector = VolumeCollector.for_dataset(dataset)
    for i in range(len(dataset)):
        sample = dataset[i]
        collector.add(sample, sample["masks"], sample["class_ids"])
    result = collector.finish(tmp_path / "run", {"save": True, "metrics": ["dice", "hd95"]})
    assert result["incomplete_cases"] == []
    assert sorted(result["files"]) == dataset.case_ids
    for case in dataset.cases:
        pred, geometry = load_label_volume(result["files"][case.case_id])
        gt, _ = load_label_volume(case.label)
        assert np.array_equal(pred, gt)
        assert geometry.allclose(read_geometry(case.images[0]))
    for name in ("grey matter", "white matter"):
        assert result["summary"]["per_class"][name]["dice"]["mean"] == 1.0
        assert result["summary"]["per_class"][name]["hd95"]["mean"] == 0.0


def test_volumes_skip_cases_with_unpredicted_slices(tmp_path):
    root = prepare_mni_demo(tmp_path / "mni", n_cases=6)
    dataset = MedicalSliceDataset(root, subset="val", val_fraction=0.34, min_area=0)
    collector = VolumeCollector.for_dataset(dataset)
    sample = dataset[0]  # one slice of the first case only
    collector.add(sample, sample["masks"], sample["class_ids"])
    result = collector.finish(tmp_path / "run", {"save": True})
    assert result["incomplete_cases"] == [sample["case_id"]]
    assert result["files"] == {} and result["per_case"] == {}
    assert VolumeCollector.for_dataset(toy_datamodule(1).val) is None
    assert torch.is_tensor(sample["masks"])


def test_load_eval_model_reads_official_and_lightning_layouts(tiny_sam, tmp_path):
    official = save_sam_checkpoint(tiny_sam, tmp_path / "tiny.pth")
    lightning = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in tiny_sam.state_dict().items()}, "epoch": 0}, lightning)
    model_cfg = {"_target_": "sam_train.models.build_sam", "name": "vit_t", "checkpoint": None}
    for path in (official, lightning):
        model = load_eval_model(OmegaConf.create({"checkpoint": str(path), "model": model_cfg, "finetune": None}))
        loaded, expected = model.state_dict(), tiny_sam.state_dict()
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_evaluate_yaml_mirrors_eval_config_defaults():
    """The defaults live in EvalConfig; configs/evaluate/default.yaml repeats them for the CLI."""
    from sam_train.cli import CONFIG_DIR
    from sam_train.eval.config import EvalConfig, as_dict

    yaml = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "evaluate" / "default.yaml"))
    defaults = as_dict(EvalConfig())
    defaults.pop("seed")  # the command's seed, not an evaluate option
    assert yaml == defaults


def test_box_prompts_are_decoded_once_per_batch(tiny_sam, tmp_path):
    """Prompted box Dice, the original-size predictions and the overlays share one box decode per batch."""
    calls = []
    decode = tiny_sam.decode

    def counting_decode(*args, **kwargs):
        calls.append(1)
        return decode(*args, **kwargs)

    tiny_sam.decode = counting_decode
    try:
        opts = {"modes": ["box", "filled_box"], "num_overlays": 1, "predictions": {"format": "png"}}
        result = run_evaluation(tiny_sam, toy_datamodule(2).val_dataloader(), opts, tmp_path)
    finally:
        del tiny_sam.decode
    assert len(calls) == 1  # toy_datamodule(2): one val batch of 2 images
    assert len(list((tmp_path / "predictions").glob("*.png"))) == 2
    assert set(result["summary"]) == {"eval/box/dice", "eval/box/iou", "eval/filled_box/dice", "eval/filled_box/iou"}


@pytest.mark.parametrize("name", ["vit_t", "lite_medsam"])
def test_initial_weights_are_scored_on_their_own_embeddings_when_the_encoder_trained(name, tiny_sam, tmp_path):
    """compare_initial after an encoder fine-tune: the initial model's box Dice comes from its own image
    encoder (identical to scoring it as the evaluated model), not from the trained model's embeddings; a
    frozen front runs once for both."""
    import copy

    from sam_train.eval.loop import first_changed_unit
    from sam_train.models.registry import build_sam

    model = tiny_sam if name == "vit_t" else build_sam("lite_medsam", pretrained=True, img_size=256).eval()
    initial = copy.deepcopy(model)
    assert first_changed_unit(model.image_encoder, initial.image_encoder) is None
    # "trained": other embeddings, same decoder; vit_t from its first unit on (two full encodes), LiteMedSAM
    # only its neck (the shared front runs once)
    part = model.image_encoder.patch_embed if name == "vit_t" else model.image_encoder.neck
    with torch.no_grad():
        for p in part.parameters():
            p.mul_(1.5).add_(0.05)
    expected = 0 if name == "vit_t" else len(model.image_encoder.units())
    assert first_changed_unit(model.image_encoder, initial.image_encoder) == expected
    opts = {"modes": [], "num_overlays": 0, "objects": {"enabled": True, "clicks": [1], "min_area": 1}}
    both = run_evaluation(model, toy_datamodule(2).val_dataloader(), opts, tmp_path / "a", initial=initial)
    alone = run_evaluation(initial, toy_datamodule(2).val_dataloader(), opts, tmp_path / "b")
    trained = run_evaluation(model, toy_datamodule(2).val_dataloader(), opts, tmp_path / "c")
    start = both["objects"]["initial"]["overall"]
    assert start["box"] == alone["objects"]["overall"]["box"] and start["n"] == alone["objects"]["overall"]["n"]
    assert both["objects"]["overall"]["box"] == trained["objects"]["overall"]["box"]
    assert start["box"] != trained["objects"]["overall"]["box"]  # the two encoders do differ


def test_objects_merge_option_reaches_the_click_protocol(tiny_sam, tmp_path, monkeypatch):
    """evaluate.objects.merge=true scores the clicks with progressive merge; the box is the same either way."""
    import sam_train.eval.protocols as protocols

    seen = []
    real = protocols.box_then_clicks

    def spy(*args, **kwargs):
        seen.append(kwargs.get("merge"))
        return real(*args, **kwargs)

    monkeypatch.setattr(protocols, "box_then_clicks", spy)
    results = {}
    for merge in (False, True):
        opts = {"modes": [], "num_overlays": 0, "objects": {"enabled": True, "clicks": [1, 2], "min_area": 1,
                                                           "merge": merge}}
        results[merge] = run_evaluation(tiny_sam, toy_datamodule(2).val_dataloader(), opts, tmp_path / str(merge))
    assert seen and set(seen) == {False, True} and seen[0] is False and seen[-1] is True
    assert results[True]["objects"]["overall"]["box"] == results[False]["objects"]["overall"]["box"]
