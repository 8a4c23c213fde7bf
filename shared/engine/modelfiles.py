"""Helpers for writing HuggingFace-format model folders atomically and idempotently.

A prepared folder carries a marker file (`MARKER_NAME`) written last; its JSON content names
what the folder was built from. `build_folder` skips the build when the marker already says
the same thing, and otherwise builds into a temporary sibling folder that is renamed into
place, so a folder is either absent, complete, or left from an earlier complete build.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

MARKER_NAME = ".epd-model.json"


def sha256_file(path: Path, chunk_size: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON with a trailing newline."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_tokenizer(tokenizer, out: Path) -> None:
    """`tokenizer.save_pretrained(out)`, plus the chat template inlined in tokenizer_config.json.

    transformers 5 writes the template to chat_template.jinja; readers that only look at
    tokenizer_config.json (transformers 4.x, our engine) find it there too. The class is
    recorded as `PreTrainedTokenizerFast`, which both major versions resolve.
    """
    tokenizer.save_pretrained(out)
    path = Path(out) / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if tokenizer.chat_template is not None:
        cfg["chat_template"] = tokenizer.chat_template
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    write_json(path, cfg)


def read_marker(folder: Path) -> dict | None:
    """The marker of a prepared folder, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(folder) / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def build_folder(
    out_dir: Path, marker: dict, build: Callable[[Path], None], *, force: bool = False
) -> Path:
    """Make `out_dir` a folder built by `build(tmp_dir)` and stamped with `marker`.

    A no-op (returns at once) when `out_dir` already holds the same marker and `force` is
    false. Replaces an earlier prepared folder (one with any marker); raises
    `FileExistsError` when `out_dir` is a non-empty folder we did not prepare, unless
    `force`. If another process finishes the same build first, its folder is kept.
    """
    out_dir = Path(out_dir).absolute()
    if not force and read_marker(out_dir) == marker:
        return out_dir
    if out_dir.exists() and not force and read_marker(out_dir) is None:
        if not out_dir.is_dir() or any(out_dir.iterdir()):
            raise FileExistsError(
                f"{out_dir} exists and is not a prepared model folder; remove it or pass force=True"
            )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        build(tmp)
        write_json(tmp / MARKER_NAME, marker)
        _chmod_default(tmp)
        if out_dir.exists() or out_dir.is_symlink():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            try:
                out_dir.rename(old)
            except FileNotFoundError:  # another process moved it away first
                old = None
            if old is not None and old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            elif old is not None:
                old.unlink()
        try:
            tmp.rename(out_dir)
        except OSError:
            if read_marker(out_dir) == marker:  # a concurrent build won the race
                return out_dir
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _chmod_default(folder: Path) -> None:
    """Give `folder` and its files the umask's usual modes (mkdtemp makes them private)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
