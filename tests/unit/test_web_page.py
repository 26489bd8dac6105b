"""The web page's static files: served by the gateway app, and in step with the event contract."""

from __future__ import annotations

import re

import httpx

from treeflow.consumers.api import WEB
from treeflow.consumers.gateway import create_app
from treeflow.kafka import KafkaSettings
from treeflow.schemas import EventType


def test_the_page_listens_to_every_event_type() -> None:
    script = (WEB / "app.js").read_text()
    listed = re.search(r"const EVENT_TYPES = \[(.*?)\];", script, re.S)
    assert listed is not None
    assert re.findall(r'"([A-Z_]+)"', listed.group(1)) == [t.value for t in EventType]


async def test_the_gateway_serves_the_page_and_its_files() -> None:
    app = create_app(KafkaSettings(bootstrap_servers="127.0.0.1:1"), visibility_url="mysql://not-a-store")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://page") as http:
        page = await http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<script src="/web/app.js">' in page.text
        for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
            served = await http.get(f"/web/{name}")
            assert served.status_code == 200 and kind in served.headers["content-type"]
        # No usable store: a JSON error that says so, not a crash.
        answer = await http.get("/api/executions")
        assert answer.status_code == 503 and "sqlite:// or postgresql://" in answer.json()["detail"]
