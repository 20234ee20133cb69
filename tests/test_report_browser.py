"""The HTML report: standalone (inline images, no external resources), summary first, and it
renders in headless Chromium with no console errors, decoded images and a working
clicked-point similarity widget."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from anatomap.checkpoint import save_checkpoint
from anatomap.data.cache import Cache
from anatomap.eval.evaluate import evaluate
from anatomap.eval.figures import DenseSlice, cosine_map, pca_rgb, slice_features
from anatomap.eval.report import Section, summary_from_table, summary_table, write_page
from anatomap.models.encoders import EncoderSpec, build_encoder
from anatomap.objectives.registry import get_objective, objective_config

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SAM_SMALL = {"name": "sam", "crop_size": 16, "embed_dim": 16, "fpn_channels": 8}


@pytest.fixture(scope="module")
def report(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``anatomap evaluate`` (position task) of a fresh, untrained tiny SAM checkpoint."""
    cache = Cache(tiny_cache)
    torch.manual_seed(5)
    spec = EncoderSpec("small_cnn", 3, len(cache.modalities), 16, {"channels": [8, 16, 16]})
    enc = build_encoder(spec)
    params = objective_config(dict(SAM_SMALL))
    obj = get_objective("sam")(params, enc)
    subjects = cache.subjects[:3]
    meta = {
        "objective": "sam",
        "objective_config": params.model_dump(),
        "step": 0,
        "data": {"cache": str(tiny_cache), "heldout_subjects": subjects},
    }
    root = tmp_path_factory.mktemp("report")
    save_checkpoint(root / "checkpoint", enc, obj, meta)
    res = evaluate(root / "checkpoint", out=root / "eval", tasks=["position"], crops_per_subject=6)
    return res.report


def test_report_is_standalone_and_starts_with_the_summary(report: Path) -> None:
    page = report.read_text()
    srcs = re.findall(r"""src=['"]([^'"]*)['"]""", page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"""(src|href)=['"](https?:)?//""", page)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    summary = page.index("<table class='summary'>")
    assert summary < page.index("<h2")  # the summary comes before every section
    block = page[summary : page.index("</table>", summary)]
    assert "sam (pretrained)" in block and "random init" in block
    assert block.count("class='best'") == 4  # Spearman, R^2 and both errors: one best each
    assert "am-sim" in page and "PCA" in page  # the dense-embedding section
    n_figs = len(list(report.parent.glob("figure_*.png")))
    assert n_figs == len(srcs) - 1  # every figure, plus the widget's slice image


def test_summary_table_marks_the_best_and_ignores_missing_values() -> None:
    table = (
        "t",
        ["method", "error (mm)", "score", "notes"],
        [["a", 2.0, 0.5, "x"], ["b", 1.0, float("nan"), "y"], ["c", 3.0, 0.7, "z"]],
        {"error (mm)": "min", "score": "max"},
    )
    block = summary_from_table("Task", table)
    assert block.methods == ["a", "b", "c"]
    assert [r[0] for r in block.rows] == ["error (mm)", "score"]
    out = summary_table([block])
    assert out.count("class='best'") == 2
    assert "<td class='best'>1.000</td>" in out and "<td class='best'>0.700</td>" in out
    assert "lower is better" in out and "higher is better" in out


def test_pca_rgb_and_cosine_map_on_known_features() -> None:
    feats = np.zeros((4, 6, 5), np.float32)
    feats[0, :3] = 1.0  # left half points one way, right half another
    feats[1, 3:] = 1.0
    rgb = pca_rgb(feats)
    assert rgb.shape == (6, 5, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert np.allclose(rgb[0, 0], rgb[2, 4], atol=1e-3)  # same feature, same colour
    assert not np.allclose(rgb[0, 0], rgb[4, 0], atol=0.5)
    sl = DenseSlice("m", np.ones((12, 10)), feats, stride=2)
    assert sl.feature_index((4.2, 9.0)) == (2, 4)
    sim = cosine_map(sl.features, (1, 1))
    assert sim[0, 0] == pytest.approx(1.0) and sim[5, 0] == pytest.approx(0.0)


def test_slice_features_of_an_encoder_without_dense_heads() -> None:
    enc = build_encoder(EncoderSpec("small_cnn", 3, 2, 8, {"channels": [8, 8, 8, 8]}))
    image = np.random.default_rng(0).random((2, 21, 18, 13), dtype=np.float32)
    feats, stride = slice_features(enc, None, image, z=6)
    assert stride == 8  # the third level of small_cnn
    assert feats.shape == (8, 3, 3)  # ceil(21 / 8), ceil(18 / 8)
    assert np.allclose(np.linalg.norm(feats, axis=0), 1.0, atol=1e-5)


def test_write_page_with_an_explicit_summary(tmp_path: Path) -> None:
    from anatomap.eval.report import SummaryBlock

    block = SummaryBlock("Benchmark", ["sam", "isimed"], [("MRE (mm)", [3.0, 4.0], "min")])
    page = write_page(
        tmp_path / "b.html", "bench", [Section("Notes", text="hello")], summary=[block]
    ).read_text()
    assert page.index("Benchmark") < page.index("<h2") and "hello" in page
    assert "<td class='best'>3.000</td>" in page
    assert "<script>" not in page  # no widget, no script


@pytest.mark.skipif(
    not Path(CHROMIUM).is_file(),
    reason=f"Chromium not found at {CHROMIUM} (Debian package 'chromium'; .ci/run installs it)",
)
def test_report_renders_in_headless_chromium(report: Path) -> None:
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(report.as_uri(), wait_until="load")
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.complete, e.naturalWidth, e.alt])"
            )
            assert images and all(done and width > 0 for done, width, _ in images), images
            canvas = page.locator("canvas.am-canvas").first
            pixels = "c => Array.from(c.getContext('2d').getImageData(0, 0, c.width, " \
                "c.height).data)"  # fmt: skip
            first = np.array(canvas.evaluate(pixels))
            assert first.reshape(-1, 4)[:, 3].max() == 255  # the start point is drawn
            box = canvas.bounding_box()
            assert box is not None
            canvas.click(position={"x": box["width"] * 0.2, "y": box["height"] * 0.8})
            second = np.array(canvas.evaluate(pixels))
            assert (first != second).any(), "clicking did not redraw the similarity map"
            status = page.locator(".am-status").first.inner_text()
            assert status.startswith("Similarity to image voxel")
        finally:
            browser.close()
    assert not errors, errors
