"""The vetted fetcher against a real HTTPS server on 127.0.0.1 (self-signed certificate made with the
openssl CLI), with host names pinned through ndvi.fetch_resolve (the curl --resolve equivalent): what it
downloads, and every way it refuses (issue 5)."""

from __future__ import annotations

import http.server
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eventflow_consumer.handlers import JobContext, run_ndvi_job

from eventflow.contract import NdviJobRequest
from eventflow.errors import DependencyUnavailable, InputError
from eventflow.fetch import address_allowed, fetch
from eventflow.inputs import InputRejected
from eventflow.settings import NdviSettings
from tests.jobs import entry_for

REPO = Path(__file__).resolve().parents[2]
L7 = REPO / "tests/data/r-cran-stars/L7_ETMs.tif"

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl CLI makes the test certificate")


class Server:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.requests: list[str] = []
        key, cert = directory / "key.pem", directory / "cert.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "1", "-subj", "/CN=tiles.test",
                        "-addext", "subjectAltName=DNS:tiles.test,DNS:mirror.test,DNS:evil.test"],
                       check=True, capture_output=True)
        self.cert = cert
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append(f"{self.headers['Host']}{self.path}")
                port = self.server.server_address[1]
                routes = {
                    "/scene.tif": lambda: self._file(L7),
                    "/to-mirror": lambda: self._redirect(f"https://mirror.test:{port}/scene.tif"),
                    "/to-evil": lambda: self._redirect(f"https://evil.test:{port}/scene.tif"),
                    "/to-elsewhere": lambda: self._redirect(f"https://elsewhere.test:{port}/scene.tif"),
                    "/to-http": lambda: self._redirect("http://tiles.test/scene.tif"),
                    "/to-metadata": lambda: self._redirect("https://169.254.169.254/latest/meta-data/"),
                    "/loop": lambda: self._redirect("/loop"),
                    "/big-declared": lambda: self._headers(200, {"Content-Length": str(10**12)}),
                    "/big-streamed": self._stream_forever,
                    "/busy": lambda: self._headers(503, {"Content-Length": "0"}),
                    "/gone": lambda: self._headers(404, {"Content-Length": "0"}),
                }
                routes.get(self.path, lambda: self._headers(404, {"Content-Length": "0"}))()

            def _headers(self, code: int, headers: dict[str, str]) -> None:
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()

            def _file(self, path: Path) -> None:
                data = path.read_bytes()
                self._headers(200, {"Content-Length": str(len(data))})
                self.wfile.write(data)

            def _redirect(self, location: str) -> None:
                self._headers(302, {"Location": location, "Content-Length": "0"})

            def _stream_forever(self) -> None:
                self._headers(200, {})  # no Content-Length: the body runs until the connection closes
                try:
                    for _ in range(64):
                        self.wfile.write(b"\0" * 65536)
                except OSError:
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, host: str, path: str) -> str:
        return f"https://{host}:{self.port}{path}"

    def settings(self, **extra: Any) -> NdviSettings:
        base: dict[str, Any] = {
            "allowed_hosts": ["tiles.test", "mirror.test", "evil.test"],
            "fetch_resolve": {"tiles.test": "127.0.0.1", "mirror.test": "127.0.0.1", "evil.test": "10.9.8.7"},
            "fetch_allowed_networks": ["127.0.0.0/8"],  # the test server; 10.9.8.7 stays forbidden
            "fetch_ca_file": str(self.cert),
            "fetch_max_bytes": 2_000_000,
        }
        return NdviSettings.model_validate({**base, **extra})


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("https"))
    yield s
    s.httpd.shutdown()


def test_downloads_an_allow_listed_public_object(server: Server, tmp_path: Path) -> None:
    got = fetch("inputs.href", server.url("tiles.test", "/scene.tif"), tmp_path / "a.tif", server.settings())
    assert got.read_bytes() == L7.read_bytes()


def test_follows_a_redirect_to_another_allowed_host(server: Server, tmp_path: Path) -> None:
    got = fetch("inputs.href", server.url("tiles.test", "/to-mirror"), tmp_path / "a.tif", server.settings())
    assert got.read_bytes() == L7.read_bytes()
    assert server.requests[-1].startswith("mirror.test")


