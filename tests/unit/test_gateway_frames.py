"""The gateway's frames when the stream fails after the response started, and when it is quiet
(no broker: the subscription is replaced by a scripted one)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import httpx
import pytest

from treeflow.consumers import Cursor, TreeEvent, gateway as gateway_module
from treeflow.consumers.gateway import GatewayOptions, create_app
from treeflow.kafka import KafkaSettings
from treeflow.schemas import EventType
from tests.samples import context, event_of


class ScriptedSubscription:
    """Yields the scripted items; an exception is raised, a float is a pause."""

    script: list[Any] = []
    made: list[ScriptedSubscription] = []

    def __init__(self, root: str, **options: Any) -> None:
        self.root_workflow_exec_id = root
        self.options = options
        self.closed = False
        ScriptedSubscription.made.append(self)

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        self.closed = True

    def __aiter__(self) -> ScriptedSubscription:
        self._items = iter(self.script)
        return self

    async def __anext__(self) -> Any:
        for item in self._items:
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, float):
                await asyncio.sleep(item)
                continue
            return item
        raise StopAsyncIteration


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> type[ScriptedSubscription]:
    monkeypatch.setattr(gateway_module, "TreeSubscription", ScriptedSubscription)
    ScriptedSubscription.made = []
    return ScriptedSubscription


def app(keepalive: float = 15.0) -> Any:
    settings = KafkaSettings("127.0.0.1:1", topic_prefix="unit")
    return create_app(settings, options=GatewayOptions(keepalive=timedelta(seconds=keepalive), frames="treeflow"))


async def body(url: str, keepalive: float = 15.0, headers: dict[str, str] | None = None) -> str:
    transport = httpx.ASGITransport(app=app(keepalive))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        response = await client.get(url, headers=headers)
        assert response.status_code == 200
        return response.text


async def test_a_failure_after_the_response_started_is_an_error_frame(scripted: type[ScriptedSubscription]) -> None:
    event = TreeEvent.of(event_of(EventType.WORKFLOW_EXECUTION_STARTED, context("r", "r"), 1), Cursor(0, 4))
    scripted.script = [event, ConnectionError("the broker went away")]
    text = await body("/v1/workflows/events/stream?root_workflow_exec_id=r")
    frames = text.split("\n\n")
    assert frames[0].startswith("retry: 1000\nid: 4\nevent: WORKFLOW_EXECUTION_STARTED\ndata: {")
    assert frames[1] == 'event: error\ndata: {"error": "ConnectionError", "message": "the broker went away"}'
    assert frames[2:] == [""]
    assert scripted.made[0].closed


async def test_a_quiet_stream_sends_keep_alives_and_the_end_of_a_closed_tree(
        scripted: type[ScriptedSubscription]) -> None:
    scripted.script = [0.25]
    text = await body("/v1/workflows/executions/r/stream?until_closed=true&root_workflow_exec_id=r", keepalive=0.05,
                      headers={"Last-Event-ID": "12"})
    assert text.count(": keep-alive\n\n") >= 2
    assert text.endswith('event: end\ndata: {"reason": "tree closed"}\n\n')
    made = scripted.made[0]
    assert made.root_workflow_exec_id == "r"
    assert made.options["cursor"] == Cursor(0, 12) and made.options["until_closed"] is True
    assert made.options["event_filter"].workflow_exec_ids == {"r"}


async def test_a_port_in_use_is_a_listen_error_not_the_end_of_the_event_loop() -> None:
    import socket

    from treeflow.consumers.gateway import GatewayServer, ListenError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = GatewayServer(app(), port=taken.getsockname()[1])
        with pytest.raises(ListenError, match="cannot listen on 127.0.0.1"):
            await server.start()
