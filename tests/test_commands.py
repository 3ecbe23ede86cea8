"""The command layer (sam_train.commands): every CLI command is `sam_train.commands.<x>:main`, only that layer
reads Hydra configs, and `build_model` loads LoRA checkpoints for every command that builds a model."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sam_train.cli import COMMANDS, CONFIG_DIR
from sam_train.commands.build import build_model, device

PACKAGE = Path(__file__).resolve().parent.parent / "sam_train"
MODEL = {"_target_": "sam_train.models.build_sam", "name": "vit_t", "checkpoint": None}
LORA = {"_target_": "sam_train.finetune.apply_finetune", "_partial_": True, "freeze": [], "adapter": None,
        "lora": {"rank": 4, "alpha": 4.0, "dropout": 0.0, "target_modules": ["qkv"], "qkv_parts": ["q", "v"]}}


def test_every_command_is_a_main_of_the_commands_package():
    for name, command in COMMANDS.items():
        module, func = command.target.split(":")
        assert module.startswith("sam_train.commands.") and func == "main", name
        assert callable(getattr(importlib.import_module(module), func)), name


def test_only_the_command_layer_imports_hydra_or_omegaconf():
    allowed = {"cli.py", "config_checks.py"}
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "commands" or str(rel) in allowed:
            continue
        if re.search(r"^\s*(from|import) (hydra|omegaconf)\b", path.read_text(), re.MULTILINE):
            offenders.append(str(rel))
    assert offenders == []


def _lora_checkpoint(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    trained = build_model(OmegaConf.create({"model": MODEL, "finetune": LORA}))
    with torch.no_grad():  # LoRA B starts at zero: make the LoRA weights matter
        for name, p in trained.named_parameters():
            if ".lora_" in name:
                p.add_(0.01)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()}}, ckpt)
    return trained, ckpt


def test_build_model_loads_a_lora_checkpoint_after_the_strategy(tmp_path):
    trained, ckpt = _lora_checkpoint(tmp_path)
    torch.manual_seed(1)  # another random init: every tensor must come from the checkpoint
    loaded = build_model(OmegaConf.create({"model": MODEL, "finetune": LORA, "checkpoint": str(ckpt)}))
    expected = trained.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())


@pytest.mark.parametrize("command", ["annotate", "autolabel", "embed", "eval", "export_onnx"])
def test_model_commands_take_a_fine_tune_strategy_and_checkpoint(command, tmp_path):
    trained, ckpt = _lora_checkpoint(tmp_path)
    overrides = ["model=vit_t", "finetune=lora", f"checkpoint={ckpt}"]
    if command == "export_onnx":
        overrides.append(f"out={tmp_path / 'x.onnx'}")
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(command, overrides=overrides)
    model = build_model(cfg)
    x = torch.zeros(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.equal(model.encode(model.preprocess(x)), trained.eval().encode(trained.preprocess(x)))


def test_engine_round_weights_merge_lora(tmp_path):
    from sam_train.engine.loop import SaveSamWeights

    trained, _ = _lora_checkpoint(tmp_path)
    SaveSamWeights(path=str(tmp_path / "w.pth")).on_train_end(
        SimpleNamespace(is_global_zero=True), SimpleNamespace(model=trained)
    )
    plain = build_model(OmegaConf.create({"model": {**MODEL, "checkpoint": str(tmp_path / "w.pth")}}))
    x = torch.rand(1, 3, 256, 256) * 255
    with torch.no_grad():
        merged, lora = plain.eval().encode(plain.preprocess(x)), trained.eval().encode(trained.preprocess(x))
    torch.testing.assert_close(merged, lora, rtol=1e-4, atol=1e-4)


def test_device_choice():
    assert device("cpu") == torch.device("cpu")
    assert device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert device(None) == device("auto")
