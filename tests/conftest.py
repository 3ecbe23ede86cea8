"""Shared fixtures: tiny SAM models, official reference models, seeded generators."""

from __future__ import annotations

import locale
import os

import pytest
import torch

# Two cores: keep intra-op threads fixed so timings and results are stable across runs.
torch.set_num_threads(int(os.environ.get("SAM_TRAIN_TEST_THREADS", "2")))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HYDRA_FULL_ERROR", "0")


@pytest.fixture(autouse=True)
def _restore_locale():
    """Tests that write DICOM with SimpleITK (GDCM) switch the process locale to "C"; undo it."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


@pytest.fixture
def tiny_sam():
    from sam_train.models import build_sam

    torch.manual_seed(0)
    return build_sam("vit_t")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
