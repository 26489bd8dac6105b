"""`/metrics`, `/healthz` and `/readyz` for the processor and workers (the gateway has them as routes).

`ObservabilityServer` is a small HTTP/1.1 server on the process's own event loop:
a scrape reads live state on the loop that changes it (no thread races), and a
loop too blocked to answer is seen as unhealthy, which it is.

- ``GET /metrics``: every metric of the process (Prometheus text format).
- ``GET /healthz``: 200 while the process works (its `health` check says nothing
  is broken), else 503 with the reason. It says nothing of Kafka: a broker outage
  is not a reason to restart the process.
- ``GET /readyz``: 200 when Kafka answers a metadata request within a couple of
  seconds, treeflow's topics exist, and the component's own `readiness` check
  passes (the processor: every partition it owns is recovered); else 503 with
  each failed check.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from treeflow.kafka import KafkaSettings
from treeflow.kafka.topics import partition_counts

log = logging.getLogger(__name__)

METRICS_PORT_ENV = "TREEFLOW_METRICS_PORT"
#: How long a readiness probe waits for Kafka.
PROBE_TIMEOUT = 2.0

#: A check: None when fine, else what is wrong (one line).
Check = Callable[[], str | None]


def metrics_port(given: int | None) -> int | None:
    """`--metrics-port` when given, else `TREEFLOW_METRICS_PORT`, else None (no server)."""
    if given is not None:
        return given
    text = os.environ.get(METRICS_PORT_ENV, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) > 65535:
        raise ValueError(f"{METRICS_PORT_ENV}={text!r} is not a port number")
    return int(text)


class KafkaProbe:
    """Asks Kafka, on a fresh connection, for the metadata of `topics` (named, with
    auto-creation disallowed: the probe never creates a topic) and checks they exist."""

    def __init__(self, settings: KafkaSettings, topics: Iterable[str]) -> None:
        self.settings = settings
        self.topics = sorted(set(topics))

    async def check(self, timeout: float = PROBE_TIMEOUT) -> str | None:
        """None when Kafka answered and the topics exist, else what is wrong."""
        try:
            async with asyncio.timeout(timeout):
                counts = await partition_counts(self.settings, self.topics, "readiness")
        except TimeoutError:
            return f"Kafka at {self.settings.bootstrap_servers} did not answer within {timeout:g} s"
        except Exception as error:  # noqa: BLE001 - the probe's answer
            return f"Kafka at {self.settings.bootstrap_servers} does not answer: {error}"
        missing = [topic for topic in self.topics if topic not in counts]
        if missing:
            return f"topics missing: {', '.join(missing)} (create them with `treeflow topics create`)"
        return None


@dataclass
class Health:
    """What `/healthz` and `/readyz` check, for one process (a process may host several components)."""

    #: Each returns None when the component works, else why not: `/healthz`.
    liveness: list[Check] = field(default_factory=list)
    #: Each returns None when the component can serve, else why not: `/readyz` (besides Kafka).
    readiness: list[Check] = field(default_factory=list)
    probe: KafkaProbe | None = None

    async def live(self) -> tuple[bool, dict[str, Any]]:
        problems = [problem for check in self.liveness if (problem := check())]
        return not problems, {"status": "failed" if problems else "ok", "problems": problems}

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        problems = [problem for check in (*self.liveness, *self.readiness) if (problem := check())]
        if self.probe is not None and (kafka := await self.probe.check()):
            problems.insert(0, kafka)
        return not problems, {"status": "not ready" if problems else "ready", "problems": problems}


class ObservabilityServer:
    """Serves `/metrics`, `/healthz` and `/readyz` on `host:port` (port 0: a free one)."""

    def __init__(self, health: Health, *, port: int, host: str = "0.0.0.0") -> None:
        self.health = health
        self.host = host
        self.requested_port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.requested_port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # headers: nothing here needs them
            parts = request.decode("latin-1").split()
            method, path = (parts[0], parts[1].split("?", 1)[0]) if len(parts) >= 2 else ("", "")
            status, content_type, body = await self._answer(method, path)
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n")
            writer.write(head.encode("latin-1") + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        except Exception:  # noqa: BLE001 - one bad request must not stop the server
            log.exception("observability request failed")
        finally:
            writer.close()

    async def _answer(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
        checks: dict[str, Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]] = {
            "/healthz": self.health.live, "/readyz": self.health.ready}
        if path in checks:
            ok, answer = await checks[path]()
            return ("200 OK" if ok else "503 Service Unavailable"), "application/json", \
                (json.dumps(answer) + "\n").encode()
        return "404 Not Found", "text/plain", b"/metrics, /healthz or /readyz\n"


async def serve_observability(port: int | None, health: Health, *, host: str = "0.0.0.0") -> ObservabilityServer | None:
    """Start an `ObservabilityServer` on `port` (None: `TREEFLOW_METRICS_PORT`, unset: none, returns None)."""
    chosen = metrics_port(port)
    if chosen is None:
        return None
    server = ObservabilityServer(health, port=chosen, host=host)
    await server.start()
    return server
