"""ANTs SyN registration as a landmark :class:`~anatomap.eval.landmarks.Matcher` (antspyx).

Symmetric normalisation (Avants et al., *Medical Image Analysis* 2008), the field's reference
for deformable registration, through ``ants.registration`` (rigid + affine + SyN by default;
Mattes mutual information for every stage, ``syn_metric``/``aff_metric``, since template and
target may have different contrasts). Conventions as in :mod:`anatomap.eval.registration`:
the TEMPLATE is the fixed image, the TARGET the moving one; ANTs' forward transforms pull the
moving image into the fixed space, so as *point* maps they carry fixed (template) points into
the moving (target) space. ANTs' physical space is LPS+; points go RAS -> LPS and back.

antspyx is optional: it pins ``numpy<2.4`` and ``scipy<1.16`` (0.6.3), older than this
project's pins, so it is not in the requirements; :func:`ants_available` says whether it can
be imported (for example from a ``pip install --target DIR --no-deps antspyx`` on
``PYTHONPATH``).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from anatomap.data.cache import CachedSubject
from anatomap.eval.landmarks import MatchResult
from anatomap.eval.registration import subject_to_sitk

_FLIP = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS for points


def ants_available() -> bool:
    """Whether ``import ants`` works here."""
    try:
        import ants  # noqa: F401
    except Exception:  # ImportError, or a binary built against another numpy
        return False
    return True


def subject_to_ants(subject: CachedSubject, channel: int = 0) -> Any:
    """A cached subject's channel as an ANTs image (LPS geometry, via SimpleITK)."""
    import ants
    import SimpleITK as sitk

    img = subject_to_sitk(subject, channel)
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0).astype(np.float32)  # [z,y,x]->[x,y,z]
    direction = np.asarray(img.GetDirection(), np.float64).reshape(3, 3)
    return ants.from_numpy(
        np.ascontiguousarray(arr),
        origin=list(img.GetOrigin()),
        spacing=list(img.GetSpacing()),
        direction=direction,
    )


@dataclass
class SynRegistration:
    """``ants.registration(fixed=template, moving=target, type_of_transform=...)``; template
    points pushed through the forward transforms. ``threads`` caps ITK's threads."""

    type_of_transform: str = "SyN"
    metric: str = "mattes"
    threads: int = 2
    seed: int = 0
    last_info: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    name = "ANTs SyN"

    def prepare(self, subject: CachedSubject) -> Any:
        return subject_to_ants(subject)

    def match(
        self,
        template: CachedSubject,
        template_state: Any,
        points_mm: np.ndarray,
        target: CachedSubject,
        target_state: Any,
    ) -> MatchResult:
        import ants
        import pandas as pd

        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(int(self.threads))
        fixed = template_state if template_state is not None else self.prepare(template)
        moving = target_state if target_state is not None else self.prepare(target)
        with tempfile.TemporaryDirectory(prefix="anatomap-ants-") as tmp:
            reg = ants.registration(
                fixed,
                moving,
                type_of_transform=self.type_of_transform,
                aff_metric=self.metric,
                syn_metric=self.metric,
                random_seed=int(self.seed) + 1,
                outprefix=os.path.join(tmp, "reg_"),
            )
            pts = np.asarray(points_mm, np.float64).reshape(-1, 3) * _FLIP
            frame = pd.DataFrame(pts, columns=["x", "y", "z"])
            out = ants.apply_transforms_to_points(3, frame, reg["fwdtransforms"])
            moved = out[["x", "y", "z"]].to_numpy(np.float64) * _FLIP
        return MatchResult(moved, np.full(len(moved), np.nan))
