"""Atomic, checksummed file writes: a kill at any moment leaves either the previous file or the new one, never a
truncated mix.

Every writer goes to a temporary name *in the destination folder* (a rename is atomic only within one filesystem),
is flushed and fsynced, then renamed over the destination; the folder is fsynced so the rename itself survives a
crash. Leftover temporaries (``.<name>.tmp-*``) from a killed writer are removed by ``clean_partial``.

A folder (a DeepSpeed checkpoint) is written whole into a temporary sibling folder and then swapped in: the previous
folder is first renamed aside (``.<name>.old-*``), the new one renamed into place, then the old one removed. A kill
between the two renames leaves only the aside copy, which ``clean_partial`` renames back, so the previous folder is
never lost.

A write that fails for want of space (ENOSPC, EDQUOT, or torch's "unexpected pos" when the zip writer comes up short)
raises ``DiskFullError``: "no space left on device", the path, and that the previous file is kept.

Files get the mode the umask gives (``file_mode``), whatever mode their writer created them with.

``replace_link`` points a symlink elsewhere by renaming a new link over it (a reader resolves the old target or the new
one, never nothing); ``exclusive_lock`` serialises the processes that take it (fcntl), for src.artifacts.publish.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"  # a previous folder moved aside while its replacement is renamed in
CHECKSUM_SUFFIX = ".sha256"


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on a directory; the rename is still atomic
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temporary_sibling(path: str | Path) -> Path:
    """A fresh temporary name next to ``path`` (same folder, hence same filesystem)."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write ``path`` through (file or folder); on success it is fsynced and renamed
    into place, on any error it is removed and the previous ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        if tmp.is_dir():
            commit_folder(tmp, path)
        else:
            os.chmod(tmp, file_mode())  # some writers (safetensors) create 0600 whatever the umask
            _fsync_file(tmp)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
    except BaseException as err:
        _remove(tmp)
        if is_disk_full(err):
            kept = "the previous one is kept" if os.path.lexists(path) else "nothing was written"
            raise DiskFullError(errno.ENOSPC, f"no space left on device: writing {path} failed ({err}); {kept}. "
                                              f"Free space in {path.parent} and run again", str(path)) from err
        raise


class DiskFullError(OSError):
    """A write failed for want of space; errno ENOSPC, filename the destination."""


# what torch's zip writer (inline_container.cc; "iostream error" from the C++ stream of builds that write through one)
# and safetensors raise when a write comes up short
_SHORT_WRITE = ("unexpected pos", "file write failed", "iostream error", "No space left on device", "os error 28")


def is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(err, Exception) and any(m in str(err) for m in _SHORT_WRITE)


