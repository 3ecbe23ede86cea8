"""The import rules of docs/architecture.md, checked on the source: every module under sam_train/ is parsed
with `ast` and each import in it (at the top, inside functions or classes, under TYPE_CHECKING, relative,
or `importlib.import_module("...")` with a literal name) is checked against the rules. A failure names the
offending module, line and import."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sam_train"

# The layers that build blocks (models, prompt simulation, losses, data) never reach up into the layers that
# run them: commands, the CLI, Lightning modules, evaluation, inference, the data engine, callbacks,
# distillation and export.
LOWER = ("models", "prompts", "losses", "data")
UPPER = ("commands", "cli", "lit", "eval", "inference", "engine", "callbacks", "distill", "export")
# models/ is the bottom of the library: besides itself it uses only these top-level modules.
MODELS_MAY_IMPORT = ("models", "errors", "io")
# Only the command layer reads Hydra / OmegaConf configs; the library takes typed arguments.
CONFIG_LIBRARIES = ("omegaconf", "hydra")
CONFIG_READERS = ("commands", "cli", "config_checks")
# The command layer is the top: only the CLI (and commands themselves) import it.
COMMAND_CALLERS = ("commands", "cli")


def module_name(path: Path) -> str:
    """sam_train/eval/metrics.py -> sam_train.eval.metrics; a package's __init__.py -> the package."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    """The package (or top-level module) of sam_train a module belongs to: sam_train.eval.metrics -> eval,
    sam_train.cli -> cli; '' for a module outside sam_train."""
    parts = module.split(".")
    return parts[1] if parts[0] == "sam_train" and len(parts) > 1 else ""


def imports(source: str, module: str, is_package: bool = False) -> Iterator[tuple[int, str]]:
    """(line, imported module) of every import in `source` (the module `module`), wherever it stands."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "sam_train":  # `from sam_train import eval`: the names are the modules
                for alias in node.names:
                    yield node.lineno, f"sam_train.{alias.name}"
            else:
                yield node.lineno, target
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id == "import_module")
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """The import rules `module` (with this source) breaks, one line each."""
    own = part_of(module)
    out = []
    for line, target in imports(source, module, is_package):
        root, used = target.split(".")[0], part_of(target)
        where = f"{module} (line {line}) imports {target}"
        if own in LOWER and used in UPPER:
            out.append(f"{where}: {own}/ may not import {used} (it belongs to the layers above)")
        if own == "models" and used and used not in MODELS_MAY_IMPORT:
            out.append(f"{where}: models/ imports only {', '.join(MODELS_MAY_IMPORT)} of sam_train")
        if root in CONFIG_LIBRARIES and own not in CONFIG_READERS:
            out.append(f"{where}: only {', '.join(CONFIG_READERS)} read Hydra / OmegaConf configs")
        if used == "commands" and own not in COMMAND_CALLERS:
            out.append(f"{where}: only {', '.join(COMMAND_CALLERS)} import the command layer")
    return out


def library_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_keeps_the_import_rules():
    modules = library_modules()
    assert len(modules) > 100, "sam_train/ was not found where expected"
    broken = [
        v for path in modules
        for v in violations(path.read_text(), module_name(path), is_package=path.name == "__init__.py")
    ]
    assert not broken, "import rules of docs/architecture.md broken:\n" + "\n".join(broken)


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("sam_train.data.folders", "def f():\n    from sam_train.eval.metrics import dice\n",
         "sam_train.data.folders (line 2) imports sam_train.eval.metrics: data/ may not import eval"),
        ("sam_train.prompts.points", "from ..inference import amg\n",
         "sam_train.prompts.points (line 1) imports sam_train.inference: prompts/ may not import inference"),
        ("sam_train.losses.functional", "from sam_train import lit\n",
         "sam_train.losses.functional (line 1) imports sam_train.lit: losses/ may not import lit"),
        ("sam_train.models.sam", "import sam_train.data.sample\n",
         "sam_train.models.sam (line 1) imports sam_train.data.sample: models/ imports only"),
        ("sam_train.eval.loop", "class A:\n    def f(self):\n        import omegaconf\n",
         "sam_train.eval.loop (line 3) imports omegaconf: only commands, cli, config_checks read"),
        ("sam_train.engine.loop", "import importlib\nimportlib.import_module('sam_train.commands.fit')\n",
         "sam_train.engine.loop (line 2) imports sam_train.commands.fit: only commands, cli import"),
    ],
)
def test_the_checker_finds_imports_anywhere(module, source, expected):
    found = violations(source, module)
    assert any(v.startswith(expected) for v in found), found


def test_allowed_imports_pass():
    assert violations("from sam_train.models.sam import Sam\nimport torch\n", "sam_train.data.sample") == []
    assert violations("from omegaconf import DictConfig\n", "sam_train.commands.fit") == []
    assert violations("from sam_train.commands.build import build_model\n", "sam_train.cli") == []
