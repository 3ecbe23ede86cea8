"""Typed options of the evaluation (`sam-train eval`, the end of `fit`, distill's held-out report).

The defaults live here, once; configs/evaluate/default.yaml mirrors them (a test checks that the two agree).
`EvalConfig.from_dict` turns a plain mapping (a resolved config section) into the dataclasses; a missing
key takes its default, a missing or null section its defaults with `enabled: false`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sam_train.errors import SamTrainError
from sam_train.eval.metrics import METRICS

PROMPT_MODES = ("box", "point", "filled_box")
PREDICTION_FORMATS = (None, "png", "coco")


@dataclass(frozen=True)
class ClicksConfig:
    """Interactive protocol: IoU after 1..max_clicks simulated clicks, NoC at each IoU threshold."""

    enabled: bool = False
    max_clicks: int = 20
    iou_thresholds: tuple[float, ...] = (0.85, 0.9)


@dataclass(frozen=True)
class ObjectsConfig:
    """Per object at the native resolution: tight box, then correction clicks on top of it, and the
    filled-box baseline; objects below min_area pixels are not scored."""

    enabled: bool = False
    clicks: tuple[int, ...] = (1, 3, 5)
    min_area: int = 20
    compare_initial: bool = False  # after fit: also score the weights training started from (box, filled box)
    merge: bool = False  # each click edits only the region it was put in (eval.clicks.progressive_merge)


@dataclass(frozen=True)
class SamMed2dConfig:
    """Dice with a box and with 1 / 3 / 5 points, as SAM-Med2D reports them."""

    enabled: bool = False
    point_counts: tuple[int, ...] = (1, 3, 5)


@dataclass(frozen=True)
class VolumesConfig:
    """Medical slices: box predictions reassembled per case -> NIfTI + 3D metrics."""

    enabled: bool = True
    save: bool = True
    tolerance_mm: float = 2.0
    metrics: tuple[str, ...] = METRICS
    per_slice: bool = False


@dataclass(frozen=True)
class PredictionsConfig:
    """2D data: box predictions as png (instance label maps) or coco (RLE json); None: none."""

    format: str | None = None

    def __post_init__(self) -> None:
        if self.format not in PREDICTION_FORMATS:
            raise SamTrainError(f"predictions.format={self.format!r}: expected png, coco or null")


@dataclass(frozen=True)
class AttackConfig:
    """Prompt-agnostic PGD on the image encoder: clean vs attacked IoU; no eps: off."""

    eps: tuple[float, ...] = ()
    steps: int = 10
    prompts: tuple[str, ...] = ("point", "box")
    max_images: int = 8


@dataclass(frozen=True)
class EvalConfig:
    modes: tuple[str, ...] = PROMPT_MODES
    max_batches: int | None = None
    num_overlays: int = 8
    device: str | None = "auto"
    seed: int = 0
    clicks: ClicksConfig = field(default_factory=ClicksConfig)
    objects: ObjectsConfig = field(default_factory=ObjectsConfig)
    sam_med2d: SamMed2dConfig = field(default_factory=SamMed2dConfig)
    volumes: VolumesConfig = field(default_factory=VolumesConfig)
    predictions: PredictionsConfig = field(default_factory=PredictionsConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | EvalConfig | None) -> EvalConfig:
        if isinstance(options, EvalConfig):
            return options
        return _build(cls, dict(options or {}), "evaluate")


def _value(value: Any, default: Any, key: str) -> Any:
    if isinstance(default, tuple) and value is not None:
        if isinstance(value, str) or not hasattr(value, "__iter__"):
            raise SamTrainError(f"{key}: {value!r} is not valid; expected a list")
        return tuple(float(v) if isinstance(v, int) and any(isinstance(d, float) for d in default) else v
                     for v in value)
    return value


def _build(cls: type, options: Mapping[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise SamTrainError(f"{where}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(fields)}")
    defaults = cls()
    kwargs: dict[str, Any] = {}
    for name, value in options.items():
        default = getattr(defaults, name)
        key = name if where == "evaluate" else f"{where}.{name}"
        if dataclasses.is_dataclass(default):
            section = type(default)
            if value is None:  # a removed section is off
                value = {"enabled": False} if "enabled" in {f.name for f in dataclasses.fields(section)} else {}
            kwargs[name] = _build(section, dict(value), key)
        else:
            kwargs[name] = _value(value, default, key)
    return cls(**kwargs)


def as_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain containers (tuples as lists), e.g. to compare with the YAML."""
    return json_like(dataclasses.asdict(config))


def json_like(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: json_like(v) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return [json_like(v) for v in obj]
    return obj
