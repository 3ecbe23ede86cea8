"""Bottleneck adapters in each attention block of the image encoder (SAM-Med2D / Medical-SA-Adapter style).

Works on every encoder whose blocks have the `attn_adapter` / `mlp_adapter` slots: the ViT's `Block`
and TinyViT's `TinyViTBlock` (its convolutional stage 0 has no attention and gets none).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sam_train.models.image_encoder import Block
from sam_train.models.tiny_vit import TinyViTBlock

ADAPTABLE_BLOCKS = (Block, TinyViTBlock)


@dataclass(frozen=True)
class AdapterConfig:
    """Bottleneck adapters after the attention and/or the MLP of every image-encoder block.

    Args:
        mlp_ratio: bottleneck width as a fraction of the block width (SAM-Med2D: 0.25).
        after_attn: adapter on the attention branch (before its residual add).
        after_mlp: adapter on the MLP branch (before its residual add).
        train_encoder: also train the encoder's own weights (default: frozen, as SAM-Med2D).
    """

    mlp_ratio: float = 0.25
    after_attn: bool = True
    after_mlp: bool = True
    train_encoder: bool = False


class Adapter(nn.Module):
    """Residual bottleneck MLP: x + up(act(down(x))). [..., D] -> [..., D].

    The up-projection starts at zero, so an adapted model computes exactly what the base model did.
    """

    def __init__(self, dim: int, hidden_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden_dim)
        self.act = act()
        self.up = nn.Linear(hidden_dim, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


def add_adapters(encoder: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Insert adapters into every block of `encoder` in place; returns the new parameter names.

    The adapters sit in the blocks' `attn_adapter` / `mlp_adapter` slots (nn.Identity by default),
    so base weight names are unchanged and a base checkpoint still loads by name.
    """
    if not (cfg.after_attn or cfg.after_mlp):
        raise ValueError("AdapterConfig: enable after_attn and/or after_mlp")
    if not cfg.train_encoder:
        encoder.requires_grad_(False)
    blocks = [m for m in encoder.modules() if isinstance(m, ADAPTABLE_BLOCKS)]
    if not blocks:
        raise ValueError(f"adapters: {type(encoder).__name__} has no attention blocks to adapt")
    for block in blocks:
        dim = block.attn.qkv.in_features
        hidden = max(1, round(dim * cfg.mlp_ratio))
        like = {"device": block.attn.qkv.weight.device, "dtype": block.attn.qkv.weight.dtype}
        if cfg.after_attn:
            block.attn_adapter = Adapter(dim, hidden).to(**like)
        if cfg.after_mlp:
            block.mlp_adapter = Adapter(dim, hidden).to(**like)
    return [n for n, _ in encoder.named_parameters() if "_adapter." in n]


def has_adapters(model: nn.Module) -> bool:
    """Whether any block of the model carries an adapter."""
    return any(isinstance(m, Adapter) for m in model.modules())
