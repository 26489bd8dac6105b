"""TLS (with a client certificate) and SASL (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512) on every connection.

The embedded broker sits behind `secure_front.SecureFront`, which terminates TLS and
checks SASL logins (Tansu 0.6.0 cannot do either itself; see that module). Each test
runs the real parts (processor with faust, worker, client, consumer library, admin)
through it and checks, by the client ids the front saw, that every kind of connection
was secured, and that nothing reached the broker unauthenticated.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from treeflow.consumers import ServiceOptions, TreeEvent, subscribe, subscribe_tree
from treeflow.definitions import collect
from treeflow.kafka import TANSU, AuthenticationError, BrokerUnreachableError, EmbeddedBroker, KafkaSettings, ensure_topics
from treeflow.kafka.embedded import answers_api_versions, broker_binary, free_port
from treeflow.kafka.settings import BOOTSTRAP_ENV
from treeflow.testing import Environment
from treeflow.worker.worker import Worker
from tests.integration import tree_app
from tests.integration.secure_front import SecureFront

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(bool(os.environ.get(BOOTSTRAP_ENV)),
                       reason="needs an embedded broker of its own behind the TLS/SASL front"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates"),
]

KEY_PASSWORD = "key-pass"
USERS = {"alice": "s3cret-alice", "bob": "s3cret-bob"}
#: The roles every part connects under (treeflow-<role>-<host>-<pid>).
ALL_ROLES = {"admin", "client", "processor", "reader", "offsets", "worker", "service"}


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path  # encrypted with KEY_PASSWORD
    other_ca: Path

    def server_context(self, require_client_cert: bool) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca))
        context.load_cert_chain(str(self.server_cert), str(self.server_key))
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
        return context


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _signed(directory: Path, name: str, subject: str, ca: str, extensions: str, key_args: list[str]) -> None:
    _openssl("req", "-newkey", "rsa:2048", *key_args, "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", subject, cwd=directory)
    (directory / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=directory)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA, a server certificate for 127.0.0.1, a client certificate with a
    password-protected key, and an unrelated CA."""
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
                 "-days", "2", "-subj", f"/CN=treeflow test {ca}", cwd=d)
    _signed(d, "server", "/CN=localhost", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\n", ["-nodes"])
    _signed(d, "client", "/CN=treeflow-test-client", "ca", "extendedKeyUsage=clientAuth\n",
            ["-passout", f"pass:{KEY_PASSWORD}"])
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key",
               d / "other-ca.pem")


@contextlib.asynccontextmanager
async def secured_broker(tls: ssl.SSLContext | None, users: dict[str, str] | None
                         ) -> AsyncIterator[tuple[SecureFront, str]]:
    front_port = free_port()
    with EmbeddedBroker(advertised_port=front_port) as broker:
        front = await SecureFront(broker.port, front_port, tls, users).start()
        try:
            yield front, f"127.0.0.1:{front_port}"
        finally:
            await front.stop()


def roles(front: SecureFront) -> set[str]:
    return {client_id.split("-")[1] for client_id, _ in front.authenticated if client_id.startswith("treeflow-")}


async def run_every_part(bootstrap: str) -> None:
    """A tree of workflows through a processor (faust), a separate worker, a client, a tree
    subscription and a service subscription, with the security settings in the environment."""
    prefix = f"sec-{uuid.uuid4().hex[:8]}"
    await ensure_topics(KafkaSettings.resolve(bootstrap, topic_prefix=prefix, partitions=2, profile=TANSU),
                        ["default"])
    # The environment hosts no queue of the tree's: every task goes through Kafka to the worker.
    async with Environment(workflows=tree_app.WORKFLOWS, activities=tree_app.ACTIVITIES, bootstrap_servers=bootstrap,
                           topic_prefix=prefix, partitions=2, profile=TANSU, task_queues=["unhosted"]) as env:
        workflows, activities = collect([tree_app])
        worker = Worker(env.settings, workflows, activities, ["default"])
        await worker.start()
        try:
            root = f"sec-{uuid.uuid4().hex[:6]}"
            handled: list[str] = []

            async def handler(event: TreeEvent[Any]) -> None:
                handled.append(event.event_id)

            service = subscribe(handler, group_id=f"{prefix}-svc", settings=env.settings,
                                options=ServiceOptions(commit_interval=timedelta(milliseconds=50)))
            async with service:
                await service.wait_assigned()
                async with asyncio.timeout(60):
                    result = await env.client.execute_workflow(
                        tree_app.Root, tree_app.TreeInput(value="x", straggler_seconds=0.1), execution_id=root)
                    assert result == "root(child(leaf:x))"
                    events = [e async for e in subscribe_tree(root, until_closed=True, settings=env.settings)]
                    assert events[-1].root_workflow_exec_id == root
                    while len(handled) < len(events):
                        await asyncio.sleep(0.05)
        finally:
            await worker.stop(grace=1)


