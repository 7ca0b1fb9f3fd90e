"""File helpers for atomic, verifiable writes: checksums, fsync, atomic replace."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under root to disk, so a rename after it publishes complete data."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write text so that readers see either the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


PICKLE_WEIGHTS = (".bin", ".ckpt", ".pt", ".pth")  # torch.load files: loading one can run code


def copy_tree(
    src: Path, dest: Path, *, skip: tuple[str, ...] = (".git", ".cache"), skip_files: frozenset[Path] = frozenset()
) -> None:
    """Copy a folder's regular files (following links to files, so the copy is self-contained)."""
    for folder, dirs, files in os.walk(src, followlinks=True):
        dirs[:] = [d for d in dirs if d not in skip]
        rel = Path(folder).relative_to(src)
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            if Path(folder) / name not in skip_files:
                shutil.copyfile(Path(folder) / name, dest / rel / name)


def pickle_weights(folder: Path) -> tuple[list[Path], list[Path]]:
    """The folder's pickle weight files: (those a .safetensors file beside them replaces, those nothing does)."""
    shadowed: list[Path] = []
    alone: list[Path] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in PICKLE_WEIGHTS):
        safe = any(sibling.suffix == ".safetensors" for sibling in path.parent.iterdir())
        (shadowed if safe else alone).append(path)
    return shadowed, alone


def list_files(root: Path) -> list[str]:
    """Relative paths (posix) of every regular file under root, sorted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
