"""Pure tensor functions of Alice (Jiang et al., ICCV 2023, arXiv 2302.05615).

Tensor in, tensor out, no parameters: the DINO-style self-distillation cross-entropy with a
centred, sharpened teacher, the teacher-temperature warm-up, the centre update, random patch
masks and the masked reconstruction loss. The objective (:mod:`anatomap.objectives.alice`)
holds the parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def teacher_temperature(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear warm-up of the teacher temperature from ``start`` (step 0) to ``end`` (step
    ``warmup_steps`` and after), as DINO and Alice do."""
    if warmup_steps <= 0:
        return end
    frac = min(max(step / warmup_steps, 0.0), 1.0)
    return start + (end - start) * frac


def teacher_probs(
    teacher_logits: torch.Tensor, center: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Centred and sharpened teacher distribution ``softmax((t - c) / T)`` (no gradient)."""
    return F.softmax((teacher_logits.detach().float() - center) / temperature, dim=-1)


def distillation_ce(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    student_temperature: float = 0.1,
    teacher_temperature: float = 0.01,
) -> torch.Tensor:
    """DINO cross-entropy ``-sum_k p_t log p_s`` averaged over rows.

    ``student_logits`` / ``teacher_logits`` ``[..., K]`` (row i of one is paired with row i of
    the other); ``center`` ``[K]``. The teacher side is centred, sharpened and detached.
    """
    p_t = teacher_probs(teacher_logits, center, teacher_temperature)
    log_p_s = F.log_softmax(student_logits.float() / student_temperature, dim=-1)
    return -(p_t * log_p_s).sum(-1).mean()


@torch.no_grad()
def updated_center(
    center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float
) -> torch.Tensor:
    """``momentum * c + (1 - momentum) * mean(teacher logits)`` over every leading row."""
    mean = teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1]).mean(0)
    return center * momentum + mean * (1.0 - momentum)


def random_patch_mask(
    batch: int,
    grid: tuple[int, ...],
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Boolean ``[batch, *grid]`` mask with exactly ``round(ratio * N)`` patches masked per
    sample (``N`` patches), drawn uniformly; at least one patch stays visible when ratio < 1."""
    n = 1
    for g in grid:
        n *= int(g)
    k = round(ratio * n)
    if ratio < 1.0:
        k = min(k, n - 1)
    keys = torch.rand(batch, n, generator=generator)
    rank = keys.argsort(dim=1).argsort(dim=1)
    return (rank < k).reshape(batch, *grid).to(device)


def mask_to_voxels(mask: torch.Tensor, patch: int) -> torch.Tensor:
    """Patch mask ``[B, *grid]`` -> voxel mask ``[B, *(grid * patch)]``."""
    out = mask
    for axis in range(1, mask.ndim):
        out = out.repeat_interleave(patch, dim=axis)
    return out


def apply_mask(
    images: torch.Tensor, mask: torch.Tensor, patch: int, value: torch.Tensor
) -> torch.Tensor:
    """Replace masked patches of ``images [B, C, *S]`` by ``value [C]`` (a learnable mask
    value per channel); ``mask [B, *grid]`` with ``grid = S / patch``."""
    vox = mask_to_voxels(mask, patch)[:, None].to(images.dtype)
    fill = value.to(images.dtype).view(1, -1, *([1] * (images.ndim - 2)))
    return images * (1 - vox) + fill * vox


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, C, *S]`` -> ``[B, C * patch^d, *grid]``: each patch's voxels as channels (the
    layout of a stride-``patch`` 1x1 reconstruction head, as SimMIM's pixel shuffle)."""
    b, c = images.shape[:2]
    spatial = images.shape[2:]
    d = len(spatial)
    grid = [s // patch for s in spatial]
    shape = [b, c]
    for g in grid:
        shape += [g, patch]
    x = images.reshape(shape)
    # [B, C, g0, p0, g1, p1, (g2, p2)] -> [B, C, p0, p1, (p2), g0, g1, (g2)]
    grid_axes = [2 + 2 * i for i in range(d)]
    patch_axes = [3 + 2 * i for i in range(d)]
    x = x.permute(0, 1, *patch_axes, *grid_axes)
    return x.reshape(b, c * patch**d, *grid)


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over masked patches only: ``prediction``/``target``
    ``[B, P, *grid]``, ``mask [B, *grid]``."""
    m = mask[:, None].to(prediction.dtype)
    err = (prediction.float() - target.float()).pow(2) * m
    return err.sum() / (m.sum() * prediction.shape[1]).clamp_min(1.0)
