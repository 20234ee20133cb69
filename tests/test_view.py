"""``anatomap view``: the page is one self-contained HTML file of bounded size; the reduced,
quantised embeddings it carries round-trip; bad inputs are one line; and in headless Chromium
the page loads without console errors, both volumes render, and a click on a template point
moves the target crosshair to the match that ``match_points`` finds on the same reduced
embeddings (within one fine voxel)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anatomap import geometry
from anatomap.checkpoint import save_checkpoint
from anatomap.cli.report import run_command
from anatomap.cli.view import _add_view, write_match_view
from anatomap.data.phantoms import mri_phantom
from anatomap.errors import AnatomapError
from anatomap.infer.embed import DenseEmbedding, DenseModel, load_or_embed
from anatomap.infer.match import MatchResult, match_points
from anatomap.infer.view import (
    ViewScan,
    agreement,
    build_view,
    reduce_embeddings,
    view_matches,
    write_view,
)
from anatomap.infer.view_page import NIIVUE, NIIVUE_VERSION, downsample
from anatomap.models.encoders import EncoderSpec, build_encoder
from anatomap.objectives.registry import objective_config
from anatomap.objectives.sam import SAM

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [  # WebGL 2 through SwiftShader (software), no GPU needed
    "--no-sandbox",
    "--disable-gpu",
    "--enable-unsafe-swiftshader",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
COMPONENTS = (8, 8)  # of 16 dimensions: the page really is reduced
POINTS = np.array([[0.0, 0.0, 0.0], [10.0, -8.0, 6.0], [-14.0, 10.0, -4.0], [6.0, 14.0, 8.0]])
NIIVUE_BYTES = NIIVUE.stat().st_size


def _save_scan(path: Path, vol: object) -> Path:
    nib.save(nib.Nifti1Image(vol.array, vol.affine), str(path))  # type: ignore[attr-defined]
    return path


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """An untrained tiny SAM checkpoint, two MR-like phantoms (the target in LPS order and
    shifted), their saved embeddings and a points CSV."""
    root = tmp_path_factory.mktemp("view")
    torch.manual_seed(0)
    enc = build_encoder(EncoderSpec("small_cnn", 3, 1, 16, {"channels": [8, 16, 32]}))
    params = objective_config({"name": "sam", "embed_dim": 16, "fpn_channels": 8})
    meta = {
        "objective": "sam",
        "objective_config": params.model_dump(mode="json"),
        "data": {"spacing": 2.0, "modalities": ["MR"], "preprocessing": {"*": {"kind": "mri"}}},
        "step": 0,
    }
    ckpt = save_checkpoint(root / "ckpt", enc, SAM(params, enc), meta)
    template = _save_scan(root / "template.nii.gz", mri_phantom((40, 40, 36), (2, 2, 2), 0))
    target = _save_scan(
        root / "target.nii.gz",
        mri_phantom((38, 42, 34), (2, 2, 2), 1, orientation="LPS", center=(-4.0, 18.0, 26.0)),
    )
    model = DenseModel.from_checkpoint(ckpt)
    embs = []
    for scan in (template, target):
        emb = load_or_embed(model, scan, device="cpu")
        embs.append(emb.save(root / scan.name.replace(".nii.gz", ".emb.safetensors")))
    centre = geometry.box_center(nib.load(template).affine, (40, 40, 36))
    pts = POINTS + np.asarray(centre)
    csv = root / "points.csv"
    csv.write_text(
        "name,x,y,z\n" + "".join(f"p{i},{x},{y},{z}\n" for i, (x, y, z) in enumerate(pts))
    )
    return SimpleNamespace(
        root=root, ckpt=ckpt, model=model, template=template, target=target, embs=embs,
        points=pts, csv=csv,
    )  # fmt: skip


@pytest.fixture(scope="module")
def page(case: SimpleNamespace) -> Path:
    """The page of the saved embeddings: targets = the target and the template itself."""
    t_emb, g_emb = case.embs
    out = case.root / "view.html"
    return build_view(
        case.model,
        t_emb,
        [g_emb, t_emb],
        case.csv,
        out,
        embedding={"device": "cpu"},
        components=COMPONENTS,
    )


def _data(page: Path) -> dict:
    text = page.read_text()
    m = re.search(r'<script type="application/json" id="anatomap-data">(.*?)</script>', text, re.S)
    assert m is not None
    return json.loads(m.group(1))


# -- the page ---------------------------------------------------------------------------------


def test_page_is_self_contained_and_bounded(page: Path) -> None:
    text = page.read_text()
    assert not re.search(r"""<(script|link|img|iframe)[^>]*\s(src|href)\s*=""", text, re.I)
    assert "<link" not in text and "@import" not in text
    assert text.count("</script>") == 3  # data, NiiVue, the viewer: all inline
    data = _data(page)
    assert data["niivue_version"] == NIIVUE_VERSION
    assert [t["name"] for t in data["targets"]] == [
        "target.emb.safetensors",
        "template.emb.safetensors",
    ]
    assert data["template"]["shown"] == "image"  # the scan the saved embedding names
    assert data["template"]["coarse"]["k"] == COMPONENTS[0] and data["template"]["fine"]["k"] == 8
    assert data["points"]["names"] == ["p0", "p1", "p2", "p3"]
    assert data["colour_by"] == "score" and data["calibration"] is None
    scans = [data["template"], *data["targets"]]
    codes = sum(math.prod(s[lv]["shape"]) * s[lv]["k"] for s in scans for lv in ("coarse", "fine"))
    images = sum(math.prod(s["shape"]) for s in scans)  # uint8, gzipped: at most this
    extra = page.stat().st_size - NIIVUE_BYTES  # the rest: base64 (4/3) plus 60 kB of page
    assert 0 < extra < 4 / 3 * (codes + images) + 60_000, extra


def test_quantisation_round_trip() -> None:
    rng = torch.Generator().manual_seed(0)
    maps = [F.normalize(torch.randn(16, 6, 5, 4, generator=rng), dim=0) for _ in range(2)]
    embs = [DenseEmbedding(m[:, ::2, ::2, ::2], m, np.eye(4), np.eye(4)) for m in maps]
    red = reduce_embeddings(embs, (16, 16))  # every dimension kept: only int8 is lossy
    for lv in ("coarse", "fine"):
        b = red.basis[lv]
        assert np.allclose(b.T @ b, np.eye(16), atol=1e-9)
        for i, e in enumerate(embs):
            codes = red.codes[i][lv]
            assert codes.dtype == np.int8 and np.abs(codes.astype(int)).max() <= 127
            full = getattr(e, lv).movedim(0, -1).double().numpy() @ b  # unit vectors, rotated
            err = np.abs(red.values(i, lv) - full)
            assert (err <= red.scale[lv] / 2 + 1e-6).all()  # half a quantisation step
            dots = red.values(i, lv).reshape(-1, 16) @ red.values(0, lv).reshape(-1, 16).T
            ref = (
                full.reshape(-1, 16)
                @ (getattr(embs[0], lv).movedim(0, -1).double().numpy() @ b).reshape(-1, 16).T
            )
            assert np.abs(dots - ref).max() < 0.03
    few = reduce_embeddings(embs, (4, 4))
    v = few.values(1, "fine")
    assert v.shape == (6, 5, 4, 4)
    assert np.allclose(np.linalg.norm(v, axis=-1), 1.0, atol=0.03)  # re-normalised


def _fourier(
    affine: np.ndarray, shape: tuple[int, ...], stride: int, freqs: list[float]
) -> torch.Tensor:
    w = torch.as_tensor(geometry.world_grid(geometry.feature_affine(affine, stride), shape))
    feats = [
        f(w[..., a] * fr * 2 * math.pi)
        for a in range(3)
        for fr in freqs
        for f in (torch.sin, torch.cos)
    ]
    return F.normalize(torch.stack(feats).float(), dim=0)


def _position_embedding(affine: np.ndarray, shape: tuple[int, ...]) -> DenseEmbedding:
    """Maps whose vectors encode world position (as in tests/test_sam.py)."""
    cs, fs = tuple(math.ceil(n / 8) for n in shape), tuple(math.ceil(n / 2) for n in shape)
    return DenseEmbedding(
        _fourier(affine, cs, 8, [1 / 300.0, 1 / 150.0]),
        _fourier(affine, fs, 2, [1 / 60.0, 1 / 25.0]),
        geometry.feature_affine(affine, 8),
        geometry.feature_affine(affine, 2),
        image_shape=shape,
        image_affine=affine,
    )


def test_reduced_matches_agree_with_full_precision_on_clear_peaks() -> None:
    a = np.diag([2.0, 2.0, 2.0, 1.0])
    a[:3, 3] = [-40, -50, -30]
    b = np.diag([-2.0, 2.0, 2.0, 1.0])
    b[:3, 3] = [38, -44, -36]
    template, target = _position_embedding(a, (40, 48, 36)), _position_embedding(b, (40, 44, 34))
    pts = np.array([[0.0, 0.0, 0.0], [10.0, -20.0, 5.0], [-15.0, 12.0, -8.0]])
    found = agreement(template, target, pts, components=(12, 12))
    assert found["within_one_voxel"] == 1.0 and found["max_mm"] <= 4 * math.sqrt(3)


def test_downsampled_display_keeps_the_world_frame() -> None:
    arr = np.arange(10 * 9 * 7, dtype=np.float32).reshape(10, 9, 7)
    aff = np.diag([1.0, 1.5, 2.0, 1.0])
    aff[:3, 3] = [5, -3, 7]
    small, affine, f = downsample(arr, aff, 200)
    assert f == 2 and small.shape == (5, 5, 4)
    assert small[0, 0, 0] == pytest.approx(arr[:2, :2, :2].mean())
    centre = geometry.voxel_to_world(aff, np.array([0.5, 0.5, 0.5]))  # of the first block
    assert np.allclose(geometry.voxel_to_world(affine, np.zeros(3)), centre)
    assert downsample(arr, aff, 10**6)[2] == 1


def _view_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anatomap")
    _add_view(parser.add_subparsers(dest="command"))
    return parser


def _cli(argv: list[str]) -> tuple[int, str, str]:
    args = _view_parser().parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = run_command(args.func, args)
    return code, out.getvalue(), err.getvalue()


def test_cli_writes_the_page(case: SimpleNamespace, tmp_path: Path) -> None:
    base = ["view", str(case.ckpt), str(case.target), "--template", str(case.template)]
    code, out, err = _cli([*base, "--points", str(case.csv), "--out", str(tmp_path / "v.html"),
                           "--components", "4", "--device", "cpu"])  # fmt: skip
    assert code == 0, err
    assert out.startswith(f"{tmp_path / 'v.html'}: 1 target(s)") and "MB" in out
    assert _data(tmp_path / "v.html")["targets"][0]["fine"]["k"] == 4
    code, out, err = _cli([*base, "--points", str(case.csv), "--out", str(tmp_path / "q.html"),
                           "--device", "cpu", "--quiet"])  # fmt: skip
    assert code == 0 and (tmp_path / "q.html").is_file()
    assert out.startswith(str(tmp_path / "q.html")) and err == ""  # --quiet: no progress bars


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--out": "view.png"}, "view.png: the viewer is an HTML page"),
        ({"--points": "missing.csv"}, "missing.csv"),
        ({"--components": "0"}, "components (0, 0): must be two integers >= 1"),
    ],
)
def test_cli_bad_inputs_are_one_line(
    case: SimpleNamespace, tmp_path: Path, change: dict[str, str], message: str
) -> None:
    opts = {"--points": str(case.csv), "--out": str(tmp_path / "v.html"), "--device": "cpu"}
    opts.update({k: str(tmp_path / v) if "." in v else v for k, v in change.items()})
    argv = ["view", str(case.ckpt), str(case.target), "--template", str(case.template)]
    code, out, err = _cli([*argv, *(x for kv in opts.items() for x in kv), "--quiet"])
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("anatomap: error: ") and message in err
    assert not (tmp_path / "v.html").exists()


def test_write_view_rejects_inconsistent_inputs(
    case: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t_emb, g_emb = (DenseEmbedding.load(p) for p in case.embs)
    scan, tgt = ViewScan("t", t_emb), ViewScan("g", g_emb)
    res = MatchResult(case.points, np.ones(4), np.ones(4))
    good = (scan, [tgt], case.points, ["a", "b", "c", "d"], [res])
    with pytest.raises(AnatomapError, match="3 names for 4 points"):
        write_view(tmp_path / "v.html", scan, [tgt], case.points, ["a", "b", "c"], [res])
    with pytest.raises(AnatomapError, match="1 match results for 2 targets"):
        write_view(tmp_path / "v.html", scan, [tgt, tgt], case.points, good[3], [res])
    with pytest.raises(AnatomapError, match="not one per template point"):
        write_view(
            tmp_path / "v.html", *good[:4], [MatchResult(case.points[:2], np.ones(2), np.ones(2))]
        )
    other = DenseEmbedding(g_emb.coarse[:8], g_emb.fine[:8], g_emb.coarse_affine, g_emb.fine_affine)
    with pytest.raises(AnatomapError, match="must come from the same model"):
        write_view(tmp_path / "v.html", scan, [ViewScan("o", other)], *good[2:])
    with pytest.raises(AnatomapError, match="no points"):
        write_view(tmp_path / "v.html", scan, [tgt], np.zeros((0, 3)), [], [res])
    monkeypatch.setattr("anatomap.infer.view.MAX_PAGE_BYTES", 10_000)
    with pytest.raises(AnatomapError, match=r"the page would carry [\d.]+ MB of embeddings"):
        write_view(tmp_path / "v.html", *good)
    assert not list(tmp_path.iterdir())  # nothing written


def test_view_of_matches_already_made(case: SimpleNamespace, tmp_path: Path) -> None:
    """``match --view``: the page from ``anatomap.match``'s rows and embeddings, P shown."""
    t_emb, g_emb = (DenseEmbedding.load(p) for p in case.embs)
    res = match_points(t_emb, case.points, g_emb)
    rows = [
        {"target": str(case.target), "name": f"p{n}", "template_x": p[0], "template_y": p[1],
         "template_z": p[2], "x": m[0], "y": m[1], "z": m[2], "score": float(s),
         "low_confidence": n == 1, "p_within_5mm": 0.25 * n}
        for n, (p, m, s) in enumerate(zip(case.points, res.points_mm, res.scores, strict=True))
    ]  # fmt: skip
    out = write_match_view(tmp_path / "m.html", case.template, [case.target], t_emb, [g_emb], rows,
                           components=4)  # fmt: skip
    data = _data(out)
    assert data["colour_by"] == "p_within_5mm" and data["targets"][0]["probs"] == [
        0,
        0.25,
        0.5,
        0.75,
    ]
    assert data["targets"][0]["low"] == [False, True, False, False]
    assert np.allclose(data["targets"][0]["matches"], res.points_mm, atol=1e-3)
    found = SimpleNamespace(
        names=np.array(["a", "b", "c", "d"]), template_mm=case.points, points_mm=res.points_mm[None],
        scores=res.scores[None], low_confidence=np.zeros((1, 4), bool), p_within_5mm=None,
    )  # fmt: skip
    data = _data(
        view_matches(tmp_path / "n.html", ViewScan("t", t_emb), [ViewScan("g", g_emb)], found)
    )
    assert data["colour_by"] == "score" and data["points"]["names"] == ["a", "b", "c", "d"]
    assert data["template"]["shown"].startswith("first principal component")  # no image given


