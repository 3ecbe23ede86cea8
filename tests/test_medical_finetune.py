"""recipe=medical_finetune / medical_demo: LiteMedSAM (real weights) fine-tuned on cached embeddings inside a
wall-clock budget that counts caching; the per-object box + clicks evaluation with the data set's label names."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from sam_train.cli import CONFIG_DIR
from sam_train.data.medical import MedicalSliceDataset
from sam_train.data.mni import SUBCORTICAL, prepare_mni_neuromorphometrics, prepare_mni_subcortical
from sam_train.data.sample import DataError
from sam_train.eval.objects import ObjectScores, box_then_clicks, format_object_table
from sam_train.wall_clock import WallClockBudget, parse_duration

ROOT = Path(__file__).resolve().parent.parent


def compose_fit(*overrides: str):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("fit", overrides=list(overrides))


@pytest.mark.parametrize("recipe", ["medical_finetune", "medical_demo"])
def test_recipe_composes(recipe):
    cfg = compose_fit(f"recipe={recipe}", "data.train.root=/some/msd", "trainer.max_time=00:00:07:30")
    assert cfg.model.name == "lite_medsam" and cfg.model.pretrained
    assert list(cfg.finetune.freeze) == ["image_encoder"] and cfg.finetune.encoder_tail == 3  # + cached front
    assert cfg.data._target_ == "sam_train.data.cached.CachedEmbeddingDataModule"
    assert cfg.data.train.transform.hflip_p == 0.0 and list(cfg.data.views) == ["none", "hflip"]  # cached views
    assert cfg.callbacks.wall_clock.max_time == "00:00:07:30"  # the budget follows trainer.max_time
    assert cfg.prompts.num_iterations > 1 and 0 < cfg.prompts.box_probability < 1  # box or point, then clicks
    assert cfg.prompts.box_jitter == "none"  # tight boxes, as evaluated
    assert cfg.prompts.loss_iterations < cfg.prompts.num_iterations  # clicks without backward are cheap
    assert cfg.loss.focal_gamma == 0 and cfg.trainer.precision == "bf16-mixed"  # MedSAM's BCE + dice; bf16
    assert cfg.evaluate.objects.enabled and list(cfg.evaluate.objects.clicks) == [1, 3, 5]
    if recipe == "medical_demo":
        assert cfg.data.train.atlas == "subcortical"


def test_medical_finetune_separate_val_folder(tmp_path):
    """data.val.root= holds out another folder: every case of each folder is used (no split)."""
    train_root = prepare_mni_subcortical(tmp_path / "a", n_cases=2, slice_step=10)
    val_root = prepare_mni_subcortical(tmp_path / "b", n_cases=3, slice_step=10)
    cfg = compose_fit("recipe=medical_finetune", f"data.train.root={train_root}", f"data.val.root={val_root}")
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    assert dm.images.case_ids == ["mni_sub_000", "mni_sub_001"] and dm.images.root == train_root
    assert dm.val.case_ids == ["mni_sub_000", "mni_sub_001", "mni_sub_002"] and dm.val.root == val_root
    split = compose_fit("recipe=medical_finetune", f"data.train.root={val_root}")
    dm = instantiate(split.data)
    assert not set(dm.images.case_ids) & set(dm.val.case_ids) and dm.val.case_ids  # by case otherwise


def test_parse_duration_and_budget():
    assert parse_duration("00:00:10:00") == 600 and parse_duration("01:02:03:04") == 93784
    assert parse_duration({"minutes": 2, "seconds": 3}) == 123 and parse_duration(None) is None
    with pytest.raises(ValueError, match="DD:HH:MM:SS"):
        parse_duration("10:00")
    budget = WallClockBudget(max_time="00:00:00:30", start=time.time() - 20)
    assert 9 < budget.remaining() <= 10 and budget.deadline == pytest.approx(budget.start + 30)


def test_budget_anneals_learning_rates_to_zero_at_the_deadline():
    """anneal_lr: each optimiser step runs at the scheduler's lr x the fraction of training time left; the
    scheduler's value is restored after the step (no compounding), and the scale is 1 without a budget."""
    from types import SimpleNamespace

    budget = WallClockBudget(max_time=100, anneal_lr=True)
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    budget.on_train_start(SimpleNamespace(optimizers=[optimizer]), None)
    budget.train_start = budget.start - 100.0 / 3  # two thirds of the training time left
    budget.start -= 100.0 / 3
    assert budget.lr_scale() == pytest.approx(2 / 3, abs=1e-3)
    for _ in range(2):
        before = float(weight)
        weight.grad = torch.ones(1)
        optimizer.step()
        assert before - float(weight) == pytest.approx(0.1 * 2 / 3, abs=1e-4)
        assert optimizer.param_groups[0]["lr"] == 0.1
    assert budget.lr_scale(now=budget.deadline + 5) == 0.0
    assert WallClockBudget(max_time=None, anneal_lr=True).lr_scale() == 1.0


