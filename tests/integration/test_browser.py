"""The web page in a real browser: Debian's headless Chromium driven by Playwright (never a
downloaded browser; tests/browser.py installs the chromium package when it can, else the test
skips saying why). It opens the page during a running tree and sees the child appear and
complete, reads a history, uses the list, and signals and terminates from the buttons.
Screenshots go to test-artifacts/."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from treeflow.consumers.gateway import GatewayServer, create_app
from treeflow.testing import Environment
from tests import control_workflows
from tests.browser import NoBrowser, chromium_path
from tests.integration import tree_app
from tests.polling import eventually

pytestmark = pytest.mark.integration

playwright_api = pytest.importorskip("playwright.async_api", reason="playwright is missing (the dev extra has it)")

ARTIFACTS = Path(__file__).parents[2] / "test-artifacts"
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def chromium() -> str:
    try:
        return chromium_path()
    except NoBrowser as error:
        pytest.skip(f"no Chromium for the browser test: {error}")


@pytest_asyncio.fixture(scope="module")
async def env(broker) -> AsyncIterator[Environment]:
    async with Environment(workflows=[*tree_app.WORKFLOWS, control_workflows.Waiter], activities=tree_app.ACTIVITIES,
                           bootstrap_servers=broker.bootstrap_servers, profile=broker.profile) as environment:
        yield environment


@pytest_asyncio.fixture(scope="module")
async def page_url(env: Environment) -> AsyncIterator[str]:
    server = GatewayServer(create_app(env.settings), port=0)  # the store: $TREEFLOW_VISIBILITY_URL (the env's)
    await server.start()
    yield server.url
    await server.stop()


@pytest_asyncio.fixture
async def page(chromium: str) -> AsyncIterator[object]:
    async with playwright_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, headless=True)
        try:
            context = await browser.new_context(viewport={"width": 1400, "height": 1000})
            tab = await context.new_page()
            tab.set_default_timeout(TIMEOUT_MS)
            errors: list[str] = []
            tab.on("pageerror", lambda error: errors.append(str(error)))
            yield tab
            assert errors == [], errors  # no JavaScript error on the page
        finally:
            await browser.close()


def node(tab: object, workflow: str, status: str | None = None) -> object:
    selector = f'#tree li[data-workflow="{workflow}"]'
    return tab.locator(selector + (f'[data-status="{status}"]' if status else ""))  # type: ignore[attr-defined]


async def test_the_page_shows_a_tree_live_its_history_and_the_list(env: Environment, page_url: str,
                                                                   page: object) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    root = f"web-{uuid.uuid4().hex[:6]}"
    tab = page
    # Open the tree before it exists: everything that follows arrives live.
    await tab.goto(f"{page_url}/#tree/{root}")  # type: ignore[attr-defined]
    await tab.locator("#tree-panel").wait_for()  # type: ignore[attr-defined]
    await env.client.start_workflow(tree_app.Root, tree_app.TreeInput(value="web", straggler_seconds=3.0),
                                    execution_id=root)

    # The abandoned child appears while it sleeps, then completes.
    await node(tab, "tree_straggler", "RUNNING").wait_for()  # type: ignore[attr-defined]
    await tab.screenshot(path=str(ARTIFACTS / "web-tree-running.png"))  # type: ignore[attr-defined]
    await node(tab, "tree_straggler", "COMPLETED").wait_for()  # type: ignore[attr-defined]
    for workflow in ("tree_root", "tree_child", "tree_grandchild"):
        await node(tab, workflow, "COMPLETED").wait_for()  # type: ignore[attr-defined]
    # Nested: the grandchild sits under the child, under the root.
    nested = tab.locator(  # type: ignore[attr-defined]
        f'#tree li[data-exec-id="{root}"] li[data-workflow="tree_child"] li[data-workflow="tree_grandchild"]')
    assert await nested.count() == 1

    # The straggler's history, with its payloads.
    await node(tab, "tree_straggler").locator(".node").first.click()  # type: ignore[attr-defined]
    history = tab.locator("#history tbody tr")  # type: ignore[attr-defined]
    await tab.locator('#history tr[data-event-type="WORKFLOW_EXECUTION_COMPLETED"]').wait_for()  # type: ignore
    types = await history.evaluate_all("rows => rows.map(r => r.dataset.eventType)")
    assert types[0] == "WORKFLOW_EXECUTION_STARTED" and "TIMER_FIRED" in types
    assert types[-1] == "WORKFLOW_EXECUTION_COMPLETED"
    started = await tab.locator('#history tr[data-event-type="WORKFLOW_EXECUTION_STARTED"] pre').inner_text()  # type: ignore
    assert '"straggler_seconds": 3' in started  # the input, decoded from input_json
    completed = await tab.locator('#history tr[data-event-type="WORKFLOW_EXECUTION_COMPLETED"] pre').inner_text()  # type: ignore
    assert '"result": "leaf:late-web"' in completed
    assert await tab.locator("#terminate-button").is_disabled()  # type: ignore[attr-defined]
    await tab.screenshot(path=str(ARTIFACTS / "web-tree.png"), full_page=True)  # type: ignore[attr-defined]

    # The list, filtered by the root, from the visibility store (refreshed every 2 s).
    await tab.fill("#filters input[name=root]", root)  # type: ignore[attr-defined]
    await tab.click("#filters button[type=submit]")  # type: ignore[attr-defined]
    rows = tab.locator("#executions tbody tr")  # type: ignore[attr-defined]
    await eventually(rows.count, lambda n: n == 4, timeout=30, interval=0.5)
    await tab.locator('#executions tbody tr [data-status="RUNNING"]').first.wait_for(state="detached")  # type: ignore
    assert "visibility lag:" in await tab.locator("#freshness").inner_text()  # type: ignore[attr-defined]


async def test_the_buttons_signal_and_terminate(env: Environment, page_url: str, page: object) -> None:
    tab = page
    waiter = f"web-wait-{uuid.uuid4().hex[:6]}"
    await env.client.start_workflow(control_workflows.Waiter, None, execution_id=waiter)
    await tab.goto(f"{page_url}/#tree/{waiter}")  # type: ignore[attr-defined]
    await node(tab, "waiter", "RUNNING").wait_for()  # type: ignore[attr-defined]
    await tab.fill("#signal-form input[name=name]", "go")  # type: ignore[attr-defined]
    await tab.click("#signal-button")  # type: ignore[attr-defined]
    await tab.locator('#history tr[data-event-type="WORKFLOW_EXECUTION_SIGNALED"]').wait_for()  # type: ignore
    await node(tab, "waiter", "COMPLETED").wait_for()  # type: ignore[attr-defined]
    assert "accepted" in await tab.locator("#action-result").inner_text()  # type: ignore[attr-defined]

    root = f"web-term-{uuid.uuid4().hex[:6]}"
    await env.client.start_workflow(tree_app.Root, tree_app.TreeInput(value="t", straggler_seconds=120.0),
                                    execution_id=root)
    await tab.goto(f"{page_url}/#tree/{root}")  # type: ignore[attr-defined]
    await node(tab, "tree_straggler", "RUNNING").locator(".node").first.click()  # type: ignore[attr-defined]
    await tab.fill("#close-form input[name=reason]", "stopped from the page")  # type: ignore[attr-defined]
    await tab.click("#terminate-button")  # type: ignore[attr-defined]
    await node(tab, "tree_straggler", "TERMINATED").wait_for()  # type: ignore[attr-defined]
    terminated = tab.locator('#history tr[data-event-type="WORKFLOW_EXECUTION_TERMINATED"] pre')  # type: ignore
    assert "stopped from the page" in await terminated.inner_text()
    await tab.screenshot(path=str(ARTIFACTS / "web-terminated.png"), full_page=True)  # type: ignore[attr-defined]
