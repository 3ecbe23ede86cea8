"""Shared fixtures: tiny SAM models, official reference models, seeded generators."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores: keep intra-op threads fixed so timings and results are stable across runs.
torch.set_num_threads(int(os.environ.get("SAM_TRAIN_TEST_THREADS", "2")))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HYDRA_FULL_ERROR", "0")


@pytest.fixture
def tiny_sam():
    from sam_train.models import build_sam

    torch.manual_seed(0)
    return build_sam("vit_t")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
