"""`anatomap benchmark`: method selection, the summary table, and a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from anatomap.cli import main
from anatomap.errors import ConfigError
from anatomap.workflows.benchmark import BenchmarkConfig, load_benchmark_config, select_methods
from anatomap.workflows.benchmark_table import COLUMNS, build_table, markdown_table


def test_quick_block_is_merged_and_overrides_apply() -> None:
    full = load_benchmark_config("benchmark")
    quick = load_benchmark_config("benchmark", ["trainer.batch_size=2"], quick=True)
    assert quick.trainer["max_steps"] < full.trainer["max_steps"]
    assert quick.trainer["batch_size"] == 2
    with pytest.raises(ConfigError, match="unknown key"):
        load_benchmark_config("benchmark", ["trainer_typo.x=1"])


def test_methods_run_after_the_runs_they_refer_to() -> None:
    cfg = BenchmarkConfig(
        methods=["isimed", "sam", "simclr"],
        method_overrides={"isimed": ["objective.kl_weight=0", "note={runs}/simclr"]},
    )
    order = select_methods(cfg)
    assert order.index("isimed") > order.index("simclr")
    with pytest.raises(ConfigError, match="unknown method"):
        select_methods(cfg, ["nope"])


def test_table_marks_the_best_value_per_column() -> None:
    def entry(spearman: float, mre: float | None) -> dict:
        m = {
            "position": {
                "encoders": {
                    "x (pretrained)": {"spearman": spearman},
                    "random init": {"spearman": 0.1},
                }
            }
        }
        if mre is not None:
            m["landmarks"] = {
                "matchers": {
                    "x (pretrained)": {"overall": {"mre_mm": mre}},
                    "affine": {"overall": {"mre_mm": 1.0}},
                }
            }
        return {"metrics": m, "train": {"wall_s": 3.0, "peak_rss_mb": 100.0}}

    header, rows = build_table({"a": entry(0.9, None), "b": entry(0.5, 4.0)})
    names = [r[0] for r in rows]
    assert names == ["a", "b", "random init", "affine"]
    md = markdown_table(header, rows)
    assert "**0.900**" in md and "**1.000**" in md  # best Spearman (a), best MRE (affine)
    assert "**0.500**" not in md
    assert len(header) == len(COLUMNS) + 4


def test_benchmark_cli_end_to_end_and_resumable(tiny_cache: Path, tmp_path: Path) -> None:
    cfg = {
        "data": {
            "cache": str(tiny_cache),
            "heldout": ["sub-04", "sub-05"],
            "num_workers": 0,
            "samples_per_epoch": 4,
        },
        "model": {
            "name": "small_cnn",
            "embed_dim": 16,
            "spatial_dims": 3,
            "options": {"channels": [8, 16, 32]},
        },
        "trainer": {"max_steps": 2, "batch_size": 2, "checkpoint_every": 2},
        "method_overrides": {
            "isimed": ["objective.num_crops=4", "objective.crop_size=16"],
            "simclr": ["objective.crop_size=16"],
        },
        "evaluate": {"tasks": ["position"], "options": {"crops_per_subject": 6}},
        "output": str(tmp_path / "bench"),
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["benchmark", str(path), "--methods", "isimed,simclr"]) == 0
    out = tmp_path / "bench"
    table = json.loads((out / "benchmark.json").read_text())
    assert [r[0] for r in table["rows"]][:3] == ["isimed", "simclr", "random init"]
    assert all(isinstance(r[2], float) for r in table["rows"][:3])  # Spearman measured
    assert table["methods"]["isimed"]["train"]["steps"] == 2
    assert table["methods"]["isimed"]["train"]["peak_rss_mb"] > 0
    html = (out / "benchmark.html").read_text()
    assert "runs/isimed/eval/report.html" in html and "data:image/png;base64" in html
    # Every run folder is an ordinary run: evaluate works on it.
    assert (out / "runs" / "simclr" / "eval" / "report.html").is_file()
    # A second invocation reuses the finished runs and their evaluations.
    stamp = (out / "runs" / "isimed" / "checkpoint" / "model.safetensors").stat().st_mtime
    assert main(["benchmark", str(path), "--methods", "isimed"]) == 0
    assert (out / "runs" / "isimed" / "checkpoint" / "model.safetensors").stat().st_mtime == stamp
    # An interrupted run (no finished-stats file) continues from its Lightning checkpoint.
    (out / "runs" / "simclr" / "benchmark_run.json").unlink()
    assert main(["benchmark", str(path), "--methods", "simclr", "trainer.max_steps=4"]) == 0
    meta = json.loads((out / "runs" / "simclr" / "checkpoint" / "meta.json").read_text())
    assert meta["step"] == 4