def replace_link(link: str | Path, target: str) -> None:
    """Points the symlink ``link`` at ``target`` by renaming a new link over it: atomic, so a reader resolves the old
    target or the new one, never nothing. ``link`` must not be a real folder (a rename cannot replace one)."""
    link = Path(link)
    tmp = temporary_sibling(link)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(link.parent)


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """Holds an exclusive fcntl lock on the file ``path`` (created, never removed) for the block; other processes
    taking it wait. Released by the kernel when the process dies, so a kill never leaves it held."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def file_mode() -> int:
    """0666 less the process umask: the mode a plain new file gets (0644 under the usual 022). Read from /proc, since
    setting the umask to read it would race with other threads creating files."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def commit_folder(tmp: str | Path, path: str | Path) -> Path:
    """Puts the finished folder ``tmp`` (a ``temporary_sibling(path)``, possibly written by several processes) in
    place of ``path``: its files fsynced, the previous ``path`` (folder, file or link) renamed aside, ``tmp`` renamed
    in, the aside copy removed. Interrupted at any point, ``path`` or its aside copy holds the previous content
    (``clean_partial`` restores it)."""
    tmp, path = Path(tmp), Path(path)
    for file in tmp.rglob("*"):
        if file.is_file():
            _fsync_file(file)
    _fsync_dir(tmp)
    if os.path.lexists(path):  # a folder cannot be renamed over a non-empty one: move the old aside first
        old = path.with_name(f".{path.name}{OLD_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(path, old)
        _fsync_dir(path.parent)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        _remove(old)
    else:
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write(path: str | Path, write: Callable[[Path], None], checksum: bool = False) -> Path:
    """``write(tmp_path)`` writes the content; it then replaces ``path`` atomically. With ``checksum`` a
    ``<path>.sha256`` file is written (atomically, after the content) for ``verify_checksum``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        write(tmp)
    if checksum:
        try:
            write_checksum(path)
        except BaseException:  # a stale checksum beside the new content would refuse it: leave none
            Path(str(path) + CHECKSUM_SUFFIX).unlink(missing_ok=True)
            raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_checksum(path: str | Path) -> str:
    digest = sha256_file(path)
    atomic_write_text(Path(str(path) + CHECKSUM_SUFFIX), f"{digest}  {Path(path).name}\n")
    return digest


class ChecksumError(ValueError):
    pass


def verify_checksum(path: str | Path) -> bool:
    """True when ``<path>.sha256`` exists and matches; False when there is none; ChecksumError on a mismatch."""
    path = Path(path)
    side = Path(str(path) + CHECKSUM_SUFFIX)
    if not side.is_file():
        return False
    expected = side.read_text().split()[0]
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(f"{path}: sha256 {actual[:12]}... does not match {side.name} ({expected[:12]}...): "
                            "the file is corrupt or was changed after it was written")
    return True


def clean_partial(folder: str | Path) -> list[Path]:
    """Removes temporaries left in ``folder`` (not recursive) by killed writers; returns what it removed. A previous
    folder left aside by a ``commit_folder`` killed between its renames is renamed back when nothing took its place."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        if not p.name.startswith("."):
            continue
        if OLD_MARK in p.name:
            original = folder / p.name[1:].rsplit(OLD_MARK, 1)[0]
            if not os.path.lexists(original):
                os.replace(p, original)
                _fsync_dir(folder)
                continue
        elif TMP_MARK not in p.name:
            continue
        _remove(p)
        removed.append(p)
    return removed


class InputError(ValueError):
    """A bad input file or config value, found before any training work; the message names the file or key."""


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per non-empty line; a missing, binary or empty file fails naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompt file not found: {path}")
    data = path.read_bytes()
    nul = data.find(bytes(1))
    if nul >= 0:
        raise InputError(f"prompt file {path}: holds a NUL byte (offset {nul}); is it a binary file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(f"prompt file {path}: line {line} is not UTF-8 text (byte {data[e.start]:#04x}); "
                         "is it a binary file?") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"prompt file {path} holds no prompts")
    return prompts


def _shard_urls(spec: str) -> str | list[str] | None:
    """Webdataset shards named by a folder of .tar files, a .tar file or a brace pattern; None if spec is none."""
    path = Path(spec)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if not shards:
            raise FileNotFoundError(f"prompt folder {spec} holds no .tar shards")
        return shards
    if spec.endswith(".tar") and "{" not in spec:
        if not path.is_file():
            raise FileNotFoundError(f"prompt shard not found: {spec}")
        return [spec]
    if ".tar" in spec and "{" in spec:
        return spec
    return None


def _shard_prompt(sample: dict) -> str:
    if "json" in sample:
        meta = json.loads(sample["json"])
        if isinstance(meta, dict) and "prompt" in meta:
            return str(meta["prompt"])
    if "txt" in sample:
        return sample["txt"].decode("utf-8")
    raise ValueError(f"shard sample {sample.get('__key__')!r} has no prompt (a json 'prompt' field or a .txt entry)")


def load_prompts(spec: str, limit: int | None = None) -> list[str]:
    """A prompt, a text file (one prompt per non-empty line) or webdataset shards of the toy world."""
    spec = str(spec)
    urls = _shard_urls(spec)
    if urls is not None:
        prompts = []
        import webdataset as wds  # only for shards

        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            if limit is not None and len(prompts) >= limit:
                break
            prompts.append(_shard_prompt(sample))
        source = f"shards {spec}"
    elif Path(spec).is_file():
        prompts = [line.strip() for line in Path(spec).read_text().splitlines() if line.strip()]
        source = f"prompt file {spec}"
    elif spec.endswith((".txt", ".tar")):
        raise FileNotFoundError(f"prompt file not found: {spec}")
    else:
        prompts = [spec.strip()] if spec.strip() else []
        source = "the prompts argument"
    prompts = prompts[:limit] if limit is not None else prompts
    if not prompts:
        raise ValueError(f"no prompts in {source}")
    return prompts