@pytest.mark.parametrize(("path", "message"), [
    ("/to-evil", r"non-public address \(10\.9\.8\.7\)"),  # allow-listed name, private address
    ("/to-elsewhere", "not on the allow-list"),
    ("/to-http", "only https"),
    ("/to-metadata", "not on the allow-list"),  # a literal address is never an allowed host
    ("/loop", "redirects"),
])
def test_redirects_are_vetted_like_the_first_hop(server: Server, tmp_path: Path, path: str, message: str) -> None:
    before = len(server.requests)
    with pytest.raises(InputRejected, match=message):
        fetch("inputs.href", server.url("tiles.test", path), tmp_path / "a.tif", server.settings())
    assert not list(tmp_path.iterdir())
    assert all("evil.test" not in r and "169.254" not in r for r in server.requests[before:])


def test_a_name_resolving_to_the_metadata_address_is_never_contacted(server: Server, tmp_path: Path) -> None:
    settings = server.settings(fetch_resolve={"tiles.test": "169.254.169.254"})
    with pytest.raises(InputRejected, match=r"169\.254\.169\.254"):
        fetch("inputs.href", server.url("tiles.test", "/scene.tif"), tmp_path / "a.tif", settings)
    # Negative control: the same request with the server's network allowed goes through.
    assert fetch("inputs.href", server.url("tiles.test", "/scene.tif"), tmp_path / "b.tif", server.settings())


def test_loopback_needs_an_explicit_network(server: Server, tmp_path: Path) -> None:
    with pytest.raises(InputRejected, match=r"127\.0\.0\.1"):
        fetch("inputs.href", server.url("tiles.test", "/scene.tif"), tmp_path / "a.tif",
              server.settings(fetch_allowed_networks=[]))


@pytest.mark.parametrize("path", ["/big-declared", "/big-streamed"])
def test_size_cap(server: Server, tmp_path: Path, path: str) -> None:
    with pytest.raises(InputRejected, match="FETCH_MAX_BYTES"):
        fetch("inputs.href", server.url("tiles.test", path), tmp_path / "a.tif", server.settings())
    assert not list(tmp_path.iterdir()), "a partial download was left behind"


def test_store_errors_are_transient_and_client_errors_permanent(server: Server, tmp_path: Path) -> None:
    with pytest.raises(DependencyUnavailable) as busy:
        fetch("inputs.href", server.url("tiles.test", "/busy"), tmp_path / "a.tif", server.settings())
    assert busy.value.dependency == "input_store"
    with pytest.raises(InputError, match="404"):
        fetch("inputs.href", server.url("tiles.test", "/gone"), tmp_path / "a.tif", server.settings())
    with pytest.raises(DependencyUnavailable, match="cannot resolve"):
        fetch("inputs.href", "https://unresolvable.invalid/x.tif", tmp_path / "a.tif",
              server.settings(allowed_hosts=["unresolvable.invalid"]))


def test_an_untrusted_certificate_is_refused(server: Server, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not trusted"):
        fetch("inputs.href", server.url("tiles.test", "/scene.tif"), tmp_path / "a.tif",
              server.settings(fetch_ca_file=None))


@pytest.mark.parametrize(("ip", "ok"), [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True),
    ("127.0.0.1", False), ("10.0.0.1", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("::1", False), ("fe80::1", False), ("fd00::1", False), ("::ffff:169.254.169.254", False),
    ("::ffff:8.8.8.8", True),
])
def test_address_rules(ip: str, ok: bool) -> None:
    assert address_allowed(ip, []) is ok


def test_a_job_with_an_https_input_matches_the_local_file(server: Server, tmp_path: Path) -> None:
    def run(href: str, ndvi: NdviSettings) -> dict[str, Any]:
        request = NdviJobRequest.model_validate({"farm_id": "f", "inputs": {"href": href, "red_band": 3,
                                                                            "nir_band": 4}})
        return run_ndvi_job(entry_for(request), JobContext(ndvi=ndvi, output_dir=tmp_path / href.rsplit("/", 1)[0][-6:],
                                              fence=1, progress=lambda _: None, stop=threading.Event()))

    remote = run(server.url("tiles.test", "/scene.tif"), server.settings())
    local = run(L7.as_uri(), server.settings(data_roots=[str(L7.parent)]))
    assert remote["stats"] == local["stats"]
    assert not list(tmp_path.rglob(".inputs-*")), "the downloaded input was not cleaned up"
