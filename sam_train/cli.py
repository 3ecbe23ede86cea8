"""`sam-train <command> [key=value ...]`: composes the command's Hydra config and calls its
`sam_train.commands.<command>.main(cfg)`, which turns the config into objects and calls the library.

Every command is a Hydra app (configs/<command>.yaml + config groups), so Hydra's flags work after
the command: `--help`, `--cfg job`, `-m` (multirun, e.g. with hydra/launcher=slurm).
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

CONFIG_DIR = Path(os.environ.get("SAM_TRAIN_CONFIG_DIR", Path(__file__).resolve().parent / "configs"))


@dataclass(frozen=True)
class Command:
    config: str  # primary config in configs/
    target: str  # "module:function" called with the composed config (sam_train.commands.<command>:main)
    help: str


# Add a command here + its configs/<config>.yaml. Two-word names ("export onnx") are sub-commands.
COMMANDS: dict[str, Command] = {
    "fit": Command(
        "fit", "sam_train.commands.fit:main",
        "train / fine-tune SAM (resumes from the run dir's last checkpoint)",
    ),
    "pretrain": Command(
        "pretrain", "sam_train.commands.pretrain:main",
        "MAE-pretrain a SAM image encoder on images only (folders / shards)",
    ),
    "export mae-to-sam": Command(
        "export_mae_to_sam", "sam_train.commands.export_mae_to_sam:main",
        "MAE checkpoint -> SAM checkpoint that fit starts from (model.checkpoint=)",
    ),
    "autolabel": Command(
        "autolabel", "sam_train.commands.autolabel:main",
        "automatic masks for images / shards -> SA-1B-style shards + score stats",
    ),
    "annotate": Command(
        "annotate", "sam_train.commands.annotate:main",
        "annotation page on localhost: click / box with SAM, accept, save COCO json",
    ),
    "engine": Command(
        "engine", "sam_train.commands.engine:main",
        "model in the loop: train -> autolabel -> train on the union, N rounds",
    ),
    "convert": Command(
        "convert", "sam_train.commands.convert:main",
        "convert COCO / folders / medical volumes to webdataset shards",
    ),
    "eval": Command(
        "eval", "sam_train.commands.eval:main",
        "metrics of a checkpoint on a data set's val split -> <run_dir>/metrics.json",
    ),
    "export onnx": Command(
        "export_onnx", "sam_train.commands.export_onnx:main",
        "export the prompt encoder + mask decoder to ONNX",
    ),
    "embed": Command(
        "embed", "sam_train.commands.embed:main",
        "encode a data set once: image embeddings + masks for decoder-only training",
    ),
    "distill": Command(
        "distill", "sam_train.commands.distill:main",
        "distil a SAM image encoder into a smaller student (MobileSAM / SAMI)",
    ),
}


def _error(msg: str, code: int = 2) -> None:
    print(f"sam-train: error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def _groups() -> list[str]:
    return sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name != "hydra")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def print_help() -> None:
    lines = ["usage: sam-train <command> [key=value ...] [hydra flags: --help, --cfg job, -m]", "", "commands:"]
    lines += [f"  {name:<10} {cmd.help}" for name, cmd in COMMANDS.items()]
    lines += ["", "config groups (choose with group=option):"]
    lines += [f"  {g:<10} {', '.join(_options(g))}" for g in _groups()]
    lines += ["", "example: sam-train fit recipe=medical_demo trainer.max_steps=200"]
    print("\n".join(lines))


def _one_line(exc: BaseException) -> str:
    return re.sub(r"\s*\n\s*", "; ", str(exc)).strip("; ")


def validate(config_name: str, overrides: list[str]) -> None:
    """Compose once up front so that bad choices / overrides give one clear line, not a traceback."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import MissingConfigException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from sam_train.config_checks import check_values, explicit_keys, fit_warmup
    from sam_train.errors import SamTrainError

    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name, overrides=overrides)
        check_values(cfg)
        fit_warmup(cfg, explicit_keys(overrides), apply=False)
    except SamTrainError as exc:
        _error(str(exc))
    except MissingConfigException as exc:
        group = (exc.missing_cfg_file or "").split("/")[0]
        choices = ", ".join(exc.options or _options(group)) if group else ""
        _error(f"{_one_line(exc).split(';')[0]}. Valid choices for '{group}': {choices}")
    except (Exception, OmegaConfBaseException) as exc:  # hydra's override / composition errors
        msg = _one_line(exc)
        match = re.search(r"Could not override '([\w.]+)'", msg)
        if match:
            parent = match.group(1).rpartition(".")[0]
            with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
                cfg = compose(config_name)
            node = OmegaConf.select(cfg, parent) if parent else cfg
            keys = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else ""
            msg = f"unknown key in override '{match.group(1)}'; valid keys of '{parent or '<root>'}': {keys}"
        _error(msg)


def _user_error(exc: BaseException) -> str | None:
    """The message of a user error anywhere in the exception chain (Hydra wraps instantiate errors)."""
    from omegaconf.errors import MissingMandatoryValue

    from sam_train.errors import SamTrainError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, SamTrainError):
            return str(exc)
        if isinstance(exc, MissingMandatoryValue):
            found = re.search(r"full_key: (\S+)", str(exc)) or re.search(r"value: (\S+)", str(exc))
            key = getattr(exc, "full_key", None) or (found.group(1) if found else "?")
            return f"missing required value '{key}': set it on the command line ({key}=...)"
        exc = exc.__cause__ or exc.__context__
    return None


def per_job_run_dir(cfg) -> None:
    """In a sweep (-m), unless run_dir is on the command line, point run_dir at the job's own Hydra
    directory (<hydra.sweep.dir>/<job number>): the default run_dir's timestamp is the sweep's, so its
    jobs would otherwise share one run directory and resume each other's checkpoints."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if "run_dir" not in cfg or not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    if any(o.split("=", 1)[0].lstrip("+~") == "run_dir" for o in hydra_cfg.overrides.task):
        return
    cfg.run_dir = hydra_cfg.runtime.output_dir


def _task(target: str):
    module_name, func_name = target.split(":")

    def task(cfg) -> None:
        from sam_train.console import quiet_console

        func = getattr(importlib.import_module(module_name), func_name)
        quiet_console()
        per_job_run_dir(cfg)
        try:
            func(cfg)
        except Exception as exc:
            message = _user_error(exc)
            if message is None:
                raise
            logging.getLogger("sam_train").debug("user error", exc_info=True)
            _error(_one_line(message))

    return task


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print_help()
        return
    name, overrides = argv[0], argv[1:]
    if overrides and f"{name} {overrides[0]}" in COMMANDS:
        name, overrides = f"{name} {overrides[0]}", overrides[1:]
    if name not in COMMANDS:
        _error(f"unknown command '{name}'; valid commands: {', '.join(COMMANDS)}")
    cmd = COMMANDS[name]
    if not any(a.startswith("-") for a in overrides):
        validate(cmd.config, overrides)

    import hydra

    sys.argv = [f"sam-train-{name.replace(' ', '-')}", *overrides]
    hydra.main(config_path=str(CONFIG_DIR), config_name=cmd.config, version_base="1.3")(_task(cmd.target))()


if __name__ == "__main__":
    main()
