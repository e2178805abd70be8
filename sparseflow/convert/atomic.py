"""Atomic replacement of a checkpoint directory.

A save that crashes or is killed midway must leave either the previous checkpoint or none,
never a half-written one. So everything is written into a hidden temporary directory next
to the target (same filesystem, so ``rename`` is atomic), flushed to disk, and only then
renamed into place. An existing target is first renamed aside and deleted once the new one
is in place; files in it that the save does not own (a tokenizer, a README, training
arguments) are carried over as hard links, so they survive untouched.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["OWNED_PATTERNS", "atomic_directory", "existing_checkpoint", "interrupted_saves", "refuse_existing"]

# Files a checkpoint save owns: the previous ones are dropped, never carried over (stale shards
# of an older, differently sharded save must not survive next to the new index).
OWNED_PATTERNS = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
)
_TMP_TAG = ".sparseflow-tmp-"
_OLD_TAG = ".sparseflow-old-"


def _owned(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in OWNED_PATTERNS)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync(Path(dirpath, name))
        _fsync(Path(dirpath))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: Path, new: Path) -> None:
    """Bring the entries of ``old`` that this save neither owns nor wrote into ``new``."""
    for entry in old.iterdir():
        if _owned(entry.name) or (new / entry.name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry), new / entry.name)
        else:
            _link_or_copy(str(entry), str(new / entry.name))


def interrupted_saves(target: str | os.PathLike) -> list[Path]:
    """Leftovers of saves to ``target`` that were killed midway (complete old checkpoints
    renamed aside, or unfinished new ones), for error messages and manual recovery."""
    target = Path(target).absolute()
    if not target.parent.is_dir():
        return []
    prefix = f".{target.name}"
    return sorted(p for p in target.parent.iterdir() if p.name.startswith((prefix + _OLD_TAG, prefix + _TMP_TAG)))


def existing_checkpoint(target: str | os.PathLike) -> Path | None:
    """A file of a checkpoint that ``target`` already holds (config or weights), or None. A
    directory holding only other files (a tokenizer, a README) is not a checkpoint."""
    target = Path(target)
    if not target.is_dir():
        return None
    return next((entry for entry in sorted(target.iterdir()) if _owned(entry.name)), None)


def refuse_existing(target: str | os.PathLike, what: str, how: str = "overwrite=True") -> None:
    """Raise ``FileExistsError`` when ``target`` already holds a checkpoint: a save replaces
    the whole checkpoint, so doing that silently would lose whatever was there."""
    found = existing_checkpoint(target)
    if found is not None:
        raise FileExistsError(
            f"{what}: {target} already holds a checkpoint ({found.name}); pass {how} to replace it, "
            "or choose another directory"
        )


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty directory; on a clean exit it replaces ``target`` atomically.

    On an exception the temporary directory is removed and ``target`` is left as it was.
    A process killed inside the block leaves ``target`` as it was plus a hidden
    ``.<name>.sparseflow-tmp-*`` directory next to it.
    """
    target = Path(target).absolute()
    if target.is_symlink():  # replace what the link points to, keep the link
        target = target.resolve()
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"save target {target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TMP_TAG}", dir=target.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; a checkpoint is an ordinary directory
        yield tmp
        if target.exists():
            _carry_over(target, tmp)
        _fsync_tree(tmp)
        _replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(new: Path, target: Path) -> None:
    if not target.exists():
        os.rename(new, target)
        _fsync(target.parent)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}{_OLD_TAG}", dir=target.parent))
    os.rename(target, old / "checkpoint")  # from here until the next rename, `target` is absent
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old / "checkpoint", target)
        shutil.rmtree(old, ignore_errors=True)
        raise
    _fsync(target.parent)
    shutil.rmtree(old, ignore_errors=True)
