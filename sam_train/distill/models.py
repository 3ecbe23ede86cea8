"""Teacher and student SAMs for distillation: shape checks, freezing, the teacher's decoder in the student.

The student is a whole `Sam` from the start: its own image encoder, and the teacher's prompt encoder and
mask decoder copied in (frozen). Whatever a stage trains, the student is therefore always a complete SAM
checkpoint in the official layout, which `build_sam(<student name>, checkpoint=...)` and every command load.
"""

from __future__ import annotations

import torch
from torch import nn

from sam_train.errors import SamTrainError
from sam_train.models.sam import Sam


def embedding_shape(model: Sam) -> tuple[int, int, int]:
    """(C, h, w) of `model.encode` output: the grid and width its prompt encoder was built for."""
    h, w = model.prompt_encoder.image_embedding_size
    return int(model.prompt_encoder.embed_dim), int(h), int(w)


def check_compatible(teacher: Sam, student: Sam, *, teacher_key: str = "teacher", student_key: str = "student") -> None:
    """One-line error unless the student's image embedding has the teacher's shape at the same input size
    (the teacher's decoder then reads the student's embeddings as they are)."""
    t_shape, s_shape = embedding_shape(teacher), embedding_shape(student)
    if teacher.img_size != student.img_size or t_shape != s_shape:
        raise SamTrainError(
            f"{student_key}: embedding {list(s_shape)} at {student.img_size} px does not match the {teacher_key}'s "
            f"{list(t_shape)} at {teacher.img_size} px; choose a student with the teacher's input size, grid and "
            f"width (e.g. {student_key}.img_size={teacher.img_size}) or a registered student of that shape"
        )


def freeze(module: nn.Module) -> nn.Module:
    """No gradients and eval mode (the teacher, and the student's copied decoder)."""
    module.requires_grad_(False)
    return module.eval()


def with_teacher_decoder(student: Sam, teacher: Sam, *, trainable: bool = False) -> Sam:
    """Copy the teacher's prompt encoder and mask decoder into `student` (frozen unless `trainable`).

    The student keeps its own image encoder; it is returned (modified in place).
    """
    check_compatible(teacher, student)
    with torch.no_grad():
        student.prompt_encoder.load_state_dict(teacher.prompt_encoder.state_dict())
        student.mask_decoder.load_state_dict(teacher.mask_decoder.state_dict())
    for part in (student.prompt_encoder, student.mask_decoder):
        part.requires_grad_(trainable)
    return student


@torch.no_grad()
def teacher_embeddings(teacher: Sam, images: torch.Tensor) -> torch.Tensor:
    """[B, 3, S, S] uint8 images (SamTransform output) -> the frozen teacher's [B, C, h, w] embeddings."""
    was_training = teacher.training
    teacher.eval()
    try:
        return teacher.encode(teacher.preprocess(images))
    finally:
        teacher.train(was_training)
