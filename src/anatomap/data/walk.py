"""Walking a data folder safely: what the layouts see of a tree of files.

:func:`walk` lists a folder tree top-down, in sorted order, and sorts every name it meets:

* names starting with ``.`` are left out (hidden files, macOS ``._*`` twins);
* regular files (also through symbolic links) are kept; FIFOs, sockets and device files are
  skipped with a note and never opened (a FIFO would block the first read for ever);
* a folder that cannot be listed, and a symbolic link that points nowhere, is a problem;
* a folder with nothing in it is a problem (as it always was);
* symbolic links to folders are followed once (a link back up the tree is a note).

Names are ``str`` as Python gives them: bytes that are not UTF-8 are kept as lone
surrogates (``os.fsdecode``), so every path opens as the OS named it. :func:`display` turns
such a path into printable text and :func:`text_id` into an id that writes as UTF-8.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from anatomap.data.records import ManifestError, Problem

SPECIAL = {
    stat.S_IFIFO: "FIFO (named pipe)",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}


def display(path: str | os.PathLike[str]) -> str:
    """``path`` as printable text: bytes that are not UTF-8 become ``\\xNN``."""
    return os.fsencode(os.fspath(path)).decode("utf-8", "backslashreplace")


def text_id(name: str) -> str:
    """``name`` with every byte that was not UTF-8 written as ``%XX`` (a subject id or
    modality that JSON and every terminal can carry); other names are unchanged."""
    if not any(0xDC80 <= ord(c) <= 0xDCFF for c in name):
        return name
    return "".join(f"%{ord(c) - 0xDC00:02X}" if 0xDC80 <= ord(c) <= 0xDCFF else c for c in name)


@dataclass
class Folder:
    """One folder of the tree: its visible subfolders and regular files (names, sorted)."""

    path: Path
    dirs: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def file_paths(self) -> list[Path]:
        return [self.path / n for n in self.files]


@dataclass
class Tree:
    """A walked folder: folders top-down, and what was skipped or could not be read."""

    root: Path
    folders: list[Folder] = field(default_factory=list)
    skipped: list[Problem] = field(default_factory=list)  # notes: left out on purpose
    problems: list[Problem] = field(default_factory=list)  # unreadable folders, dead links

    def files(self) -> Iterator[Path]:
        for f in self.folders:
            yield from f.file_paths()


def list_folder(path: Path, notes: list[Problem], problems: list[Problem]) -> Folder | None:
    """``path``'s visible subfolders and regular files; ``None`` if it cannot be listed."""
    try:
        with os.scandir(path) as it:
            names = sorted(e.name for e in it)
    except OSError as exc:
        problems.append(Problem(str(path), f"cannot read folder: {exc.strerror or exc}"))
        return None
    out = Folder(path)
    for name in names:
        if name.startswith("."):
            continue
        p = path / name
        try:
            mode = os.stat(p).st_mode  # follows links; never opens the file
        except FileNotFoundError:
            problems.append(Problem(str(p), "broken symbolic link (its target is missing)"))
            continue
        except OSError as exc:
            problems.append(Problem(str(p), f"cannot access: {exc.strerror or exc}"))
            continue
        if stat.S_ISDIR(mode):
            out.dirs.append(name)
        elif stat.S_ISREG(mode):
            out.files.append(name)
        else:
            kind = SPECIAL.get(stat.S_IFMT(mode), "special file")
            notes.append(Problem(str(p), f"{kind}, not a regular file: skipped, not opened"))
    return out


def walk(root: str | Path, skip_dir: Callable[[Path], str | None] | None = None) -> Tree:
    """Every folder under ``root`` (top-down, sorted). ``skip_dir(path)`` may return a reason
    to leave a subfolder out (recorded as a note); raises :class:`ManifestError` when
    ``root`` is no folder or cannot be read."""
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(root, "not a folder")
    tree = Tree(root)
    seen: set[tuple[int, int]] = set()
    todo = [root]
    while todo:
        path = todo.pop()
        try:
            st = os.stat(path)
        except OSError as exc:
            tree.problems.append(Problem(str(path), f"cannot access: {exc.strerror}"))
            continue
        if (st.st_dev, st.st_ino) in seen:
            tree.skipped.append(Problem(str(path), "link to a folder already walked"))
            continue
        seen.add((st.st_dev, st.st_ino))
        n_notes = len(tree.skipped)
        folder = list_folder(path, tree.skipped, tree.problems)
        if folder is None:
            if path == root:
                raise ManifestError(root, tree.problems.pop().reason)
            continue
        nothing = not folder.dirs and not folder.files and len(tree.skipped) == n_notes
        if path != root and nothing:
            tree.problems.append(Problem(str(path), "empty folder (no files)"))
            continue
        kept = []
        for name in folder.dirs:
            why = skip_dir(path / name) if skip_dir is not None else None
            if why:
                tree.skipped.append(Problem(str(path / name), why))
            else:
                kept.append(name)
        folder.dirs = kept
        tree.folders.append(folder)
        todo.extend(path / n for n in reversed(kept))
    return tree


class Peek:
    """Cheap looks at a tree for layout detection: folder listings, cached."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[Path, Folder | None] = {}

    def folder(self, path: Path) -> Folder:
        """The listing of ``path`` (empty when it cannot be read)."""
        if path not in self._cache:
            self._cache[path] = list_folder(path, [], [])
        return self._cache[path] or Folder(path)

    def files(self, limit: int = 200) -> list[Path]:
        """Up to ``limit`` files, breadth-first (shallow files first)."""
        out: list[Path] = []
        queue = [self.root]
        while queue and len(out) < limit:
            f = self.folder(queue.pop(0))
            out += f.file_paths()[: limit - len(out)]
            queue += [f.path / d for d in f.dirs]
        return out