def test_subcortical_demo_data(tmp_path):
    root = prepare_mni_subcortical(tmp_path / "sub", slice_step=5)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["labels"]["2"] == "left thalamus" and len(meta["labels"]) == len(SUBCORTICAL) + 1
    train = MedicalSliceDataset(root, subset="train", val_fraction=0.34, min_area=20)
    val = MedicalSliceDataset(root, subset="val", val_fraction=0.34, min_area=20)
    assert not set(train.case_ids) & set(val.case_ids) and len(val.case_ids) == 2
    sample = train[0]
    assert sample["masks"].shape[0] == len(set(sample["class_ids"].tolist()))  # one object per structure
    again = MedicalSliceDataset(prepare_mni_subcortical(tmp_path / "sub", slice_step=10), min_area=20)
    assert len(again) < len(train) + len(val)  # other settings: prepared again, not the old slices
    with pytest.raises(DataError, match="slice_step"):
        prepare_mni_subcortical(tmp_path / "bad", slice_step=0)


def test_neuromorphometrics_check_data(tmp_path):
    """The second real data set of the same task: same 17 structure names, split by case, and labels that
    land on the image (resampled through world coordinates): CSF-filled ventricles are darker than the
    thalamus on T1."""
    root = prepare_mni_neuromorphometrics(tmp_path / "nmm", slice_step=3)
    meta = json.loads((root / "dataset.json").read_text())
    assert [meta["labels"][str(k + 1)] for k in range(len(SUBCORTICAL))] == [name for _, name in SUBCORTICAL]
    train = MedicalSliceDataset(root, subset="train", val_fraction=0.34, min_area=20)
    val = MedicalSliceDataset(root, subset="val", val_fraction=0.34, min_area=20)
    assert not set(train.case_ids) & set(val.case_ids) and len(val.case_ids) == 2
    brightness = {1: [], 2: []}  # left lateral ventricle, left thalamus
    for i in range(len(train)):
        sample = train[i]
        for mask, c in zip(sample["masks"], sample["class_ids"].tolist(), strict=True):
            if c in brightness:
                brightness[c].append(sample["image"][0][mask].float().mean())
    assert brightness[1] and brightness[2]
    assert torch.stack(brightness[1]).mean() < 0.7 * torch.stack(brightness[2]).mean()


class _OracleDecoder(torch.nn.Module):
    """A stand-in SAM whose decode returns the filled box (clicks ignored): Dice after clicks = box Dice."""

    img_size, mask_threshold = 64, 0.0

    def decode(self, emb, image_ids, coords, labels, mask_inputs=None, has_mask=None):
        m = coords.shape[0]
        box = coords[:, -2:].reshape(m, 4)
        ys, xs = torch.arange(64.0).view(1, 64, 1), torch.arange(64.0).view(1, 1, 64)  # low-res = input here
        inside = (xs >= box[:, 0, None, None] - 0.5) & (xs <= box[:, 2, None, None] + 1.5)
        inside = inside & (ys >= box[:, 1, None, None] - 0.5) & (ys <= box[:, 3, None, None] + 1.5)
        return (inside.float() * 20 - 10)[:, None].expand(m, 4, 64, 64), torch.zeros(m, 4)

    def postprocess_masks(self, masks, input_size, original_size):
        masks = torch.nn.functional.interpolate(masks, (self.img_size, self.img_size), mode="bilinear")
        masks = masks[..., : input_size[0], : input_size[1]]
        return torch.nn.functional.interpolate(masks, tuple(original_size), mode="bilinear")


