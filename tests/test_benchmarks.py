"""The benchmarks run end to end on CPU in smoke mode (a few steps), so they cannot rot."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def run(script: str, *args: str, timeout: float = 300) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / script), "--smoke", "--threads", "1", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def ratios(out: str, what: str) -> list[float]:
    values = [float(v) for v in re.findall(rf"^ratio {what}.*?: ([0-9.eE+-]+)x", out, flags=re.M)]
    assert values, f"no 'ratio {what}' line in:\n{out}"
    assert all(math.isfinite(v) and v > 0 for v in values), values
    return values


def table_rows(out: str) -> list[list[str]]:
    lines = [ln for ln in out.splitlines() if ln.startswith("|")]
    assert len(lines) >= 3 and set(lines[1]) <= {"|", "-"}, out  # header, separator, rows
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


def test_train_step_smoke():
    out = run("train_step.py")
    rows = table_rows(out)
    assert [r[0].split(":")[0].split(" (")[0] for r in rows] == ["naive", "sam_train", "naive", "sam_train"]
    for row in rows:
        assert float(row[1]) > 0 and float(row[4]) > 0  # images/s and counted GFLOP per step
    assert rows[0][3].endswith("iB") and rows[1][3].endswith("iB")  # peak memory of both full steps
    ratios(out, "sam_train / naive images/s")
    ratios(out, "encoder fwd\\+bwd")


def test_decoder_only_smoke():
    out = run("decoder_only.py")
    rows = table_rows(out)
    assert [r[0].split(" (")[0] for r in rows] == ["frozen image encoder", "cached embeddings",
                                                   "one-off embedding pass"]
    assert all(float(r[1]) > 0 for r in rows)
    ratios(out, "cached / frozen-encoder images/s")


@pytest.mark.slow
def test_train_step_ddp_smoke():
    out = run("train_step.py", "--skip-baseline", "--ddp", "2")
    ratios(out, "DDP 2 processes / 1 process images/s")


def test_encoder_speed_smoke():
    out = run("encoder_speed.py")
    assert "max relative difference vs reference" in out
    rows = table_rows(out)
    assert [(r[0], r[1]) for r in rows] == [(s, p) for p in ("fwd", "fwd+bwd")
                                            for s in ("reference fp32", "sam_train fp32", "sam_train bf16")]
    assert all(float(r[2]) > 0 and r[3].endswith("iB") for r in rows)
    for kind in ("fwd sam", "fwd\\+bwd sam"):
        assert len(ratios(out, kind)) == 2


def test_click_errors_smoke(tmp_path):
    """Zero-shot LiteMedSAM on 3 held-out demo slices: one row per click, shares in [0, 100] %."""
    out = run("click_errors.py", "--work-dir", str(tmp_path), "--clicks", "2", "--json", str(tmp_path / "c.json"))
    rows = table_rows(out)
    assert [r[0] for r in rows] == ["1", "2"]
    for r in rows:
        assert 0 <= float(r[2].rstrip("%")) <= 100 and 0 <= float(r[3].rstrip("%")) <= 100
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["objects"] > 0 and len(result["clicks"]) == 2
    assert result["clicks"][0]["dice"] == pytest.approx(float(rows[0][1]), abs=1e-4)


def test_token_grid_smoke(tmp_path):
    """The ground truth through grids over the model input on 3 held-out demo slices: the 256 grid (finer than the
    native slice) keeps it, coarser grids lose Dice."""
    out = run("token_grid.py", "--work-dir", str(tmp_path), "--json", str(tmp_path / "g.json"))
    result = json.loads((tmp_path / "g.json").read_text())
    d = {r["grid"]: r["dice"] for r in result["grids"]}
    assert result["objects"] > 0 and sorted(d) == [32, 64, 128, 256]
    assert d[256] > 0.99 and d[32] < d[64] < d[256]
    assert [r[0] for r in table_rows(out)][1].startswith("64 x 64")
