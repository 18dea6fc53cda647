"""Files on disk, for every part of lorakit: the cache root, content digests, writes that never
leave a half-written file or folder behind, the writability probe run before anything slow, and
telling a local path from a hub id, and the process's resident-memory marks (/proc/self).

Nothing here knows about models, data or runs; they all build on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError


def cache_root() -> Path:
    """`$LORAKIT_CACHE`, else `~/.cache/lorakit`: converted models, tokenized data."""
    return Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))


def looks_like_hub_id(reference: str) -> bool:
    """The shape of a hub id (`owner/name`), for models and datasets alike."""
    parts = reference.split("/")
    return len(parts) == 2 and all(parts) and not reference.startswith((".", "/", "~"))


def hash_file_into(digest: Any, path: Path) -> Any:
    """Feed a file's bytes to `digest` in 1 MiB blocks; return the digest."""
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, as hex."""
    return hash_file_into(hashlib.sha256(), path).hexdigest()


def safetensors_digests(folder: Path) -> dict[str, str]:
    """sha256 of each safetensors file in a folder, by file name (sorted)."""
    return {p.name: file_digest(p) for p in sorted(folder.glob("*.safetensors"))}


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n", encoding="utf-8")


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a staging folder next to `target`; on success it replaces `target` in one rename,
    so a reader never sees a half-written folder and a failed save leaves the old one intact."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        # mkdtemp makes the folder private (0700); the result should read like any folder.
        staging.chmod(0o777 & ~_umask())
        yield staging
        if target.exists():
            retired = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a staging path next to `target`; on success it replaces `target` in one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(handle)
    staging = Path(name)
    try:
        staging.chmod(0o666 & ~_umask())
        yield staging
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path) as staging:
        staging.write_text(text, encoding="utf-8")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(path: Path, what: str) -> None:
    """Probe, before anything slow runs, that `path` can be created or written: a file is
    created and removed in the nearest folder that exists at or above it."""
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise LorakitError(f"{what}: cannot write {path}: {existing} is a file, not a folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=".lorakit-probe-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise LorakitError(
            f"{what}: cannot write {path}: creating a file in {existing} failed ({exc.strerror})"
        ) from None


def status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (`VmRSS`, `VmHWM`: the resident set and its
    high-water mark) in bytes; None where there is no such file (not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_mark() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the current resident set;
    False where the kernel does not allow it (not Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
