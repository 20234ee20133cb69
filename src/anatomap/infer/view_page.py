"""The page of ``anatomap view``: display images as gzipped NIfTI, and one self-contained HTML
file (NiiVue, the viewer's script and its data inlined; nothing fetched at view time).

The page is ``assets/view.html`` with three slots filled in: the data (JSON in a
``<script type="application/json">``), the vendored NiiVue bundle (``assets/niivue/``, its
README names the version and origin) and ``assets/view.js``.
"""

from __future__ import annotations

import base64
import gzip
import html
import json
import math
import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from anatomap.data.volume import Volume
from anatomap.errors import AnatomapError

ASSETS = Path(__file__).resolve().parent / "assets"
NIIVUE = ASSETS / "niivue" / "niivue.umd.js"
NIIVUE_VERSION = "0.69.0"
MAX_DISPLAY_VOXELS = 128**3
"""Display images above this many voxels are averaged down by an integer factor."""
MAX_PAGE_BYTES = 256 * 2**20
"""The embeddings a page may carry (base64): a browser holds them four times over as floats."""

_SLOT = re.compile(r"<!--ANATOMAP:(\w+)-->")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def nifti_gz(array: np.ndarray, affine: np.ndarray) -> str:
    """Base64 of a gzipped NIfTI-1 file of ``array`` (sform and qform both ``affine``, code
    1: NiiVue reads either); the same bytes for the same input (gzip time stamp 0)."""
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, np.float64))
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm")
    return b64(gzip.compress(img.to_bytes(), compresslevel=6, mtime=0))


def downsample(
    array: np.ndarray, affine: np.ndarray, max_voxels: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """``array`` averaged over ``f x f x f`` blocks (edges padded by repetition), with the
    smallest integer ``f`` that brings it to at most ``max_voxels``; its affine (block ``o``
    is centred on source voxel ``f*o + (f-1)/2``) and ``f``."""
    shape = np.asarray(array.shape[:3])
    f = 1
    while math.prod(int(n) for n in -(-shape // f)) > max_voxels:
        f += 1
    if f == 1:
        return array, affine, 1
    n = -(-shape // f)
    pad = [(0, int(m * f - s)) for m, s in zip(n, shape, strict=True)]
    a = np.pad(array, pad, mode="edge").reshape(n[0], f, n[1], f, n[2], f).mean((1, 3, 5))
    step = np.diag([float(f)] * 3 + [1.0])
    step[:3, 3] = (f - 1) / 2
    return a.astype(np.float32), np.asarray(affine, np.float64) @ step, f


def display_image(volume: Volume, max_voxels: int = MAX_DISPLAY_VOXELS) -> dict[str, Any]:
    """A scan as the page shows it: averaged down to at most ``max_voxels`` voxels and
    scaled to 8 bits between its 0.5th and 99.5th percentiles. Returns the page's entry:
    ``image`` (base64 .nii.gz), ``affine``, ``inv``, ``shape``, ``factor`` (the voxel size
    relative to the scan)."""
    arr = np.asarray(volume.array, np.float32)
    if arr.ndim != 3:
        raise AnatomapError(f"{volume.path or 'image'}: the viewer shows 3-D images only")
    small, affine, factor = downsample(np.nan_to_num(arr), volume.affine, max_voxels)
    lo, hi = np.percentile(small, [0.5, 99.5])
    hi = hi if hi > lo else lo + 1.0
    u8 = np.round((small - lo) / (hi - lo) * 255.0).clip(0, 255).astype(np.uint8)
    return {
        "image": nifti_gz(u8, affine),
        "affine": np.asarray(affine, np.float64).tolist(),
        "inv": np.linalg.inv(affine).tolist(),
        "shape": list(u8.shape),
        "factor": factor,
    }


def _script(text: str) -> str:
    """Text that can stand inside ``<script>``: no ``</script`` (JSON: ``<\\/`` is ``</``)."""
    return text.replace("</", "<\\/")


def render_page(title: str, data: dict[str, Any]) -> str:
    """The viewer page: ``assets/view.html`` with its title, data, NiiVue and script."""
    try:
        page = (ASSETS / "view.html").read_text(encoding="utf-8")
        niivue = NIIVUE.read_text(encoding="utf-8")
        script = (ASSETS / "view.js").read_text(encoding="utf-8")
    except OSError as exc:
        raise AnatomapError(
            f"{exc.filename}: viewer asset missing ({exc.strerror}); reinstall anatomap"
        ) from None
    data = {**data, "niivue_version": NIIVUE_VERSION}
    slots = {
        "TITLE": html.escape(title),
        "DATA": _script(json.dumps(data, separators=(",", ":"), allow_nan=False)),
        "NIIVUE": niivue.replace("</script", "<\\/script"),
        "SCRIPT": _script(script),
    }
    return _SLOT.sub(lambda m: slots[m.group(1)], page)
