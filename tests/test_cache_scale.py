"""Caches at scale and on shared filesystems: parallel builds (a bad subject or a dead worker
stops nothing else), one writer per folder (cache and run folder), a bounded pool of open
memory maps under ``ulimit -n 256``, two processes reading one cache, umask file modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anatomap.cli import main
from anatomap.data.cache import build_cache
from anatomap.data.manifest import index_directory, write_manifest
from anatomap.data.parallel import Failed, run_each
from anatomap.io.lock import LockError, folder_lock, main_process

SHAPE = (8, 8, 6)


def dataset(root: Path, n: int, broken: tuple[int, ...] = ()) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = np.random.default_rng(i).random(SHAPE, np.float32) + 0.1
        nib.save(nib.Nifti1Image(arr, np.diag([2.0, 2.0, 2.0, 1.0])), root / f"s{i}_T1w.nii.gz")
    manifest = write_manifest(index_directory(root), root.parent / "m.jsonl")
    for i in broken:  # indexed fine, then damaged: the cache build meets it
        (root / f"s{i}_T1w.nii.gz").write_bytes(b"\x1f\x8b\x08 damaged")
    return manifest


def entries(cache: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(cache)): p.read_bytes()
        for p in sorted(cache.rglob("*.npy"))
        if not p.name.startswith(".")
    }


# ------------------------------------------------------------------ parallel builds


def test_two_workers_build_what_one_builds(tmp_path: Path) -> None:
    manifest = dataset(tmp_path / "scans", 5, broken=(2,))
    one = build_cache(manifest, tmp_path / "c1", spacing=2.0, progress=False, workers=1)
    two = build_cache(manifest, tmp_path / "c2", spacing=2.0, progress=False, workers=2)
    assert one.cache.subjects == two.cache.subjects == ["s0", "s1", "s3", "s4"]
    assert [p["subject"] for p in two.problems] == ["s2"] and two.built == 4
    assert entries(tmp_path / "c1") == entries(tmp_path / "c2")
    again = build_cache(manifest, tmp_path / "c2", spacing=2.0, progress=False, workers=2)
    assert (again.built, again.reused) == (0, 4)  # still resumable


def _maybe_die(i: int) -> int:
    if i == 3:
        os._exit(9)  # a worker killed mid-subject (out of memory, a crash in C)
    return i * i


def test_a_dead_worker_fails_only_its_own_item() -> None:
    results = run_each(_maybe_die, list(range(6)), workers=2)
    assert isinstance(results[3], Failed) and "died" in results[3].reason
    assert [r for i, r in enumerate(results) if i != 3] == [0, 1, 4, 16, 25]


def test_cli_cache_workers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    manifest = dataset(tmp_path / "scans", 3)
    args = ["data", "cache", str(manifest), "--out", str(tmp_path / "c"), "--spacing", "2"]
    assert main([*args, "--workers", "2", "--quiet"]) == 0
    assert "3 subjects (3 built, 0 reused)" in capsys.readouterr().out


# ------------------------------------------------------------------ locks


def test_second_cache_writer_fails_fast(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    manifest = dataset(tmp_path / "scans", 2)
    with folder_lock(tmp_path / "c", "cache"):
        t0 = time.perf_counter()
        with pytest.raises(LockError, match=r"c: this cache is being written by pid \d+ on"):
            build_cache(manifest, tmp_path / "c", spacing=2.0, progress=False)
        assert time.perf_counter() - t0 < 5
        args = ["data", "cache", str(manifest), "--out", str(tmp_path / "c"), "--quiet"]
        assert main(args) == 2 and "is being written by" in capsys.readouterr().err
    assert not (tmp_path / "c" / "cache.json").exists()
    build_cache(manifest, tmp_path / "c", spacing=2.0, progress=False)  # free again


def test_lock_is_released_when_the_holder_dies(tmp_path: Path) -> None:
    code = f"""
        import os
        from anatomap.io.lock import folder_lock
        with folder_lock({str(tmp_path / "c")!r}, "cache"):
            os._exit(0)
    """
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, timeout=120)
    with folder_lock(tmp_path / "c", "cache"):
        pass


def test_run_folder_lock(tmp_path: Path, tiny_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from anatomap.api import load_config, pretrain

    cfg = load_config("isimed", [f"data.cache={tiny_cache}", f"output={tmp_path / 'run'}"])
    with (
        folder_lock(tmp_path / "run", "training run"),
        pytest.raises(LockError, match="this training run is being written by"),
    ):
        pretrain(cfg)
    assert main_process()
    monkeypatch.setenv("LOCAL_RANK", "1")  # other DDP ranks share rank 0's lock
    assert not main_process()
    # a lock on a folder that held nothing leaves nothing behind
    with folder_lock(tmp_path / "new", "cache"):
        pass
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------ thousands of subjects


def fake_cache(root: Path, n: int) -> Path:
    """A cache of ``n`` tiny subjects, written directly (as build_cache lays them out)."""
    image = np.ones((1, 2, 2, 2), np.float16)
    fg = np.zeros((1, 3), np.int32)
    meta = {"affine": np.eye(4).tolist(), "shape": [2, 2, 2], "modalities": ["T1w"]}
    names = []
    for i in range(n):
        sid = f"s{i:05d}"
        folder = root / "subjects" / sid
        folder.mkdir(parents=True)
        np.save(folder / "image.npy", image)
        np.save(folder / "foreground.npy", fg)
        (folder / "meta.json").write_text(json.dumps({**meta, "subject": sid, "present": [1]}))
        names.append(sid)
    info = {"version": 1, "modalities": ["T1w"], "spacing": 2.0, "subjects": names}
    (root / "cache.json").write_text(json.dumps(info))
    return root


READ_ALL = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from anatomap.data.cache_read import Cache  # no torch: a light subprocess
cache = Cache(sys.argv[1], max_open=None if sys.argv[2] == "pool" else 10**6)
total = 0.0
for sid in cache.subjects:
    s = cache[sid]
    total += float(s.image[0, 0, 0, 0]) + len(s.foreground)
print(len(cache), total)
"""


