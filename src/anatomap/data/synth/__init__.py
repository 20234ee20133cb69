"""Domain-randomised synthetic subjects from label maps, with exact correspondences.

Every subject is drawn from one :class:`~anatomap.data.synth.source.LabelSource` (the MNI152
brain by default, or a user's label maps) as SynthSeg (Billot et al., MedIA 2023) and
SynthMorph (Hoffmann et al., IEEE TMI 2022) do: a random global affine and a smooth
diffeomorphic deformation (a stationary velocity field at several scales, integrated by
scaling and squaring), a random contrast (:mod:`anatomap.data.synth.render`), a random
acquisition (bias, resolution and slice thickness, blur, noise, gamma), field of view and
voxel orientation. Only the anatomy stays constant. Each subject carries its exact world
maps both ways (:meth:`SynthSubject.to_template`, :meth:`SynthSubject.to_subject`), so
targets and ground truth come from geometry.

Two modes: :class:`SynthViewDataset` generates one subject per sample index in DataLoader
workers (seeded from the index: exact resume stays exact) and cuts views with the sampler's
own :func:`~anatomap.data.sampler.sample_views`;
:func:`~anatomap.data.synth.cohort.write_synth_cohort` writes a cohort of files that
``anatomap data index`` / ``data cache`` read like a user's folder. Subject ``i`` of seed
``s`` is the same in both: ``synth_subject(source, config, [s, i])``.

Modules: ``config`` (:class:`SynthConfig`), ``source`` (:class:`LabelSource`), ``render``
(contrasts and acquisition artefacts), ``subject`` (:func:`synth_subject`,
:class:`SynthViewDataset`), ``cohort`` (:func:`write_synth_cohort`). See docs/synthetic.md.
"""

from anatomap.data.synth.cohort import SynthCohort, load_synth_map, write_synth_cohort
from anatomap.data.synth.config import FAMILIES, SynthConfig
from anatomap.data.synth.source import LabelSource
from anatomap.data.synth.subject import SynthParams, SynthSubject, SynthViewDataset, synth_subject

__all__ = [
    "FAMILIES",
    "LabelSource",
    "SynthCohort",
    "SynthConfig",
    "SynthParams",
    "SynthSubject",
    "SynthViewDataset",
    "load_synth_map",
    "synth_subject",
    "write_synth_cohort",
]