# -- in the browser -----------------------------------------------------------------------


def _variance(png: bytes) -> float:
    from PIL import Image

    return float(np.asarray(Image.open(io.BytesIO(png)).convert("L"), np.float32).std())


@pytest.mark.skipif(
    not Path(CHROMIUM).is_file(),
    reason=f"Chromium not found at {CHROMIUM} (Debian package 'chromium'; .ci/run installs it)",
)
def test_page_in_headless_chromium(case: SimpleNamespace, page: Path) -> None:
    from playwright.sync_api import sync_playwright

    t_emb, g_emb = (DenseEmbedding.load(p) for p in case.embs)
    red = reduce_embeddings([t_emb, g_emb, t_emb], COMPONENTS)
    expected = [
        match_points(red.embedding(0, t_emb), case.points, red.embedding(i, e)).points_mm
        for i, e in ((1, g_emb), (2, t_emb))
    ]
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page(viewport={"width": 1280, "height": 900})
            tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            tab.on("pageerror", lambda e: errors.append(str(e)))
            tab.route(
                "**/*", lambda r: r.continue_() if r.request.url.startswith("file:") else r.abort()
            )
            tab.goto(page.as_uri(), wait_until="load")
            tab.wait_for_function(
                "window.anatomapView && (anatomapView.ready || anatomapView.error)"
            )
            assert tab.evaluate("anatomapView.error") is None
            assert tab.evaluate("anatomapView.volumeCounts()") == {"template": 2, "target": 3}
            for canvas in ("#template-canvas", "#target-canvas"):
                assert _variance(tab.locator(canvas).screenshot()) > 10, canvas
            for t, want in enumerate(expected):
                tab.evaluate(f"anatomapView.selectTarget({t})")
                spacing = geometry.spacing((g_emb if t == 0 else t_emb).fine_affine)
                for p, ref in zip(case.points, want, strict=True):
                    got = tab.evaluate(f"anatomapView.clickTemplate({p.tolist()})")
                    assert got["target"] == t
                    assert (np.abs(np.asarray(got["mm"]) - ref) <= spacing + 1e-3).all(), (
                        p,
                        got,
                        ref,
                    )
                    cross = tab.evaluate("anatomapView.crosshairMm('target')")
                    assert np.allclose(cross, got["mm"], atol=1e-3)  # NiiVue's crosshair
                    heat = tab.evaluate(f"anatomapView.heatValueAt({got['mm']})")
                    assert heat == pytest.approx(got["score"], abs=1e-5)  # overlay laid out right
            box = tab.locator("#template-canvas").bounding_box()
            assert box is not None
            tab.evaluate("anatomapView.last = null")
            tab.mouse.click(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.2)
            tab.wait_for_function("anatomapView.last !== null")  # a user's click matched too
            last = tab.evaluate("anatomapView.last")
            assert np.allclose(
                tab.evaluate("anatomapView.crosshairMm('target')"), last["mm"], atol=1e-3
            )
            tab.evaluate("anatomapView.selectTarget(0)")
            tab.evaluate(f"anatomapView.clickTemplate({case.points[1].tolist()})")
            shot = tab.screenshot(full_page=True)
        finally:
            browser.close()
    (page.parent / "viewer.png").write_bytes(shot)
    if os.environ.get("ANATOMAP_SCREENSHOT_DIR"):
        folder = Path(os.environ["ANATOMAP_SCREENSHOT_DIR"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "viewer.png").write_bytes(shot)
    assert not errors, errors


def test_match_view_writes_the_page_of_the_same_matches(
    case: SimpleNamespace, tmp_path: Path
) -> None:
    """``anatomap match ... --view FILE.html``: the CSV and the page hold the same matches,
    and nothing is embedded twice (the page is built from the match's own embeddings)."""
    from anatomap.cli import main

    out, page = tmp_path / "m.csv", tmp_path / "m.html"
    argv = ["match", str(case.ckpt), str(case.target), "--template", str(case.template),
            "--points", str(case.csv), "--out", str(out), "--device", "cpu", "--quiet"]  # fmt: skip
    assert main([*argv, "--view", str(page)]) == 0
    data = _data(page)
    rows = list(csv.DictReader(out.open()))
    assert len(data["targets"]) == 1 and len(rows) == len(case.points)
    assert main([*argv, "--view", str(tmp_path / "m.png")]) == 2
