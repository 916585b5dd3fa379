"""Small file helpers shared by the exporters and engines: atomic writes, JSON sidecars, content hashes."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from ..errors import SlimDiffError


def write_json_atomic(path: Path, body: dict) -> None:
    """Write JSON to a temporary sibling, then rename: readers never see a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(body, indent=1), encoding="utf-8")
    os.replace(tmp, path)


#: What a ``slimdiff-export`` output folder holds beside its engine folders (read back by ``slimdiff bench --model OUT``).
EXPORT_FILE = "export.json"
EXPORT_FORMAT = "slimdiff-export/1"


def is_export_folder(source: str | os.PathLike) -> bool:
    """Whether ``source`` is a ``slimdiff-export`` output folder."""
    return (Path(source) / EXPORT_FILE).is_file()


def read_json(path: Path, what: str, expected_format: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SlimDiffError(f"{what} {str(path)!r} is missing")
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SlimDiffError(f"{what} {str(path)!r} is corrupt: {exc}") from None
    if not isinstance(body, dict) or body.get("format") != expected_format:
        found = body.get("format") if isinstance(body, dict) else type(body).__name__
        raise SlimDiffError(f"{what} {str(path)!r} has format {found!r}, expected {expected_format!r}")
    return body


def sha256_files(paths: list[Path]) -> str:
    """One digest over several files in order (a graph and its external weights count as one artifact)."""
    digest = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def files_size(paths: list[Path]) -> int:
    return sum(Path(p).stat().st_size for p in paths)


#: What progress lines start with: a second process of ``slimdiff-export`` (``--jobs 2``) names its task here, since
#: its lines interleave with the first process's.
STATUS_TAG = "slimdiff-export"


def status(message: str) -> None:
    """Progress line for long steps (stderr, so tables and results on stdout stay clean)."""
    print(f"[{STATUS_TAG} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
