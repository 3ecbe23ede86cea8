"""Writing evaluation results: `metrics.json` (non-finite numbers as null) and a plain-text table."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch


def to_json_safe(obj: Any) -> Any:
    """Recursively convert to JSON types: tensors / arrays to lists, numpy scalars to Python numbers,
    non-finite floats (inf HD95, NaN) to None, mapping keys to strings."""
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return [to_json_safe(v) for v in obj.tolist()] if obj.ndim else to_json_safe(obj.item())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): to_json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_metrics_json(metrics: Mapping[str, Any], path: str | Path) -> Path:
    """Write metrics as strict JSON (non-finite -> null; `allow_nan=False` guards the rest)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json_safe(metrics), indent=2, allow_nan=False) + "\n")
    return path


_TITLES = {"dice": "Dice", "iou": "IoU", "nsd": "NSD", "hd95": "HD95"}


def _cell(stat: Mapping[str, float]) -> str:
    mean, std = stat.get("mean"), stat.get("std")
    if mean is None or not math.isfinite(mean):
        text = "-"
    else:
        text = f"{mean:.4f} ± {std:.4f}"
    if stat.get("n_inf"):
        text += f" ({stat['n_inf']} inf)"
    return text


def format_table(summary: Mapping[str, Any]) -> str:
    """Plain-text table of a `metrics.summarize` result: one row per class plus "mean" (the overall
    row), one column per metric with mean ± std over cases; "(k inf)" counts cases whose value is
    infinite (left out of mean and std)."""
    per_class = summary.get("per_class", {})
    rows: list[tuple[str, Mapping[str, Any]]] = list(per_class.items())
    if summary.get("overall"):
        rows.append(("mean", summary["overall"]))
    metrics: list[str] = []
    for _, stats in rows:
        metrics += [m for m in stats if m not in metrics]
    n_cases = max((s.get("n", 0) + s.get("n_inf", 0) for _, st in rows for s in st.values()), default=0)
    header = ["class"] + [_TITLES.get(m, m) for m in metrics]
    body = [[name] + [_cell(stats[m]) if m in stats else "" for m in metrics] for name, stats in rows]
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in body[:-1]] if summary.get("overall") else [line(r) for r in body]
    if summary.get("overall"):
        out += [line(["-" * w for w in widths]), line(body[-1])]
    out.append(f"({n_cases} cases; mean ± std over cases)")
    return "\n".join(out)


def write_report(
    sections: Iterable[Any], run_dir: Path, head: Mapping[str, Any], *, print_table: bool = True
) -> dict[str, Any]:
    """Assemble the protocols' sections (`sam_train.eval.protocols.Section`, None = nothing to report):
    `<run_dir>/metrics.json` = head + every section's results + "summary" (their flat numbers), the
    table lines in `<run_dir>/metrics_table.txt` and on stdout. Returns the metrics.json content."""
    result: dict[str, Any] = dict(head)
    flat: dict[str, float] = {}
    lines: list[str] = []
    for section in sections:
        if section is None:
            continue
        result.update(section.results)
        flat.update(section.summary)
        lines += section.lines
    result["summary"] = flat
    write_metrics_json(result, run_dir / "metrics.json")
    text = "\n".join(lines)
    (run_dir / "metrics_table.txt").write_text(text + "\n")
    if print_table:
        print(text)
    return result
