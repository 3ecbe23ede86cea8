"""Held-out comparison of teacher and students in one pass over the val batches.

Each batch is encoded once by every model (timed: encoder-only images/s, interleaved per batch so that all
models see the same machine load); the embeddings then feed the evaluation's box protocol
(`sam_train.eval.loop.Evaluation`: prompted Dice per case and class, mean over cases), the embedding MSE
against the teacher, and the agreement of each student's box masks with the teacher's.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from sam_train.eval.config import EvalConfig
from sam_train.eval.loop import Evaluation
from sam_train.eval.metrics import dice
from sam_train.eval.prompted import box_prompts, predict_objects, to_device, valid_region
from sam_train.models.sam import Sam

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def compare_on_held_out(
    teacher: Sam,
    students: Mapping[str, Sam],
    batches: Iterable[dict[str, Any]],
    config: EvalConfig | Mapping[str, Any],
    out_dir: Path,
    *,
    dataset: Any = None,
    warmup_batches: int = 1,
) -> dict[str, dict[str, Any]]:
    """Evaluate teacher and students on the same held-out batches.

    Returns {name: {"box_dice", "summary" (the evaluation's flat summary), "images_per_s",
    "timed_images"} and, for students, "embedding_mse" and "teacher_agreement_dice"}; each model's full
    evaluation goes to `out_dir/<name>/metrics.json`.
    """
    config = EvalConfig.from_dict(config)
    models = {"teacher": teacher, **students}
    device = teacher.device
    was_training = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    evals = {name: Evaluation(m, config, dataset=dataset) for name, m in models.items()}
    times: dict[str, list[float]] = defaultdict(list)
    sizes: list[int] = []
    sq_err: dict[str, float] = defaultdict(float)
    agree: dict[str, list[torch.Tensor]] = defaultdict(list)
    numel = 0
    max_batches = config.max_batches
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= int(max_batches):
            break
        batch = to_device(batch, device)
        sizes.append(len(batch["ids"]))
        embeddings = {}
        for name, m in models.items():  # interleaved: the same load for every model
            _sync(device)
            start = time.perf_counter()
            embeddings[name] = m.encode(m.preprocess(batch["images"]))
            _sync(device)
            times[name].append(time.perf_counter() - start)
        ref = embeddings["teacher"]
        numel += ref.numel()
        masks = batch["masks"]
        ref_pred = None
        if masks.shape[0]:
            coords, labels, _ = box_prompts(masks)
            ref_pred = predict_objects(teacher, {**batch, "embeddings": ref}, coords, labels, multimask=False)
            valid = valid_region(batch)
        for name in students:
            sq_err[name] += float((embeddings[name].float() - ref.float()).pow(2).sum())
            if ref_pred is not None:
                pred = predict_objects(models[name], {**batch, "embeddings": embeddings[name]}, coords, labels, False)
                agree[name].append(dice(pred & valid, ref_pred & valid))
        for name, evaluation in evals.items():
            evaluation.update({**batch, "embeddings": embeddings[name]}, out_dir / name)
    skip = warmup_batches if len(sizes) > warmup_batches else 0
    timed = sum(sizes[skip:])
    results: dict[str, dict[str, Any]] = {}
    for name, evaluation in evals.items():
        print(f"\n{name}:")
        summary = evaluation.finish(out_dir / name)["summary"]
        seconds = sum(times[name][skip:])
        results[name] = {
            "box_dice": summary.get("eval/box/dice"),
            "summary": summary,
            "images_per_s": timed / seconds if seconds > 0 else None,
            "timed_images": timed,
        }
        if name in students:
            results[name]["embedding_mse"] = sq_err[name] / max(numel, 1)
            results[name]["teacher_agreement_dice"] = float(torch.cat(agree[name]).mean()) if agree[name] else None
    for name, m in models.items():
        m.train(was_training[name])
    return results
