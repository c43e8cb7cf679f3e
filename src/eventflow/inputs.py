"""Input locations: vetting (file paths under data roots, allow-listed URLs only) and resolution to paths."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from urllib.parse import unquote, urlsplit

from eventflow.errors import InputError
from eventflow.settings import NdviSettings


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
    if href.lower().startswith("/vsi") or "/vsi" in href.lower():
        raise InputRejected(field, "GDAL virtual file systems (/vsi...) are not accepted")
    parts = urlsplit(href)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InputRejected(field, "file:// URIs must not name a host")
        raw = unquote(parts.path)
        if ".." in Path(raw).parts:
            raise InputRejected(field, "'..' is not allowed in paths")
        path = Path(raw)
        if not path.is_absolute():
            raise InputRejected(field, "file:// paths must be absolute")
        resolved = path.resolve()  # follows symlinks, so a link pointing out of the roots is caught
        if not any(resolved.is_relative_to(root) for root in settings.data_roots):
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


def local_path(field: str, href: str, settings: NdviSettings) -> Path:
    """Vet a file:// href again (consumers trust nothing on the stream) and return its local path.

    Remote (https/s3) inputs go through eventflow.fetch instead, never through GDAL's network drivers.
    """
    vet_href(field, href, settings)
    parts = urlsplit(href)
    if parts.scheme.lower() != "file":
        raise InputRejected(field, f"{parts.scheme} inputs are downloaded by eventflow.fetch, not opened in place")
    return Path(unquote(parts.path)).resolve()
