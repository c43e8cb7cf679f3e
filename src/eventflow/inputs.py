"""Input locations: vetting (file paths under data roots, allow-listed URLs only) and resolution to paths."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

from eventflow.errors import InputError
from eventflow.settings import NdviSettings

#: Open a path without reading it (Linux only; 0 elsewhere, where resolution stays with pathlib).
_O_PATH = getattr(os, "O_PATH", 0)


class InputRejected(InputError):
    """An input location is not allowed; ``field`` names the request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def forbidden_host(host: str) -> bool:
    # Literal IPs in any spelling (127.1, 2130706433, ::1, 0x7f.1) are refused: remote inputs must name
    # an allow-listed host, and no allow-list entry is an address.
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        pass
    if host.replace(".", "").isdigit() or host.lower().startswith("0x"):
        return True
    return host.lower() in {"localhost", "metadata", "metadata.google.internal"} or host.endswith(".localhost")


def vet_href(field: str, href: str, settings: NdviSettings) -> None:
    """Raise InputRejected unless href is an allowed file:// path or allow-listed https/s3 URL."""
    if "/vsi" in href.lower():
        raise InputRejected(field, "GDAL virtual file systems (/vsi...) are not accepted")
    parts = urlsplit(href)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InputRejected(field, "file:// URIs must not name a host")
        raw = unquote(parts.path)
        # String checks, same answers as pathlib's: a ".." component anywhere; absolute means a leading "/".
        if ".." in raw.split("/"):
            raise InputRejected(field, "'..' is not allowed in paths")
        if not raw.startswith("/"):
            raise InputRejected(field, "file:// paths must be absolute")
        if "\x00" in raw:  # no file has such a name; the OS calls below would raise ValueError (a 500)
            raise InputRejected(field, "NUL is not allowed in paths")
        if not _under_roots(raw, settings.data_roots):
            raise InputRejected(field, "path is not under a configured data root (EVENTFLOW_NDVI__DATA_ROOTS)")
        return
    if scheme in ("https", "s3"):
        host = (parts.hostname or "").lower()
        if not host:
            raise InputRejected(field, f"{scheme} URL has no host")
        if forbidden_host(host):
            raise InputRejected(field, "addresses (loopback, private, link-local, metadata) are not accepted")
        if host not in {h.lower() for h in settings.allowed_hosts}:
            raise InputRejected(field, f"host {host!r} is not on the allow-list (EVENTFLOW_NDVI__ALLOWED_HOSTS)")
        return
    raise InputRejected(field, f"scheme {scheme or '(none)'!r} not supported; use file://, https:// or s3://")


def _under_roots(raw: str, roots: list[Path]) -> bool:
    """Whether the absolute path ``raw``, symlinks followed, lies under one of ``roots`` (already resolved).

    The common case asks the kernel: an O_PATH descriptor and its /proc/self/fd link name the file's real
    path in three system calls, where ``Path.resolve`` lstat()s and rebuilds every component in Python
    (bench/README.md, "ingest_bench.py"). That answer is used only when it equals ``raw`` (no symlink, no
    "." or "//" to normalise), so it is exactly the path ``Path.resolve`` would return; anything else (a
    symlink anywhere, a missing file, no /proc) takes ``Path.resolve``, which follows links, so a link
    pointing out of the roots is caught either way.
    """
    real = _kernel_realpath(raw)
    if real != raw:
        real = str(Path(raw).resolve())
    return any(_is_within(real, str(root)) for root in roots)


def _is_within(path: str, root: str) -> bool:
    # Component-wise, as PurePath.is_relative_to: /data/x is under /data, /database is not.
    return path == root or path.startswith(root if root.endswith("/") else root + "/")


def _kernel_realpath(path: str) -> str | None:
    """The kernel's name for the file at ``path`` (symlinks resolved), or None where it cannot tell."""
    if not _O_PATH:
        return None
    try:
        fd = os.open(path, _O_PATH | os.O_CLOEXEC)
    except (OSError, ValueError):  # missing, not searchable, NUL in the path
        return None
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no /proc (or not Linux)
        return None
    finally:
        os.close(fd)


def local_path(field: str, href: str, settings: NdviSettings) -> Path:
    """Vet a file:// href again (consumers trust nothing on the stream) and return its local path.

    Remote (https/s3) inputs go through eventflow.fetch instead, never through GDAL's network drivers.
    """
    vet_href(field, href, settings)
    parts = urlsplit(href)
    if parts.scheme.lower() != "file":
        raise InputRejected(field, f"{parts.scheme} inputs are downloaded by eventflow.fetch, not opened in place")
    return Path(unquote(parts.path)).resolve()