def test_box_then_clicks_native_resolution_and_table():
    masks = torch.zeros(2, 40, 32, dtype=torch.bool)
    masks[0, 5:20, 4:12] = True  # a box-shaped object: the filled box is perfect
    masks[1, 22:38, 10:30] = True
    masks[1, 22:30, 10:18] = False  # an L: the filled box is not
    scores = box_then_clicks(_OracleDecoder(), torch.zeros(1, 64, 64), masks, clicks=(1, 3))
    assert set(scores) == {"box", "clicks_1", "clicks_3", "filled_box"}
    assert scores["filled_box"][0] == 1.0 and scores["filled_box"][1] < 0.9
    assert torch.allclose(scores["box"], scores["filled_box"], atol=0.08)  # same masks, via the model input
    assert torch.equal(scores["clicks_3"], scores["box"])  # this decoder ignores clicks
    merged = box_then_clicks(_OracleDecoder(), torch.zeros(1, 64, 64), masks, clicks=(1, 3), merge=True)
    assert all(torch.equal(merged[k], scores[k]) for k in scores)  # nothing redrawn: nothing to merge
    traced = box_then_clicks(_OracleDecoder(), torch.zeros(1, 64, 64), masks, clicks=(1, 3), trace=True)
    assert torch.equal(traced["box"], scores["box"])
    assert traced["click_labels"].shape == traced["click_depths"].shape == (2, 3)
    # the L's filled box wrongly covers an 8 x 8 square: a negative click in its middle, 4 px from its edges
    assert (traced["click_labels"][1] == 0).all() and (traced["click_depths"][1] >= 3).all()
    acc = ObjectScores(clicks=(1, 3))
    acc.add(scores, [2, 7], "case_a")
    summary = acc.summary({2: "left thalamus", 7: "left hippocampus"})
    assert set(summary["per_class"]) == {"left thalamus", "left hippocampus"} and summary["overall"]["n"] == 2
    table = format_object_table(summary, (1, 3))
    assert "left hippocampus" in table and "+1 click" in table and "+3 clicks" in table and "filled box" in table