def test_thousands_of_subjects_under_ulimit_256(tmp_path: Path) -> None:
    root = fake_cache(tmp_path / "c", 3000)
    run = [sys.executable, "-c", READ_ALL, str(root)]
    ok = subprocess.run([*run, "pool"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split() == ["3000", "6000.0"]
    unbounded = subprocess.run([*run, "all"], capture_output=True, text=True, timeout=300)
    assert unbounded.returncode != 0 and "Too many open files" in unbounded.stderr


# ------------------------------------------------------------------ shared filesystems


SAMPLE = """
import hashlib, sys
import numpy as np
from anatomap.data.cache import Cache
from anatomap.data.sampler import ViewSpec, sample_views
cache = Cache(sys.argv[1])
h = hashlib.sha256()
for rep in range(5):
    for k, sid in enumerate(cache.subjects):
        imgs, affs = sample_views(cache[sid], ViewSpec(4, (8, 8, 8)), np.random.default_rng([rep, k]))
        h.update(np.ascontiguousarray(imgs).tobytes())
print(h.hexdigest())
"""


def test_two_processes_read_one_cache_at_once(tiny_cache: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in tiny_cache.rglob("*")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SAMPLE, str(tiny_cache)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    digests = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert digests[0] == digests[1] and len(digests[0]) == 64
    assert {p: p.stat().st_mtime_ns for p in tiny_cache.rglob("*")} == before  # nothing written


@pytest.mark.parametrize(
    ("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)]
)
def test_files_follow_the_umask(tmp_path: Path, umask: int, file_mode: int, dir_mode: int) -> None:
    old = os.umask(umask)
    try:
        manifest = dataset(tmp_path / "scans", 3)
        build_cache(manifest, tmp_path / "c1", spacing=2.0, progress=False)
        build_cache(manifest, tmp_path / "c2", spacing=2.0, progress=False, workers=2)
    finally:
        os.umask(old)
    written = [manifest, *(tmp_path / "c1").rglob("*"), *(tmp_path / "c2").rglob("*")]
    modes = {p.name: p.stat().st_mode & 0o777 for p in written}
    assert {m for n, m in modes.items() if "." in n} == {file_mode}, modes
    assert {m for n, m in modes.items() if "." not in n} == {dir_mode}, modes
