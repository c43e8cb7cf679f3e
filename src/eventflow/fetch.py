"""The vetted fetcher for remote inputs (https://, s3://): a download to a local file that the engine then
opens with its local drivers only (GTiff, JP2), so GDAL never touches the network for a user's input.

What it refuses, and why each check sits where it does:
* a host not on ``ndvi.allowed_hosts`` (an s3:// URL names its bucket there), at admission and again here;
* any resolved address that is not public (loopback, private, link-local/metadata, CGNAT, multicast,
  IPv4-mapped forms of those) unless inside ``ndvi.fetch_allowed_networks``: checked on the addresses
  the name resolves to *now*, and the connection goes to exactly that vetted address (TLS still verifies
  the certificate for the host name), so DNS rebinding between check and connect is impossible;
* redirects are followed by hand, at most ``MAX_REDIRECTS``, each hop vetted like the first (https only,
  allow-listed host, public address);
* bodies larger than ``ndvi.fetch_max_bytes`` (by Content-Length up front, by counting otherwise): the
  partial file is deleted.

Failures of the remote store itself (DNS failure, refused connection, timeout, 5xx, 429) are transient
``DependencyUnavailable("input_store")``: retried with backoff and counted by the input-store breaker.
Everything else (4xx, a forbidden address, too large, bad certificate) is a permanent InputError.
Only public objects are fetched: request signing for private buckets is not implemented.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

from eventflow.errors import DependencyUnavailable, InputError
from eventflow.inputs import InputRejected, forbidden_host
from eventflow.settings import NdviSettings

MAX_REDIRECTS = 3
CHUNK = 1 << 20

#: host, port -> the IP addresses it resolves to (injectable so tests can point names at test servers).
Resolver = Callable[[str, int], list[str]]


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (IPv4 and IPv6)."""
    return sorted({str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


def address_allowed(ip: str, allowed_networks: list[str]) -> bool:
    """True for a public unicast address, or one inside an explicitly allowed network."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:169.254.169.254 is the metadata address
    if any(addr in ipaddress.ip_network(net, strict=False) for net in allowed_networks):
        return True
    return addr.is_global and not addr.is_multicast


def remote_url(href: str, settings: NdviSettings) -> str:
    """The https URL of an https:// or s3:// input (s3 through ``ndvi.s3_url_template``)."""
    parts = urlsplit(href)
    if parts.scheme.lower() == "s3":
        return settings.s3_url_template.format(bucket=parts.hostname or "", key=quote(parts.path.lstrip("/")))
    return href


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to one vetted address, with SNI and certificate checks for the host name."""

    def __init__(self, host: str, port: int, address: str, context: ssl.SSLContext, timeout: float) -> None:
        super().__init__(host, port, context=context, timeout=timeout)
        self._address = address
        self._context = context

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)


def _context(settings: NdviSettings) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if settings.fetch_ca_file is not None:
        context.load_verify_locations(cafile=str(settings.fetch_ca_file))
    return context


def fetch(field: str, href: str, dest: Path, settings: NdviSettings, resolver: Resolver | None = None) -> Path:
    """Download ``href`` to ``dest`` after vetting every hop; return ``dest``."""
    if resolver is None:
        def resolver(host: str, port: int) -> list[str]:
            fixed = settings.fetch_resolve.get(host)
            return [fixed] if fixed else system_resolver(host, port)
    url = remote_url(href, settings)
    first_host = (urlsplit(url).hostname or "").lower()
    allowed_hosts = {h.lower() for h in settings.allowed_hosts} | {first_host}
    context = _context(settings)
    for _hop in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if parts.scheme.lower() != "https":
            raise InputRejected(field, f"only https is fetched; refused {parts.scheme}:// (after a redirect?)")
        if not host or forbidden_host(host) or host not in allowed_hosts:
            raise InputRejected(field, f"host {host!r} is not on the allow-list (EVENTFLOW_NDVI__ALLOWED_HOSTS)")
        port = parts.port or 443
        try:
            addresses = resolver(host, port)
        except OSError as exc:
            raise DependencyUnavailable("input_store", f"{field}: cannot resolve {host}: {exc}") from exc
        bad = [ip for ip in addresses if not address_allowed(ip, settings.fetch_allowed_networks)]
        if not addresses or bad:
            raise InputRejected(field, f"host {host!r} resolves to a non-public address ({', '.join(bad) or 'none'})")
        conn = _PinnedHTTPSConnection(host, port, addresses[0], context, settings.fetch_timeout_s)
        try:
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("GET", target, headers={"User-Agent": "eventflow-fetch/1", "Accept-Encoding": "identity"})
            response = conn.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location:
                    raise InputError(f"{field}: redirect without a Location from {host}")
                url = urljoin(url, location)
                continue
            if response.status == 429 or response.status >= 500:
                raise DependencyUnavailable("input_store", f"{field}: {host} answered {response.status}")
            if response.status != 200:
                raise InputError(f"{field}: {host} answered {response.status} {response.reason}")
            length = response.getheader("Content-Length")
            if length is not None and int(length) > settings.fetch_max_bytes:
                raise InputRejected(field, f"remote input is {int(length)} bytes, above "
                                           f"EVENTFLOW_NDVI__FETCH_MAX_BYTES ({settings.fetch_max_bytes})")
            _stream(response, dest, field, settings.fetch_max_bytes)
            return dest
        except ssl.SSLCertVerificationError as exc:
            raise InputError(f"{field}: TLS certificate of {host} not trusted: {exc.verify_message}") from exc
        except (TimeoutError, ConnectionError, http.client.HTTPException, ssl.SSLError) as exc:
            raise DependencyUnavailable("input_store", f"{field}: fetching from {host} failed: {exc}") from exc
        finally:
            conn.close()
    raise InputRejected(field, f"more than {MAX_REDIRECTS} redirects")


def _stream(response: http.client.HTTPResponse, dest: Path, field: str, cap: int) -> None:
    partial = dest.with_name(f".{dest.name}.partial")
    total = 0
    try:
        with partial.open("wb") as out:
            while chunk := response.read(CHUNK):
                total += len(chunk)
                if total > cap:
                    raise InputRejected(field, f"remote input exceeds EVENTFLOW_NDVI__FETCH_MAX_BYTES ({cap})")
                out.write(chunk)
        partial.replace(dest)
    finally:
        partial.unlink(missing_ok=True)
