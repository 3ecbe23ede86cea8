"""sam_train.io: atomic writes (binary, text, safetensors) and file names from ids."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sam_train.io import atomic_save_safetensors, atomic_write, safe_file_name


def test_atomic_text_write_replaces_and_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "sub" / "rows.csv"
    atomic_write(path, lambda f: f.write("a,b\r\n1,2\n"), text=True)
    assert path.read_bytes() == b"a,b\r\n1,2\n"  # newline="": written as given

    def dying(f):
        f.write("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(path, dying, text=True)
    assert path.read_bytes() == b"a,b\r\n1,2\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["rows.csv"]


def test_atomic_safetensors(tmp_path):
    path = atomic_save_safetensors({"w": torch.arange(3.0)}, tmp_path / "x.safetensors", metadata={"k": "v"})
    assert torch.equal(load_file(str(path))["w"], torch.arange(3.0))


def test_safe_file_name():
    assert safe_file_name("case_001/slice 3") == "case_001__slice__3"
    assert safe_file_name("/") == "case" and safe_file_name("__x__") == "x"
