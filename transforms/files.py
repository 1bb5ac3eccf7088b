"""Shared file I/O for stages and the run: atomic writes, JSON files, the WebDataset shard reader.

Everything goes through Beam's FileSystems where the path may be remote (gs://, s3://), so
local and object-store outputs behave alike.  A file is written complete under a temporary
name and then renamed into place, so a reader never sees half of it.
"""
from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import tarfile
import zlib
from dataclasses import dataclass
from typing import IO, Any, Callable, Collection, Dict, Iterator, Optional, Tuple, Union

from apache_beam.io.filesystems import FileSystems


def is_remote(path: str) -> bool:
    """True for a path on an object store or another filesystem named by a scheme."""
    return "://" in path


def write_atomically(path: str, data: Union[bytes, Callable[[IO[bytes]], Any]],
                     temp: Optional[str] = None, create_folder: bool = True,
                     mime_type: str = "application/octet-stream") -> Any:
    """Write ``data`` (bytes, or a function that writes to a handle) complete, then rename it to ``path``.

    The temporary file is ``temp`` (default ``path + ".incomplete"``).  On a local disk the
    rename replaces an existing file atomically; object stores cannot rename over an
    object, so there it is deleted first.  Without ``create_folder`` a missing local folder
    raises FileNotFoundError (a worker must not recreate a folder the run has deleted).
    Returns what the writing function returned (None for bytes).
    """
    temp = temp or path + ".incomplete"
    if callable(data):
        write = data
    else:
        def write(handle: IO[bytes]) -> None:
            handle.write(data)
    if not is_remote(path):
        if create_folder:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(temp, "wb") as handle:
            result = write(handle)
        os.replace(temp, path)
        return result
    handle = FileSystems.create(temp, mime_type=mime_type)
    try:
        result = write(handle)
    finally:
        handle.close()
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([temp], [path])
    return result


def write_json(path: str, value: Any) -> None:
    """Write JSON (indented, keys sorted), complete-then-rename."""
    write_atomically(path, json.dumps(value, indent=2, sort_keys=True, default=str).encode("utf-8"),
                     mime_type="application/json")


def read_json(path: str) -> Any:
    with FileSystems.open(path) as handle:
        return json.loads(handle.read().decode("utf-8"))


# --------------------------------------------------------------------------- shard reader

#: Image members a sample may have, in the order a reader prefers them.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def split_member(name: str) -> Tuple[str, str]:
    """WebDataset naming: 'dir/0001.jpg' -> ('dir/0001', 'jpg'); the key ends at the basename's first dot."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (os.path.join(folder, stem) if folder else stem), ext.lower()


@dataclass(frozen=True)
class OversizedMember:
    """Stands for a member over the reader's size limit: its bytes were skipped, never read."""
    name: str
    size: int


class CorruptShard(tarfile.ReadError):
    """A shard that cannot be read to its end; samples before the damage were yielded.

    ``pending`` is the key whose members were being collected when the damage
    was hit (its sample was not yielded), or None.
    """

    def __init__(self, reason: str, pending: Optional[str] = None):
        super().__init__(reason)
        self.reason = reason
        self.pending = pending


#: Largest extended header (pax, GNU long name) read: tarfile reads one whole into memory.
MAX_EXTENDED_HEADER = 1 << 20
_EXTENDED = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
             tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses an extended header larger than MAX_EXTENDED_HEADER before tarfile reads it."""

    def _proc_member(self, tarfile_):  # tarfile's hook for header types
        if self.type in _EXTENDED and self.size > MAX_EXTENDED_HEADER:
            raise tarfile.HeaderError(f"extended header of {self.size} bytes for {self.name!r}")
        return super()._proc_member(tarfile_)


#: What a damaged tar or gzip stream raises while being read.
_DAMAGE = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)


class _Prefixed(io.RawIOBase):
    """A stream with bytes already read from it put back in front."""

    def __init__(self, head: bytes, rest):
        self._head = head
        self._rest = rest

    def readable(self):
        return True

    def readinto(self, buffer):
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n], self._head = self._head[:n], self._head[n:]
            return n
        data = self._rest.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


#: Magic bytes of the compressions a shard may use, and their streaming readers.
_COMPRESSIONS = ((b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f, mode="rb")),
                 (b"BZh", lambda f: bz2.BZ2File(f)),
                 (b"\xfd7zXZ\x00", lambda f: lzma.LZMAFile(f)))


def _decompressed(handle):
    """The tar stream inside ``handle``, decompressed by the library streams.

    tarfile's own "r|gz" keeps what one read decompressed and copies it on
    every block, which takes minutes to skip over a highly compressible member;
    gzip/bz2/lzma's readers decompress at most what is asked for.
    """
    head = handle.read(6)
    stream = io.BufferedReader(_Prefixed(head, handle), 1 << 16)
    for magic, reader in _COMPRESSIONS:
        if head.startswith(magic):
            return reader(stream)
    return stream


#: tarfile's stream buffer.  Each read from it copies what is left of the buffer,
#: so a large one costs a copy of up to its size per member header: 1 MiB made
#: reading a shard of small images three times slower than 64 KiB.
_TAR_BUFFER = 1 << 16


def iter_samples(handle, extensions: Optional[Collection[str]] = None,
                 max_member_bytes: Optional[int] = None) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """(key, {extension: bytes}) for each sample of a tar stream (members of a key are adjacent).

    With ``extensions``, other members are skipped without reading their bytes
    (the stream is read past them in small blocks).  With ``max_member_bytes``,
    a larger member is not read either: it appears as an OversizedMember.  A
    damaged stream raises CorruptShard after the samples before the damage.
    """
    current: Optional[str] = None
    members: Dict[str, Any] = {}
    try:
        with tarfile.open(fileobj=_decompressed(handle), mode="r|", bufsize=_TAR_BUFFER,
                          tarinfo=_BoundedTarInfo) as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = split_member(info.name)
                if not ext or os.path.basename(key).startswith("."):
                    continue  # no extension, or a hidden file: not part of a sample
                if extensions is not None and ext not in extensions:
                    continue
                if key != current:
                    if current is not None:
                        yield current, members
                    current, members = key, {}
                if max_member_bytes is not None and info.size > max_member_bytes:
                    members[ext] = OversizedMember(info.name, info.size)
                else:
                    members[ext] = tar.extractfile(info).read()
    except _DAMAGE as exc:
        raise CorruptShard(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__,
                           current) from exc
    if current is not None:
        yield current, members


def iter_shard(path: str, extensions: Optional[Collection[str]] = None,
               max_member_bytes: Optional[int] = None) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """iter_samples over a shard file (local, gs://, s3://; plain or gzip-compressed tar)."""
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        yield from iter_samples(handle, extensions, max_member_bytes)
