"""LoRA on the image encoder's attention through `peft` (SAMed style: rank 4 on q and v).

Our attention modules keep the official fused `qkv` Linear (so official checkpoints load by name). SAMed
puts separate rank-r LoRA pairs on q and v only. We get exactly that from peft by injecting one LoRA of
rank r * len(qkv_parts) into `qkv` whose up-projection B is block-structured (ViT layout [Q; K; V]):

    B = [[B_q, 0  ],      rows 0..D-1    (q)
         [0,   0  ],      rows D..2D-1   (k: no update)
         [0,   B_v]]      rows 2D..3D-1  (v)        A = [A_q; A_v]

so B @ A = [B_q A_q; 0; B_v A_v]. Which rows are q, k and v is the attention module's `qkv_rows(part)`
(TinyViT interleaves them per head). B starts at zero (peft's default init) and a gradient mask keeps the
off-block entries at zero: with zero gradients AdamW / Adam / SGD updates and decoupled weight decay
of a zero entry are all zero. Parameter count differs from SAMed (the zero blocks are stored), the
function class is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

QKV = ("q", "k", "v")
ADAPTER_NAME = "default"


@dataclass(frozen=True)
class LoraConfig:
    """LoRA on the image encoder (everything else in the encoder is frozen, as SAMed).

    Args:
        rank: LoRA rank of each adapted projection (SAMed: 4).
        alpha: scaling numerator; the update is (alpha / rank) * B @ A (SAMed: no scaling, alpha = rank).
        dropout: dropout on the LoRA input.
        target_modules: peft target module names inside the encoder ("qkv", "proj", "lin1", "lin2").
        qkv_parts: which of q / k / v of a fused "qkv" target get a LoRA pair (SAMed: q and v).
    """

    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("qkv",)
    qkv_parts: tuple[str, ...] = ("q", "v")


def _mask_grad(mask: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return grad * mask.to(grad.dtype)


def _qkv_block_mask(attention: nn.Module, rank: int, parts: tuple[str, ...]) -> torch.Tensor:
    """[qkv rows, rank * len(parts)] 0/1 mask: column block i feeds only the rows of parts[i]."""
    mask = torch.zeros(attention.qkv.out_features, rank * len(parts))
    for i, part in enumerate(parts):
        mask[attention.qkv_rows(part), i * rank : (i + 1) * rank] = 1.0
    return mask


def add_lora(encoder: nn.Module, cfg: LoraConfig) -> list[str]:
    """Inject LoRA into `encoder` in place with peft and freeze all its other weights.

    Returns the names of the LoRA parameters (relative to the encoder).
    """
    parts = tuple(cfg.qkv_parts)
    if not parts or len(set(parts)) != len(parts) or any(p not in QKV for p in parts):
        raise ValueError(f"LoraConfig.qkv_parts must be distinct entries of {QKV}, got {parts}")
    if cfg.rank < 1:
        raise ValueError(f"LoraConfig.rank must be >= 1, got {cfg.rank}")
    fused_rank = cfg.rank * len(parts)
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        # One fused LoRA of rank r * parts on qkv, with the same alpha / rank scaling per part.
        rank_pattern={"qkv": fused_rank},
        alpha_pattern={"qkv": cfg.alpha * len(parts)},
    )
    encoder.requires_grad_(False)
    inject_adapter_in_model(peft_cfg, encoder, adapter_name=ADAPTER_NAME)
    found = False
    modules = dict(encoder.named_modules())
    for name, module in modules.items():
        if not isinstance(module, LoraLayer):
            continue
        found = True
        if name.split(".")[-1] != "qkv":
            continue
        lora_b: nn.Linear = module.lora_B[ADAPTER_NAME]
        attention = modules[name.rpartition(".")[0]]
        mask = _qkv_block_mask(attention, cfg.rank, parts).to(lora_b.weight.device)
        lora_b.register_buffer("qkv_part_mask", mask, persistent=False)
        with torch.no_grad():
            lora_b.weight.mul_(mask)
        lora_b.weight.register_hook(partial(_mask_grad, lora_b.qkv_part_mask))
    if not found:
        raise ValueError(f"LoRA: no module of the image encoder matches target_modules={cfg.target_modules}")
    names = [n for n, p in encoder.named_parameters() if ".lora_" in n]
    for n, p in encoder.named_parameters():
        p.requires_grad_(".lora_" in n)
    return names


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with every peft LoRA layer merged into its base weight (model untouched).

    Keys 'x.base_layer.weight' + LoRA become 'x.weight' = W + delta, LoRA keys are dropped.
    """
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        prefix = f"{name}." if name else ""
        weight = sd.pop(f"{prefix}base_layer.weight")
        if not module.merged:  # peft already added the delta into the base weight when merged
            for adapter in module.active_adapters:
                weight = weight + module.get_delta_weight(adapter).detach()
        sd[f"{prefix}weight"] = weight
        if f"{prefix}base_layer.bias" in sd:
            sd[f"{prefix}bias"] = sd.pop(f"{prefix}base_layer.bias")
        for key in [k for k in sd if k.startswith(f"{prefix}lora_")]:
            del sd[key]
    return sd
