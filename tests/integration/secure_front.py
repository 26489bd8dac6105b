"""A TLS and SASL front for the embedded broker, for the security tests.

Tansu 0.6.0 cannot be secured from its command line: its `--cert` and `--key` options
share a clap argument group that allows only one of them, and TLS needs both; with
`--authentication` it offers no PLAIN, and SCRAM users cannot be created (`tansu user
create` is refused by an authenticating broker, and its in-memory storage does not
survive the restart in between). So the tests put this front between treeflow and
Tansu: it terminates TLS (optionally requiring a client certificate), runs the server
side of Kafka's SASL exchange (SaslHandshake v0/v1 + SaslAuthenticate v0/v1, RFC 4616
PLAIN and RFC 5802/7677 SCRAM-SHA-256/512, checking the password), then relays the
connection's bytes to Tansu. Tansu advertises the front's address, so every
connection a client opens, bootstrap or not, goes through it.

Before a connection authenticated, only ApiVersions is relayed; any other request
closes it (as Kafka does), and is counted in `refused`.

With `kafka_metadata=True` (no TLS or SASL needed) the front also gives Tansu Apache
Kafka's Metadata semantics, which Tansu lacks (DESIGN.md §8): a Metadata request (v1+)
with an EMPTY topic list is answered with no topics (Tansu answers every topic), and
each request that names topics with ``allow_auto_topic_creation=true`` is recorded in
`auto_create_requests` (Kafka with its default ``auto.create.topics.enable=true`` would
create a missing one).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import ssl
import struct
from dataclasses import dataclass, field

METADATA, API_VERSIONS, SASL_HANDSHAKE, SASL_AUTHENTICATE = 3, 18, 17, 36
ILLEGAL_SASL_STATE, UNSUPPORTED_SASL_MECHANISM, SASL_AUTHENTICATION_FAILED = 34, 33, 58
SCRAM_HASHES = {"SCRAM-SHA-256": hashlib.sha256, "SCRAM-SHA-512": hashlib.sha512}
MECHANISMS = ["PLAIN", *SCRAM_HASHES]


@dataclass
class SecureFront:
    upstream_port: int
    port: int
    #: Server-side TLS; None for SASL_PLAINTEXT.
    tls: ssl.SSLContext | None = None
    #: Users and passwords; None: no SASL (SSL only).
    users: dict[str, str] | None = None
    #: client_id of each authenticated (or, without SASL, TLS) connection, and its user.
    authenticated: list[tuple[str, str]] = field(default_factory=list)
    #: Connections closed for a request sent before authenticating, or a failed login.
    refused: int = 0
    failed_logins: int = 0
    kafka_metadata: bool = False
    #: (client_id, topics) of each Metadata request that allowed auto-creation.
    auto_create_requests: list[tuple[str, list[str]]] = field(default_factory=list)
    #: Metadata requests with an empty topic list, answered with no topics.
    empty_metadata_requests: int = 0
    _server: asyncio.AbstractServer | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> SecureFront:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=self.tls)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        try:
            ok, first = await self._authenticate(reader, writer, up_reader, up_writer)
            if ok and self.kafka_metadata:
                await self._relay_frames(reader, writer, up_reader, up_writer, first)
            elif ok:
                if first is not None:
                    up_writer.write(struct.pack(">i", len(first)) + first)
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._tasks.discard(task)
            for w in (writer, up_writer):
                w.close()

    async def _authenticate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter
                            ) -> tuple[bool, bytes | None]:
        """Whether the connection may go on, and a first request read but not relayed yet."""
        mechanism: str | None = None
        scram: _ScramServer | None = None
        while True:
            frame = await _read_frame(reader)
            api_key, version, correlation, client_id, body = _parse_request(frame)
            if self.users is None:  # TLS only (or nothing): the handshake already happened
                self.authenticated.append((client_id, ""))
                return True, frame
            if api_key == API_VERSIONS:
                up_writer.write(struct.pack(">i", len(frame)) + frame)
                writer.write(await _read_frame_with_size(up_reader))
                continue
            if api_key == SASL_HANDSHAKE:
                (length,) = struct.unpack_from(">h", body)
                mechanism = body[2:2 + length].decode()
                error = 0 if mechanism in MECHANISMS else UNSUPPORTED_SASL_MECHANISM
                names = b"".join(struct.pack(">h", len(m)) + m.encode() for m in MECHANISMS)
                _respond(writer, correlation, struct.pack(">hi", error, len(MECHANISMS)) + names)
                if error:
                    self.refused += 1
                    return False, None
                if mechanism in SCRAM_HASHES:
                    scram = _ScramServer(SCRAM_HASHES[mechanism], self.users)
                continue
            if api_key == SASL_AUTHENTICATE and mechanism is not None:
                (length,) = struct.unpack_from(">i", body)
                auth_bytes = body[4:4 + length]
                if scram is not None:
                    reply, user, error = scram.step(auth_bytes)
                else:
                    reply, user, error = _plain(auth_bytes, self.users)
                _respond_authenticate(writer, correlation, version, error, reply)
                if error:
                    self.failed_logins += 1
                    return False, None
                if user is not None:
                    self.authenticated.append((client_id, user))
                    return True, None
                continue
            self.refused += 1  # a request before authenticating: Kafka closes the connection
            return False, None


    async def _relay_frames(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter,
                            first: bytes | None) -> None:
        """Relay request by request (responses come back in order on a connection)."""
        pending: asyncio.Queue[tuple[int, int, bool]] = asyncio.Queue()

        async def requests() -> None:
            frame = first
            while True:
                if frame is None:
                    frame = await _read_frame(reader)
                api_key, version, _, client_id, body = _parse_request(frame)
                empty = False
                if api_key == METADATA and version >= 1:
                    topics, allow = _metadata_request(version, body)
                    empty = topics == []
                    self.empty_metadata_requests += empty
                    if topics and allow:
                        self.auto_create_requests.append((client_id, topics))
                await pending.put((api_key, version, empty))
                up_writer.write(struct.pack(">i", len(frame)) + frame)
                await up_writer.drain()
                frame = None

        async def responses() -> None:
            while True:
                frame = await _read_frame(up_reader)
                api_key, version, empty = await pending.get()
                if empty:
                    frame = _without_topics(version, frame)
                writer.write(struct.pack(">i", len(frame)) + frame)
                await writer.drain()

        await asyncio.gather(requests(), responses())


def _metadata_request(version: int, body: bytes) -> tuple[list[str] | None, bool]:
    (count,) = struct.unpack_from(">i", body)
    offset, names = 4, []
    for _ in range(max(count, 0)):
        (length,) = struct.unpack_from(">h", body, offset)
        names.append(body[offset + 2:offset + 2 + length].decode())
        offset += 2 + length
    allow = True if version < 4 else bool(body[offset])
    return (None if count < 0 else names), allow


def _without_topics(version: int, frame: bytes) -> bytes:
    """A Metadata response (v1-v5) with its topic array emptied."""
    offset = 4 + (4 if version >= 3 else 0)  # correlation id, throttle time
    (brokers,) = struct.unpack_from(">i", frame, offset)
    offset += 4
    for _ in range(brokers):
        offset += 4  # node id
        (length,) = struct.unpack_from(">h", frame, offset)
        offset += 2 + length + 4  # host, port
        (length,) = struct.unpack_from(">h", frame, offset)
        offset += 2 + max(length, 0)  # rack
    if version >= 2:
        (length,) = struct.unpack_from(">h", frame, offset)
        offset += 2 + max(length, 0)  # cluster id
    offset += 4  # controller id
    return frame[:offset] + struct.pack(">i", 0)


class _ScramServer:
    def __init__(self, hash_name: object, users: dict[str, str]) -> None:
        self.hash = hash_name
        self.users = users
        self.first: str | None = None
        self.server_first: str | None = None
        self.user: str | None = None
        self.salt = os.urandom(16)
        self.iterations = 4096

    def step(self, data: bytes) -> tuple[bytes, str | None, str | None]:
        message = data.decode()
        if self.first is None:
            bare = message.split(",", 2)[2]  # drop the gs2 header "n,,"
            fields = dict(part.split("=", 1) for part in bare.split(","))
            self.user, self.first = fields["n"], bare
            nonce = fields["r"] + base64.b64encode(os.urandom(18)).decode()
            self.server_first = f"r={nonce},s={base64.b64encode(self.salt).decode()},i={self.iterations}"
            return self.server_first.encode(), None, None
        fields = dict(part.split("=", 1) for part in message.split(","))
        without_proof = message[:message.rindex(",p=")]
        password = self.users.get(self.user or "")
        if password is None:
            return b"", None, f"unknown user {self.user}"
        salted = hashlib.pbkdf2_hmac(self.hash().name, password.encode(), self.salt, self.iterations)  # type: ignore[operator]
        client_key = hmac.new(salted, b"Client Key", self.hash).digest()  # type: ignore[arg-type]
        stored_key = self.hash(client_key).digest()  # type: ignore[operator]
        auth_message = f"{self.first},{self.server_first},{without_proof}".encode()
        signature = hmac.new(stored_key, auth_message, self.hash).digest()  # type: ignore[arg-type]
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        if not hmac.compare_digest(proof, base64.b64decode(fields["p"])):
            return b"", None, "wrong password"
        server_key = hmac.new(salted, b"Server Key", self.hash).digest()  # type: ignore[arg-type]
        server_signature = hmac.new(server_key, auth_message, self.hash).digest()  # type: ignore[arg-type]
        return f"v={base64.b64encode(server_signature).decode()}".encode(), self.user, None


def _plain(data: bytes, users: dict[str, str]) -> tuple[bytes, str | None, str | None]:
    _, user, password = data.decode().split("\0")
    if users.get(user) != password:
        return b"", None, "wrong user name or password"
    return b"", user, None


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = struct.unpack(">i", await reader.readexactly(4))
    return await reader.readexactly(size)


async def _read_frame_with_size(reader: asyncio.StreamReader) -> bytes:
    frame = await _read_frame(reader)
    return struct.pack(">i", len(frame)) + frame


def _parse_request(frame: bytes) -> tuple[int, int, int, str, bytes]:
    api_key, version, correlation, id_length = struct.unpack_from(">hhih", frame)
    client_id = frame[10:10 + max(id_length, 0)].decode()
    return api_key, version, correlation, client_id, frame[10 + max(id_length, 0):]


def _respond(writer: asyncio.StreamWriter, correlation: int, body: bytes) -> None:
    payload = struct.pack(">i", correlation) + body
    writer.write(struct.pack(">i", len(payload)) + payload)


def _respond_authenticate(writer: asyncio.StreamWriter, correlation: int, version: int, error: str | None,
                          auth_bytes: bytes) -> None:
    code = SASL_AUTHENTICATION_FAILED if error else 0
    message = struct.pack(">h", -1) if error is None else struct.pack(">h", len(error)) + error.encode()
    body = struct.pack(">h", code) + message + struct.pack(">i", len(auth_bytes)) + auth_bytes
    if version >= 1:
        body += struct.pack(">q", 0)  # session_lifetime_ms: no re-authentication
    _respond(writer, correlation, body)
