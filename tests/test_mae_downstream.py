"""benchmarks/mae_downstream.py runs end to end in smoke mode (pretrain -> export -> two fine-tunes -> Dice)."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "mae_downstream.py"


def test_mae_downstream_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("mae_downstream", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(["--smoke", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\| (random|MAE) \| ([0-9.]+) \|", out, re.M)}
    assert set(rows) == {"random", "MAE"}, out
    assert rows["random"] == round(results["random"]["box_dice"], 4) and rows["MAE"] == round(
        results["mae"]["box_dice"], 4
    )
    assert all(0.0 <= r["box_dice"] <= 1.0 for r in results.values())
    # the filled-box baseline does not depend on the model: identical for both runs, and a real overlap
    assert results["random"]["filled_box_dice"] == results["mae"]["filled_box_dice"] > 0.3
    assert re.search(r"^ratio MAE / random box Dice: [0-9.]+x$", out, re.M), out
    assert math.isfinite(results["mae"]["pretrain_loss"])
    # both fine-tunes started from files that differ only in the image encoder's MAE-initialised weights
    rnd = torch.load(tmp_path / "init_random.pth", weights_only=True)
    mae = torch.load(tmp_path / "init_mae.pth", weights_only=True)
    differ = {k for k in rnd if not torch.equal(rnd[k], mae[k])}
    assert differ and all(
        k.startswith(("image_encoder.blocks.", "image_encoder.patch_embed.", "image_encoder.pos_embed")) for k in differ
    )
    assert not any(".rel_pos_" in k for k in differ)