@pytest.mark.slow  # lite_medsam on a CPU: caching, a few steps, evaluation (~1-2 min on 2 cores)
def test_medical_demo_end_to_end_stops_at_max_time(tmp_path):
    """The real CLI: caching counts in trainer.max_time, the run stops on it, and the evaluation prints the
    label names and the click columns."""
    run = tmp_path / "run"
    budget = 40
    exe = Path(sys.executable).with_name("sam-train")
    t0 = time.time()
    result = subprocess.run(
        [str(exe), "fit", "recipe=medical_demo", f"data_root={tmp_path / 'data'}", f"run_dir={run}",
         f"trainer.max_time=00:00:00:{budget}", "data.train.slice_step=6", "data.views=[none]",
         "evaluate.num_overlays=0", "trainer.enable_progress_bar=false"],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    log = (run / "fit.log").read_text() if (run / "fit.log").is_file() else output
    match = re.search(r"wall-clock budget of (\d+) s reached after (\d+) steps \((\d+) s since", log + output)
    assert match, (log + output)[-3000:]
    assert int(match.group(1)) == budget and int(match.group(2)) >= 1
    assert time.time() - t0 > budget
    assert (run / "embeddings" / "train" / "cache.json").is_file()
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == int(match.group(2))  # the model of the final step, not the last step checkpoint
    metrics = json.loads((run / "metrics.json").read_text())
    per_class = metrics["objects"]["per_class"]
    names = {name for _, name in SUBCORTICAL}
    assert per_class and set(per_class) <= names, per_class.keys()
    for row in per_class.values():
        assert {"box", "clicks_1", "clicks_3", "clicks_5", "filled_box"} <= set(row)
    for key in ("box", "clicks_1", "clicks_3", "clicks_5", "filled_box"):
        assert 0.0 <= metrics["summary"][f"eval/objects/{key}/dice"] <= 1.0
    for column in ("+1 click", "+3 clicks", "+5 clicks", "filled box"):
        assert column in result.stdout
    assert any(name in result.stdout for name in per_class)
    assert metrics["volumes"]["summary"]["per_class"]  # the 3D metrics per case are still there


def test_cached_embeddings_inside_fit_vit_t(tmp_path):
    """The caching data module on a tiny model: every training view encoded once inside fit (cache.json),
    reused by a rerun in the same run dir; a trainable encoder is refused with one clear error."""
    from sam_train.commands.fit import fit
    from sam_train.errors import SamTrainError

    root = prepare_mni_subcortical(tmp_path / "sub", n_cases=3, slice_step=10)
    base = ["recipe=medical_finetune", "model=vit_t", f"data.train.root={root}", "data.train.val_fraction=0.34",
            "data.views=[none,hflip]",
            "trainer.max_steps=2", "~evaluate", "trainer.enable_progress_bar=false", "logger=csv",
            f"run_dir={tmp_path / 'run'}"]  # fmt: skip
    fit(compose_fit(*base))
    info = json.loads((tmp_path / "run" / "embeddings" / "train" / "cache.json").read_text())
    n_train = len(MedicalSliceDataset(root, subset="train", val_fraction=0.34, min_area=20))
    assert info["encoded"] == n_train * 2 and info["key"]["views"] == ["none", "hflip"]
    stamp = (tmp_path / "run" / "embeddings" / "train" / "cache.json").stat().st_mtime_ns
    fit(compose_fit(*base, "trainer.max_steps=3"))  # resumes from last.ckpt: the cache is reused
    assert (tmp_path / "run" / "embeddings" / "train" / "cache.json").stat().st_mtime_ns == stamp
    with pytest.raises(SamTrainError, match="frozen image encoder"):
        fit(compose_fit(*base[:-1], "finetune=full", f"run_dir={tmp_path / 'full'}"))


def test_cache_key_fingerprints_the_encoder_weights():
    """A cache dir reused with other encoder weights must be encoded again: the key hashes the weights."""
    from sam_train.data.cached import weights_fingerprint
    from sam_train.models.registry import build_sam

    encoder = build_sam("vit_t").image_encoder
    first = weights_fingerprint(encoder)
    assert weights_fingerprint(encoder) == first
    with torch.no_grad():
        next(encoder.parameters()).view(-1)[0] += 1e-3
    assert weights_fingerprint(encoder) != first


def test_encoder_tail_caches_features_and_trains_only_the_tail(tmp_path):
    """finetune=encoder_tail: the cache holds the features entering the first trainable unit (the frozen
    front runs once per image), each step runs the tail on them; after the fit the tail and neck changed,
    the front did not."""
    from sam_train.commands.fit import fit
    from sam_train.data.embeddings import EmbeddingDataset, collate_embeddings
    from sam_train.models.registry import build_sam

    root = prepare_mni_subcortical(tmp_path / "sub", n_cases=3, slice_step=10)
    run = tmp_path / "run"
    fit(compose_fit("recipe=medical_finetune", "finetune.encoder_tail=3", "model.img_size=64",
                    f"data.train.root={root}", "data.train.val_fraction=0.34", "trainer.max_steps=2", "~evaluate",
                    "trainer.enable_progress_bar=false", "logger=csv", f"run_dir={run}"))
    cache = run / "embeddings" / "train"
    assert json.loads((cache / "cache.json").read_text())["key"]["encoder_unit"] == 13  # layers.2.downsample
    batch = collate_embeddings([EmbeddingDataset(root=cache)[i] for i in range(2)])
    assert batch["encoder_unit"] == 13 and batch["features"].shape == (2, 160, 16, 16) and "embeddings" not in batch
    initial = build_sam("lite_medsam", pretrained=True, img_size=64).image_encoder.state_dict()
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    prefix = "model.image_encoder."
    changed = {k.removeprefix(prefix) for k, v in state.items()
               if k.startswith(prefix) and not torch.equal(v, initial[k.removeprefix(prefix)])}
    assert changed and all(k.startswith(("layers.2.downsample.", "layers.3.", "neck.")) for k in changed), changed
