"""Prompt files: ``.txt`` (one per line), ``.csv``/``.tsv`` with a prompt column, COCO captions JSON.

The packaged calibration pool is the first caption of each MS-COCO val2017 image (4,958 unique captions, CC BY 4.0
per COCO's terms of use); the packaged evaluation pool is PartiPrompts (Apache-2.0), no prompt of which is a COCO
caption (``assets/prompts/NOTICE.txt``).
"""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

from .errors import SlimDiffError

# "utf-8-sig": UTF-8 that may start with a byte-order mark, as Notepad and Excel's "CSV UTF-8" save it; read as
# plain UTF-8, the mark would stay in the first prompt or hide a CSV's first column name.
_ENCODING = "utf-8-sig"
DEFAULT_POOL = Path(__file__).parent / "assets" / "prompts" / "coco_val2017_captions.txt"
# `slimdiff eval`'s default: PartiPrompts (Apache-2.0, assets/prompts/NOTICE.txt), 1,632 prompts over 12 categories
# and 11 challenges, written apart from COCO, so that evaluation does not reuse calibration's prompts.
EVALUATION_POOL = Path(__file__).parent / "assets" / "prompts" / "PartiPrompts.tsv"
# The proxy model's closed vocabulary cannot read COCO captions: it calibrates on its own training captions,
# shipped as a file so that prompt reading never imports the proxy package.
PROXY_POOL = Path(__file__).parent / "assets" / "proxy" / "calibration_prompts.txt"
_PROMPT_COLUMNS = ("prompt", "caption", "text", "caption_1")


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _from_table(path: Path, delimiter: str) -> list[str]:
    with path.open(newline="", encoding=_ENCODING) as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        columns = {c.lower().strip(): c for c in (reader.fieldnames or [])}
        column = next((columns[c] for c in _PROMPT_COLUMNS if c in columns), None)
        if column is None:
            raise SlimDiffError(f"{path}: no prompt column (looked for {', '.join(_PROMPT_COLUMNS)})")
        return [row[column] or "" for row in reader]


def _from_coco(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text(encoding=_ENCODING))
        annotations = sorted(data["annotations"], key=lambda a: (a["image_id"], a["id"]))
        return [a["caption"] for a in annotations]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise SlimDiffError(f"{path}: not a COCO captions JSON file ({exc})") from exc


def evaluation_prompts(num: int, seed: int = 0) -> list[str]:
    """``num`` prompts of :data:`EVALUATION_POOL`, a seeded sample in file order: the file runs category by category
    (its first prompts are single words), so its first N would test one kind of prompt."""
    pool = read_prompts(EVALUATION_POOL)
    if num >= len(pool):
        return pool
    return [pool[i] for i in sorted(random.Random(seed).sample(range(len(pool)), num))]


def read_prompts(path: str | Path | None = None, limit: int | None = None, model: str | None = None) -> list[str]:
    """Read, clean and de-duplicate prompts (order kept). ``None`` reads the model's default pool: the proxy
    model's training captions for ``builtin:proxy``, the packaged COCO captions otherwise."""
    if path is None:
        path = PROXY_POOL if model == "builtin:proxy" else DEFAULT_POOL
    path = Path(path)
    if path.is_dir():
        raise SlimDiffError(f"prompt file {str(path)!r} is a folder: give a .txt, .csv/.tsv or COCO captions .json file")
    if not path.is_file():
        raise SlimDiffError(f"prompt file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            raw = _from_coco(path)
        elif suffix in (".csv", ".tsv"):
            raw = _from_table(path, "\t" if suffix == ".tsv" else ",")
        else:
            raw = path.read_text(encoding=_ENCODING).splitlines()
    except UnicodeDecodeError as exc:
        raise SlimDiffError(f"prompt file {str(path)!r} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
                            f"offset {exc.start}); save it as UTF-8") from None
    seen: set[str] = set()
    prompts = []
    for text in map(_clean, raw):
        if text and text not in seen:
            seen.add(text)
            prompts.append(text)
    if not prompts:
        raise SlimDiffError(f"prompt file {str(path)!r} contains no prompts")
    return prompts[:limit] if limit else prompts
