"""Models named by their Hugging Face Hub id, read from the Hugging Face cache on this machine.

slimdiff downloads nothing. But whoever has run diffusers on a machine has models in the Hub's cache
(``~/.cache/huggingface/hub``; ``HF_HUB_CACHE`` or ``HF_HOME`` move it), and types the id they know them by:
``--model stabilityai/stable-diffusion-xl-base-1.0``. Such an id, where no path of that name exists, is read as the
cached snapshot its ``main`` ref points at — a plain folder of symbolic links that every path-based check and loader
here takes as it is — and recorded as that folder, so statistics and slim folders name the files they came from.
An id the cache does not hold is said in one line, with what the cache does hold and how to bring the model. LoRAs
are named the same way: ``owner/name`` (the repository's one ``.safetensors`` file) or ``owner/name/FILE``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from .errors import SlimDiffError

#: ``owner/name`` as the Hub spells repository ids: one slash, no leading ``/`` or ``.`` (a path would have them).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def looks_like_hub_id(source: str) -> bool:
    """``source`` names no existing path and is spelled as a Hub repository id."""
    return bool(_HUB_ID.match(source)) and not source.startswith("builtin:") and not Path(source).exists()


def cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of a Hub model (its ``main`` revision), or ``None`` when the cache lacks it."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError is an OSError), or not a valid id
        return None


def resolve_model_source(source: str) -> str:
    """``source`` itself, unless it is a Hub id the cache holds: then that snapshot's folder (one line on stderr
    says so, as the id alone does not say which revision was read)."""
    if not looks_like_hub_id(source):
        return source
    snapshot = cached_snapshot(source)
    if snapshot is None:
        return source
    print(f"slimdiff: {source}: the Hugging Face cache's snapshot {snapshot}", file=sys.stderr)
    return str(snapshot)


def resolve_file_source(source: str, kind: str) -> str:
    """A file named as ``owner/name`` (the repository's one ``.safetensors`` file) or ``owner/name/path/in/repo``,
    read from the cached snapshot; ``source`` itself when it is a path, or not in the cache (its loader then says it
    does not exist). ``kind`` names the file in errors (``LoRA``): a repository with several checkpoints is refused
    in one line naming them."""
    parts = source.split("/")
    if len(parts) < 2 or Path(source).exists() or not looks_like_hub_id("/".join(parts[:2])):
        return source
    repo_id, inner = "/".join(parts[:2]), "/".join(parts[2:])
    snapshot = cached_snapshot(repo_id)
    if snapshot is None:
        return source
    if inner:
        found = snapshot / inner
        if not found.is_file():
            raise SlimDiffError(f"{kind} {source!r}: the Hugging Face cache's snapshot of {repo_id} ({snapshot}) has "
                                f"no {inner}")
    else:
        files = sorted(snapshot.rglob("*.safetensors"))
        names = [str(f.relative_to(snapshot)) for f in files]
        if len(files) != 1:
            holds = f"holds {', '.join(names)}" if files else "holds no .safetensors file"
            raise SlimDiffError(f"{kind} {source!r}: the Hugging Face cache's snapshot of {repo_id} {holds}; name "
                                f"the file as {repo_id}/FILE")
        found = files[0]
    print(f"slimdiff: {source}: the Hugging Face cache's {found}", file=sys.stderr)
    return str(found)


def missing_message(source: str, what: str = "model path") -> str:
    """Why ``source`` names nothing: the path does not exist, and — where it reads as a Hub id, or a file in one — the
    cache does not hold that repository either (naming the ones it does hold, which catches a misspelt id)."""
    message = f"{what} {source!r} does not exist"
    repo_id = "/".join(source.split("/")[:2])
    if not looks_like_hub_id(repo_id):
        return message
    from huggingface_hub import constants, scan_cache_dir

    cache = Path(constants.HF_HUB_CACHE)
    try:
        held = sorted(repo.repo_id for repo in scan_cache_dir(cache).repos if repo.repo_type == "model")
    except Exception:  # no cache folder (CacheNotFound), or one it cannot read: nothing to name
        held = []
    holds = f"it holds {', '.join(held[:8])}{' …' if len(held) > 8 else ''}" if held else "it holds no model"
    return (f"{message}, and the Hugging Face cache ({cache}) has no snapshot of {repo_id} ({holds}); slimdiff "
            f"downloads nothing: fetch it where there is a network (`hf download {repo_id} --local-dir DIR`) and "
            "pass DIR" + ("" if repo_id == source else " and the file in it"))