def secure_env(monkeypatch: pytest.MonkeyPatch, **variables: str) -> None:
    for name in ("SECURITY_PROTOCOL", "SSL_CAFILE", "SSL_CERTFILE", "SSL_KEYFILE", "SSL_PASSWORD",
                 "SASL_MECHANISM", "SASL_USERNAME", "SASL_PASSWORD", "KAFKA_OPTIONS"):
        monkeypatch.delenv(f"TREEFLOW_{name}", raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(f"TREEFLOW_{name.upper()}", value)


async def test_mutual_tls_secures_every_connection(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    secure_env(monkeypatch, ssl_cafile=str(pki.ca), ssl_certfile=str(pki.client_cert),
               ssl_keyfile=str(pki.client_key), ssl_password=KEY_PASSWORD)
    async with secured_broker(pki.server_context(require_client_cert=True), None) as (front, bootstrap):
        await run_every_part(bootstrap)
        assert roles(front) >= ALL_ROLES, roles(front)
        assert all(client_id.startswith("treeflow-") for client_id, _ in front.authenticated), front.authenticated


async def test_tls_refuses_a_broker_signed_by_another_ca(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    secure_env(monkeypatch)
    async with secured_broker(pki.server_context(require_client_cert=False), None) as (front, bootstrap):
        wrong = KafkaSettings.resolve(bootstrap, profile=TANSU, ssl_cafile=str(pki.other_ca), connect_timeout=5)
        with pytest.raises(AuthenticationError, match=r"SSL handshake failed.*TREEFLOW_SSL_"):
            await ensure_topics(wrong)
        plaintext = KafkaSettings.resolve(bootstrap, profile=TANSU, connect_timeout=3)
        with pytest.raises(BrokerUnreachableError, match=bootstrap):
            await ensure_topics(plaintext)
        assert front.authenticated == []


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"])
async def test_sasl_over_tls_secures_every_connection(pki: Pki, monkeypatch: pytest.MonkeyPatch,
                                                       mechanism: str) -> None:
    secure_env(monkeypatch, security_protocol="SASL_SSL", ssl_cafile=str(pki.ca), sasl_mechanism=mechanism,
               sasl_username="alice", sasl_password=USERS["alice"])
    async with secured_broker(pki.server_context(require_client_cert=False), USERS) as (front, bootstrap):
        await run_every_part(bootstrap)
        assert roles(front) >= ALL_ROLES, roles(front)
        assert {user for _, user in front.authenticated} == {"alice"}
        assert (front.refused, front.failed_logins) == (0, 0)


async def test_sasl_refuses_a_wrong_password_with_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    secure_env(monkeypatch)
    async with secured_broker(None, USERS) as (front, bootstrap):
        for mechanism in ("SCRAM-SHA-256", "PLAIN"):
            wrong = KafkaSettings.resolve(bootstrap, profile=TANSU, security_protocol="SASL_PLAINTEXT",
                                          sasl_mechanism=mechanism, sasl_username="alice", sasl_password="nope",
                                          connect_timeout=5)
            with pytest.raises(AuthenticationError, match=rf"SASL_PLAINTEXT handshake failed \(SASL {mechanism}\)"):
                await ensure_topics(wrong)
        assert front.failed_logins >= 2 and front.authenticated == []
        right = KafkaSettings.resolve(bootstrap, profile=TANSU, security_protocol="SASL_PLAINTEXT",
                                      sasl_mechanism="SCRAM-SHA-256", sasl_username="bob", sasl_password=USERS["bob"])
        assert (await ensure_topics(right)).created


async def test_tansu_refuses_sasl_it_cannot_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Tansu 0.6.0 itself does with `--authentication`: PLAIN is not offered, and a SCRAM
    login of a user it does not know fails; both are `AuthenticationError`."""
    secure_env(monkeypatch)
    port = free_port()  # EmbeddedBroker runs Tansu without --authentication: start one by hand
    process = subprocess.Popen([broker_binary(), "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
                                "--advertised-listener-url", f"tcp://127.0.0.1:{port}",
                                "--storage-engine", "memory://tansu/", "--authentication"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if answers_api_versions("127.0.0.1", port):
                break
            await asyncio.sleep(0.05)
        for mechanism in ("PLAIN", "SCRAM-SHA-256"):
            settings = KafkaSettings.resolve(f"127.0.0.1:{port}", profile=TANSU, security_protocol="SASL_PLAINTEXT",
                                             sasl_mechanism=mechanism, sasl_username="alice", sasl_password="x",
                                             connect_timeout=5)
            with pytest.raises(AuthenticationError):
                await ensure_topics(settings)
    finally:
        process.kill()
        process.wait(5)
