"""Checkpoint I/O: read SAM weights in every layout users bring, write the official one.

Supported inputs (``.pth`` / ``.pt`` / ``.ckpt`` pickles read with ``weights_only=True``, and
``.safetensors`` files or a Hugging Face model directory holding ``model.safetensors``):

- official ``segment_anything``: a flat state dict with ``image_encoder.`` / ``prompt_encoder.`` /
  ``mask_decoder.`` keys;
- MedSAM-style training checkpoints: ``{"model": state_dict, "optimizer": ..., "epoch": ...}``;
- Lightning: ``{"state_dict": {"<attr>.image_encoder....": ...}, ...}`` (the LightningModule's
  attribute prefix is found and stripped; keys outside the SAM sub-module are dropped);
- DDP: ``module.`` prefixes (possibly nested, in any of the above);
- Hugging Face ``transformers.SamModel`` (``vision_encoder.``, ``shared_image_embedding.`` ...).
"""

from __future__ import annotations

import itertools
import logging
import pickle
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from sam_train.errors import SamTrainError
from sam_train.io import atomic_save_safetensors, atomic_torch_save
from sam_train.models.configs import SAM_CONFIGS, SamConfig, TinySamConfig

PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
HF_MARKERS = ("vision_encoder.", "shared_image_embedding.")
# MobileSAM's file keeps TinyViT's ImageNet classifier, which SAM never runs.
CLASSIFIER_PREFIXES = ("image_encoder.norm_head.", "image_encoder.head.")
SAFETENSORS_SUFFIX = ".safetensors"
_MAX_LISTED = 8  # keys named per category in error messages

StateDict = dict[str, torch.Tensor]
logger = logging.getLogger(__name__)


