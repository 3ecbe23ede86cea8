"""Model in the loop: 2 tiny rounds of fit -> held-out IoU/Dice -> autolabel -> fit on the union, on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sam_train.commands.engine import round_config, run_engine
from sam_train.engine.shards import ShardSamples

CONFIGS = str(Path(__file__).resolve().parent.parent / "sam_train" / "configs")
TINY = [
    "recipe=data_engine_demo",
    "trainer.max_steps=3", "trainer.val_check_interval=3", "optim.scheduler.warmup_steps=1",
    "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
    "data.train.n=4", "data.val.n=2", "data.batch_size=2", "model.img_size=64",
    "engine.pool.n=3",
    # an untrained model scores low: thresholds off so that round 1 really trains on autolabels
    "engine.autolabel.points_per_side=3", "engine.autolabel.pred_iou_thresh=0",
    "engine.autolabel.stability_score_thresh=0", "engine.autolabel.max_area_fraction=1.0",
    "engine.autolabel.min_area=0",
]


def compose_engine(run_dir: Path, extra: list[str] = ()) -> object:
    with initialize_config_dir(CONFIGS, version_base="1.3"):
        return compose("engine", overrides=[*TINY, f"run_dir={run_dir}", *extra])


def test_two_rounds_on_cpu_log_both_rounds(tmp_path: Path, capsys):
    cfg = compose_engine(tmp_path / "run")
    rounds = run_engine(cfg)
    out = capsys.readouterr().out

    assert [r["round"] for r in rounds] == [0, 1]
    saved = json.loads((tmp_path / "run" / "engine_rounds.json").read_text())
    assert saved == json.loads(json.dumps(rounds))
    for r in rounds:
        assert f"round {r['round']}:" in out
        assert set(r["held_out"]) == {"point/iou", "point/dice"}
        assert all(0.0 <= v <= 1.0 for v in r["held_out"].values())
        # Dice = 2 IoU / (1 + IoU) holds per object, so the means bound each other
        assert r["held_out"]["point/dice"] >= r["held_out"]["point/iou"]
        assert r["autolabel_images"] == 3 and r["autolabel_vs_known"] is not None
        assert Path(r["weights"]).is_file()
        assert (tmp_path / "run" / f"round_{r['round']}" / "autolabel" / "stats.json").is_file()
        assert (tmp_path / "run" / f"round_{r['round']}" / "logs" / "metrics.csv").is_file()  # each round its own logs
    assert not (tmp_path / "run" / "logs").exists()
    # round 0 trains on the 4 labelled images; round 1 on those plus the autolabelled pool images
    assert rounds[0]["train_images"] == 4
    assert rounds[0]["shards"], "round 0 wrote no autolabels: round 1 would not test the union"
    n_auto = len(ShardSamples(Path(rounds[0]["shards"][0]).parent))
    assert rounds[1]["train_images"] == 4 + n_auto
    # round 1 started from round 0's weights
    cfg1 = OmegaConf.load(tmp_path / "run" / "round_1" / "config.yaml")
    assert cfg1.model.checkpoint == rounds[0]["weights"]
    assert cfg1.data.train._target_ == "sam_train.engine.shards.union_dataset"


def test_round_config_keeps_val_interpolations_and_user_checkpoint(tmp_path: Path):
    cfg = compose_engine(tmp_path / "run", ["model.checkpoint=/some/init.pth"])
    rcfg = round_config(cfg, tmp_path / "r1", init="/w.pth", extra_shards=str(tmp_path / "shards"))
    assert rcfg.model.checkpoint == "/w.pth" and rcfg.run_dir == str(tmp_path / "r1")
    assert "engine" not in rcfg
    # data.val's transform pointed into data.train before it was replaced
    assert rcfg.data.val.transform.img_size == 64
    assert rcfg.data.train.datasets[1].urls == str(tmp_path / "shards")
    assert rcfg.callbacks.engine_weights.path == str(tmp_path / "r1" / "sam_weights.pth")


def test_engine_rejects_zero_rounds(tmp_path: Path):
    with pytest.raises(ValueError, match="rounds"):
        run_engine(compose_engine(tmp_path / "run", ["engine.rounds=0"]))