class CheckpointError(SamTrainError, ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


# ----------------------------------------------------------------------------------- reading
def read_checkpoint_file(path: Path) -> object:
    """Raw content of a checkpoint file: a dict of tensors (safetensors) or the unpickled object.

    Raises CheckpointError naming the file and which of these it is: not a checkpoint at all; a
    truncated or corrupt one; one whose pickle needs arbitrary code (refused: weights_only=True).
    A checkpoint of another model is reported when its keys are checked (`check_state_dict`).
    """
    import zipfile

    if path.is_dir():
        candidate = path / "model.safetensors"
        if not candidate.is_file():
            raise CheckpointError(f"{path}: a directory without model.safetensors (Hugging Face layout expected)")
        path = candidate
    if not path.is_file():
        raise FileNotFoundError(f"SAM checkpoint not found: {path}")
    # Sniff the format first: torch's weights-only unpickler refuses random bytes with the same message as a
    # pickle that needs code, so unpickling errors alone cannot tell "not a checkpoint" from "unsafe".
    with open(path, "rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    is_zip = head.startswith(b"PK\x03\x04")  # torch.save since 1.6
    is_pickle = head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5  # legacy torch.save: pickle protocol
    is_safetensors = len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < size
    expected = "expected a torch checkpoint (.pth / .pt / .ckpt from torch.save) or a .safetensors file"
    if not head:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint; {expected}")
    if not (is_zip or is_pickle or is_safetensors):
        raise CheckpointError(f"{path}: not a checkpoint (unrecognised content, first bytes {head[:8]!r}); {expected}")
    if is_zip and not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: truncated or corrupt checkpoint (a torch zip archive without its end, {size} bytes: an "
            f"interrupted copy or download?); copy it again from the source"
        )
    if is_safetensors or path.suffix == SAFETENSORS_SUFFIX:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({err})") from err

    def reason(err: Exception) -> str:  # what torch's message names (its first lines are advice)
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
        if found := re.search(r"Unsupported global: GLOBAL (\S+)", text):
            return f"unsupported global {found.group(1)}"
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return next((line for line in lines if "Unsupported" in line), lines[-1] if lines else type(err).__name__)

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported" not in str(err):
            message = f"{path}: truncated or corrupt checkpoint (unreadable pickle: {reason(err)})"
            raise CheckpointError(message) from err
        # torch's weights-only unpickler refuses globals it does not know (custom classes, functions):
        # loading those would run arbitrary code from the file.
        raise CheckpointError(
            f"{path}: refused to load, the pickle needs arbitrary code to unpickle ({reason(err)}). weights_only=True "
            f"allows only tensors and plain containers, since untrusted pickles can execute code; re-save it as a "
            f"plain state dict or as .safetensors"
        ) from err
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as err:  # members / storages cut short
        raise CheckpointError(
            f"{path}: truncated or corrupt checkpoint ({type(err).__name__}: {str(err).strip() or 'unexpected end'}); "
            f"copy it again from the source"
        ) from err


# ----------------------------------------------------------------------------------- wrapper names
# Names wrappers insert into parameter / state-dict keys: DDP (`module.`), Lightning Fabric
# (`_forward_module.`), torch.compile (`_orig_mod.`), FSDP (`_fsdp_wrapped_module.`) and activation
# checkpointing (`_checkpoint_wrapped_module.`).
WRAPPER_NAMES = ("module", "_forward_module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
_WRAPPER_PART = re.compile(r"(?:(?<=\.)|^)(?:" + "|".join(WRAPPER_NAMES) + r")\.")


def strip_wrapper_names(key: str) -> str:
    """`key` without the components wrappers insert (see WRAPPER_NAMES), wherever they stand:
    'module._orig_mod.image_encoder.x' -> 'image_encoder.x', 'model.module.' -> 'model.'."""
    return _WRAPPER_PART.sub("", key)


def _unwrap(obj: object, path: Path) -> tuple[Mapping[str, object], list[str]]:
    """Descend into training-checkpoint containers until a mapping of tensors is reached."""
    steps: list[str] = []
    for _ in range(4):  # containers nest at most a few levels ({"state_dict": {"model": ...}} is unusual)
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj, steps
        for key, name in (("state_dict", "lightning"), ("model", "medsam"), ("module", "wrapped")):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                steps.append(name)
                break
        else:
            raise CheckpointError(
                f"{path}: no state dict found; top-level keys are {sorted(map(str, obj))[:_MAX_LISTED]} "
                f"(expected tensors, or one of 'state_dict', 'model', 'module')"
            )
    raise CheckpointError(f"{path}: checkpoint containers nested too deeply")


def _sam_prefix(keys: list[str], markers: tuple[str, ...]) -> str | None:
    """The most common text before a SAM part name (e.g. 'model.module.'), '' for none, None if absent."""
    pattern = re.compile(r"^(.*?)(?:" + "|".join(re.escape(m) for m in markers) + ")")
    prefixes = Counter(
        m.group(1) for k in keys if (m := pattern.match(k)) and (not m.group(1) or m.group(1)[-1] == ".")
    )
    return prefixes.most_common(1)[0][0] if prefixes else None


def _hf_mlp_renames(keys: list[str]) -> dict[str, str]:
    """HF splits SAM's MLP layers into proj_in / layers.i / proj_out: map them back to layers.0..n-1."""
    renames: dict[str, str] = {}
    hidden: dict[str, set[int]] = {}
    for key in keys:
        if m := re.match(r"(.*\.)(?:proj_in|proj_out|layers\.(\d+))\.(weight|bias)$", key):
            if "mlps" in key or "iou_prediction_head" in key:
                hidden.setdefault(m.group(1), set())
                if m.group(2) is not None:
                    hidden[m.group(1)].add(int(m.group(2)))
    for prefix, idx in hidden.items():
        last = len(idx) + 1
        for kind in ("weight", "bias"):
            renames[f"{prefix}proj_in.{kind}"] = f"{prefix}layers.0.{kind}"
            renames[f"{prefix}proj_out.{kind}"] = f"{prefix}layers.{last}.{kind}"
            for i in idx:
                renames[f"{prefix}layers.{i}.{kind}"] = f"{prefix}layers.{i + 1}.{kind}"
    return renames


# HF name -> official name, applied in order to each key (after the MLP renames).
_HF_RULES: tuple[tuple[str, str], ...] = (
    (r"^shared_image_embedding\.positional_embedding$", "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    (r"^vision_encoder\.", "image_encoder."),
    (r"^image_encoder\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
    (r"^image_encoder\.layers\.", "image_encoder.blocks."),
    (r"\.layer_norm([12])\.(weight|bias)$", r".norm\1.\2"),
    (r"^image_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
    (r"^image_encoder\.neck\.norm1\.", "image_encoder.neck.1."),
    (r"^image_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
    (r"^image_encoder\.neck\.norm2\.", "image_encoder.neck.3."),
    (r"^prompt_encoder\.point_embed\.", "prompt_encoder.point_embeddings."),
    (r"^prompt_encoder\.mask_embed\.conv1\.", "prompt_encoder.mask_downscaling.0."),
    (r"^prompt_encoder\.mask_embed\.norm1\.", "prompt_encoder.mask_downscaling.1."),
    (r"^prompt_encoder\.mask_embed\.conv2\.", "prompt_encoder.mask_downscaling.3."),
    (r"^prompt_encoder\.mask_embed\.norm2\.", "prompt_encoder.mask_downscaling.4."),
    (r"^prompt_encoder\.mask_embed\.conv3\.", "prompt_encoder.mask_downscaling.6."),
    (r"\.layer_norm([34])\.(weight|bias)$", r".norm\1.\2"),
    (r"\.layer_norm_final_attn\.", ".norm_final_attn."),
    (r"^mask_decoder\.upscale_conv1\.", "mask_decoder.output_upscaling.0."),
    (r"^mask_decoder\.upscale_layer_norm\.", "mask_decoder.output_upscaling.1."),
    (r"^mask_decoder\.upscale_conv2\.", "mask_decoder.output_upscaling.3."),
)


def hf_to_official(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename a Hugging Face `SamModel` state dict to the official segment_anything layout."""
    # The prompt encoder holds a tied copy of the shared positional matrix; the official model has one.
    sd = {k: v for k, v in state_dict.items() if k != "prompt_encoder.shared_embedding.positional_embedding"}
    if (
        "shared_image_embedding.positional_embedding" not in sd
        and (tied := state_dict.get("prompt_encoder.shared_embedding.positional_embedding")) is not None
    ):
        sd["shared_image_embedding.positional_embedding"] = tied
    mlp = _hf_mlp_renames(list(sd))
    out: StateDict = {}
    for key, value in sd.items():
        new = mlp.get(key, key)
        for pattern, repl in _HF_RULES:
            new = re.sub(pattern, repl, new)
        out[new] = value
    return out


def load_state_dict_any(path: str | Path) -> tuple[StateDict, str]:
    """Read a SAM checkpoint in any supported layout.

    Returns:
        (state dict in the official layout, detected format), the format being '+'-joined steps such as
        'official', 'medsam', 'lightning+ddp', 'hf', each optionally with '+safetensors'.
    """
    path = Path(path)
    raw = read_checkpoint_file(path)
    sd, steps = _unwrap(raw, path)
    tensors = {str(k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    keys = list(tensors)
    hf = _sam_prefix(keys, HF_MARKERS) is not None and _sam_prefix(keys, ("image_encoder.",)) is None
    markers = HF_MARKERS + PARTS[1:] if hf else PARTS
    prefix = _sam_prefix(keys, markers)
    if prefix is None:
        raise CheckpointError(
            f"{path}: no SAM weights found (no key contains {', '.join(PARTS)} or the Hugging Face "
            f"'vision_encoder.'); first keys: {keys[:_MAX_LISTED]}"
        )
    in_container = bool(steps)
    if prefix:
        if (bare := strip_wrapper_names(prefix)) != prefix:
            steps.append("ddp")
        if bare:
            steps.append(f"prefix={bare!r}")
        # Inside a training container, other attributes (losses, teachers) are not SAM weights: drop them.
        # In a flat file, keep them so a strict load reports them as unexpected.
        tensors = {
            k[len(prefix) :] if k.startswith(prefix) else k: v
            for k, v in tensors.items()
            if k.startswith(prefix) or not in_container
        }
    if hf:
        tensors = hf_to_official(tensors)
        steps.append("hf")
    if dropped := [k for k in tensors if k.startswith(CLASSIFIER_PREFIXES)]:
        logger.info("%s: dropped %d TinyViT classifier key(s) (%s...), unused by SAM", path, len(dropped), dropped[0])
        tensors = {k: v for k, v in tensors.items() if k not in dropped}
    if path.suffix == SAFETENSORS_SUFFIX or path.is_dir():
        steps.append("safetensors")
    fmt = "+".join(s for s in steps if s != "wrapped") or "official"
    if fmt == "safetensors":
        fmt = "official+safetensors"
    return tensors, fmt


# ----------------------------------------------------------------------------------- checking
VIT_STEM = "image_encoder.patch_embed.proj.weight"
TINY_VIT_STEM = "image_encoder.patch_embed.seq.0.c.weight"


def _vit_shape(state_dict: Mapping[str, torch.Tensor]) -> tuple[int, int, int | None]:
    patch = state_dict[VIT_STEM]
    depth = len({k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")})
    pos = state_dict.get("image_encoder.pos_embed")
    return patch.shape[0], depth, pos.shape[1] * patch.shape[-1] if pos is not None else None


def _tiny_vit_shape(state_dict: Mapping[str, torch.Tensor]) -> tuple[int, tuple[int, ...]]:
    """(stem stride: 1 for a 1x1 stem, 4 for 3x3 stride-2 convs; stage widths)."""
    stem_stride = 1 if state_dict[TINY_VIT_STEM].shape[-1] == 1 else 4
    dims: list[int] = []
    for i in itertools.count():
        first = f"image_encoder.layers.{i}.blocks.0."
        w = state_dict.get(first + "conv1.c.weight", state_dict.get(first + "attn.qkv.weight"))
        if w is None:
            return stem_stride, tuple(dims)
        dims.append(w.shape[1])  # input width of the stage's first conv / qkv projection
    raise AssertionError("unreachable")


def guess_sam_size(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The registered model whose encoder family and shapes match the weights.

    ViT: width, depth and input size (falls back to width and depth alone, a size trained at another
    resolution). TinyViT: stem (1x1 = LiteMedSAM, 3x3 stride 2 = MobileSAM) and stage widths. None when
    nothing matches. Works on meta tensors (reads shapes only).
    """
    if VIT_STEM in state_dict:
        dim, depth, img_size = _vit_shape(state_dict)
        vits = {n: c for n, c in SAM_CONFIGS.items() if isinstance(c, SamConfig)}
        same_arch = [n for n, c in vits.items() if (c.encoder_embed_dim, c.encoder_depth) == (dim, depth)]
        exact = [n for n in same_arch if vits[n].img_size == img_size]
        return (exact or same_arch or [None])[0]
    if TINY_VIT_STEM in state_dict:
        stride, dims = _tiny_vit_shape(state_dict)
        tiny = [
            n
            for n, c in SAM_CONFIGS.items()
            if isinstance(c, TinySamConfig) and (c.stem_stride, c.encoder_embed_dims) == (stride, dims)
        ]
        return (tiny or [None])[0]
    return None


def _family(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    if VIT_STEM in state_dict:
        return "ViT"
    if TINY_VIT_STEM in state_dict:
        return f"TinyViT ({'1x1' if _tiny_vit_shape(state_dict)[0] == 1 else '3x3 stride-2'} stem)"
    return None


def _describe(state_dict: Mapping[str, torch.Tensor]) -> str:
    if VIT_STEM in state_dict:
        dim, depth, img_size = _vit_shape(state_dict)
        return f"encoder width {dim}, depth {depth}" + (f", input {img_size} px" if img_size else "")
    if TINY_VIT_STEM in state_dict:
        stride, dims = _tiny_vit_shape(state_dict)
        return f"TinyViT encoder, stage widths {list(dims)}, {'1x1' if stride == 1 else '3x3 stride-2'} stem"
    return "no image encoder"


def _listed(keys: list[str]) -> str:
    more = f" ... (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def check_state_dict(
    model_sd: Mapping[str, torch.Tensor], ckpt_sd: Mapping[str, torch.Tensor], path: str | Path, strict: bool = True
) -> None:
    """Raise one CheckpointError listing missing / unexpected / shape-mismatched keys and the size the file looks like.

    With strict=False only shape mismatches are errors (they cannot be loaded at all).
    """
    missing = sorted(set(model_sd) - set(ckpt_sd))
    unexpected = sorted(set(ckpt_sd) - set(model_sd))
    mismatched = [
        f"{k} {tuple(ckpt_sd[k].shape)} vs model {tuple(model_sd[k].shape)}"
        for k in model_sd
        if k in ckpt_sd and ckpt_sd[k].shape != model_sd[k].shape
    ]
    if not (mismatched or (strict and (missing or unexpected))):
        return
    ckpt_size, model_size = guess_sam_size(ckpt_sd), guess_sam_size(model_sd)
    if (family := _family(ckpt_sd)) is not None and family != _family(model_sd):
        # Another encoder family explains every key: one line saying which model= loads it.
        use = f"use model={ckpt_size}" if ckpt_size else "no registered model has this encoder"
        raise CheckpointError(
            f"{path}: a {family} checkpoint like {ckpt_size or 'no registered model'} ({_describe(ckpt_sd)}), "
            f"but the model is {model_size or 'a custom model'} ({_describe(model_sd)}): {use}"
        )
    size_line = (
        f"  the checkpoint looks like {ckpt_size or 'no registered size'} ({_describe(ckpt_sd)}); "
        f"the model is {model_size or 'a custom size'} ({_describe(model_sd)})"
    )
    # A wrong size explains every key below it: say it first.
    lines = [f"{path}: checkpoint does not fit the model"] + ([size_line] if ckpt_size != model_size else [])
    if strict and missing:
        lines.append(f"  missing {len(missing)} key(s): {_listed(missing)}")
    if strict and unexpected:
        lines.append(f"  unexpected {len(unexpected)} key(s): {_listed(unexpected)}")
    if mismatched:
        lines.append(f"  {len(mismatched)} shape mismatch(es): {_listed(mismatched)}")
    if ckpt_size == model_size:
        lines.append(size_line)
    raise CheckpointError("\n".join(lines))


def load_sam_weights(model: nn.Module, path: str | Path, strict: bool = True) -> str:
    """Load a checkpoint in any supported layout into a `Sam`; returns the detected format.

    Load weights before `apply_finetune` (LoRA / adapters change the module tree).
    Raises CheckpointError naming the file and the offending keys.
    """
    sd, fmt = load_state_dict_any(path)
    model_sd = model.state_dict()
    check_state_dict(model_sd, sd, path, strict=strict)
    model.load_state_dict({k: v for k, v in sd.items() if k in model_sd} if not strict else sd, strict=strict)
    return fmt


# ----------------------------------------------------------------------------------- writing
def save_sam_checkpoint(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write weights in the official flat layout (.safetensors by suffix, else a torch pickle), atomically.

    Accepts a `Sam` or a state dict in any layout `load_state_dict_any` understands after unwrapping
    (prefixes such as 'module.' are stripped). LoRA / adapter models must be exported with
    `sam_train.finetune.merge_and_export_state_dict` first.
    """
    path = Path(path)
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    keys = list(sd)
    prefix = _sam_prefix(keys, PARTS) or ""
    sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    foreign = [k for k in sd if not k.startswith(PARTS) or ".lora_" in k or ".base_layer." in k or "_adapter." in k]
    if foreign:
        raise CheckpointError(
            f"{path}: not the official layout, keys {_listed(foreign)}; merge LoRA / drop adapters with "
            f"sam_train.finetune.merge_and_export_state_dict(model) before saving"
        )
    # safetensors refuses views sharing storage; contiguous CPU copies are what both formats want.
    sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    # atomic: readers never see a half-written checkpoint
    if path.suffix == SAFETENSORS_SUFFIX:
        return atomic_save_safetensors(sd, path, metadata={"format": "pt", "layout": "segment_anything"})
    return atomic_torch_save(sd, path)
