"""Conformance with the seed's "Child workflows" page (issue 4 §3): its three code blocks
(tests/seed_examples.py, verbatim but for the import lines) run on the real broker and do
what the page promises.

- Basic usage: the parent returns "Parent got: processed:hello"; every event carries its
  parent and root ids (null parent and own id as root for the top-level execution).
- Fire and forget: the parent returns before the child ends (wait=False: ABANDON by
  default), and the child still runs to completion.
- Parent close policy: with TERMINATE, the child is terminated when the parent closes first.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest
import pytest_asyncio

import treeflow as workflows
from treeflow import ParentClosePolicy
from treeflow.kafka import partition_for
from treeflow.schemas import Event, EventType
from treeflow.testing import Environment
from tests import seed_examples
from tests.seed_examples import ChildWorkflow, FireAndForgetParent, ParentInput, ParentWorkflow, TerminatePolicyParent

from .test_durability import check_log, read_events

pytestmark = pytest.mark.integration
T = EventType
#: The page, as the product must honour it (a copy of shared/seeds/child-workflows.txt).
PAGE = Path(__file__).resolve().parents[1] / "fixtures" / "seed-child-workflows.txt"
SHARED_PAGE = Path(__file__).resolve().parents[3] / "shared" / "seeds" / "child-workflows.txt"
IMPORTS = {"import mistralai.workflows as workflows": "import treeflow as workflows",
           "from mistralai.workflows import ParentClosePolicy": "from treeflow import ParentClosePolicy"}


@pytest_asyncio.fixture(scope="module")
async def env(broker):
    async with Environment(modules=[seed_examples], bootstrap_servers=broker.bootstrap_servers,
                           profile=broker.profile) as environment:
        yield environment


async def tree(env: Environment, root: str, closed: bool = True) -> list[Event]:
    partition = partition_for(root, env.settings.partitions)  # type: ignore[union-attr]
    found = [item for item in await read_events(env.settings, [partition])  # type: ignore[arg-type]
             if item[2].workflow_context.root_workflow_exec_id == root]
    check_log(found, env.settings, closed=closed)  # type: ignore[arg-type]
    return [event for _, _, event in found]


def of(events: list[Event], exec_id: str) -> list[Event]:
    return [e for e in events if e.workflow_context.workflow_exec_id == exec_id]


def index(events: list[Event], exec_id: str, event_type: EventType) -> int:
    return next(i for i, e in enumerate(events)
                if e.workflow_context.workflow_exec_id == exec_id and e.event_type is event_type)


def page_blocks(text: str) -> list[str]:
    """The page's three code blocks: from their first line to their last."""
    lines = text.splitlines()

    def block(first: str, last: str) -> str:
        start = lines.index(first)
        end = next(i for i in range(start, len(lines)) if lines[i] == last)
        return "\n".join(lines[start:end + 1])

    return [block("import asyncio", "    print(result)"),
            block("handle = await workflow.execute_workflow(", "# Optionally await later: result = await handle"),
            block("from mistralai.workflows import ParentClosePolicy", ")")]


def test_the_examples_are_the_pages_code_blocks_with_only_the_imports_changed() -> None:
    page = PAGE.read_text()
    if SHARED_PAGE.exists():
        assert SHARED_PAGE.read_text() == page, f"{PAGE} is no longer a copy of {SHARED_PAGE}"
    source = Path(seed_examples.__file__).read_text()
    basic, fire_and_forget, close_policy = page_blocks(page)
    for old, new in IMPORTS.items():
        basic, close_policy = basic.replace(old, new), close_policy.replace(old, new)
    assert basic in source  # the whole program, at the top level
    assert textwrap.indent(fire_and_forget, " " * 8) in source  # inside a parent's entrypoint
    import_line, rest = close_policy.split("\n\n", 1)
    assert f"\n{import_line}  " in source or f"\n{import_line}\n" in source
    assert textwrap.indent(rest, " " * 8) in source
    imported = {alias.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import)
                for alias in node.names} | {node.module for node in ast.walk(ast.parse(source))
                                            if isinstance(node, ast.ImportFrom)}
    assert not any(name and name.startswith("mistralai") for name in imported), imported


async def test_basic_usage_returns_the_parents_result(env: Environment, capsys: pytest.CaptureFixture[str]) -> None:
    await seed_examples.main()  # the page's main(), through the top-level execute_workflow
    assert capsys.readouterr().out == "Parent got: processed:hello\n"

    result = await workflows.execute_workflow(ParentWorkflow, params=ParentInput(data="hello"),
                                              execution_id="seed-basic")
    assert result == "Parent got: processed:hello"
    events = await tree(env, "seed-basic")
    [child] = {e.workflow_context.workflow_exec_id for e in events} - {"seed-basic"}
    assert {(e.workflow_context.parent_workflow_exec_id, e.workflow_context.root_workflow_exec_id)
            for e in of(events, "seed-basic")} == {(None, "seed-basic")}
    assert {(e.workflow_context.parent_workflow_exec_id, e.workflow_context.root_workflow_exec_id,
             e.workflow_context.workflow_name) for e in of(events, child)} == {("seed-basic", "seed-basic",
                                                                                "child_workflow")}
    assert of(events, child)[-1].payload.result_json == '"processed:hello"'
    [initiated] = [e.payload for e in events if e.event_type is T.START_CHILD_WORKFLOW_EXECUTION_INITIATED]
    assert initiated.parent_close_policy is ParentClosePolicy.TERMINATE  # wait=True's default
    assert index(events, child, T.WORKFLOW_EXECUTION_COMPLETED) < index(
        events, "seed-basic", T.CHILD_WORKFLOW_EXECUTION_COMPLETED)


async def test_fire_and_forget_the_parent_returns_first_and_the_child_still_completes(env: Environment) -> None:
    child_id = await workflows.execute_workflow(FireAndForgetParent, params=ParentInput(data="later"),
                                                execution_id="seed-ff")
    child = env.client.get_handle(child_id, root_execution_id="seed-ff", workflow=ChildWorkflow)
    assert await child.result(timeout=20) == "processed:later"
    events = await tree(env, "seed-ff")
    assert index(events, "seed-ff", T.WORKFLOW_EXECUTION_COMPLETED) < index(events, child_id,
                                                                            T.WORKFLOW_EXECUTION_COMPLETED)
    [initiated] = [e.payload for e in events if e.event_type is T.START_CHILD_WORKFLOW_EXECUTION_INITIATED]
    assert (initiated.parent_close_policy, initiated.execution_timeout_ms) == (ParentClosePolicy.ABANDON, 3_600_000)
    [applied] = [e.payload for e in events if e.event_type is T.PARENT_CLOSE_POLICY_APPLIED]
    assert (applied.child_workflow_exec_id, applied.policy, applied.parent_close_status) == (
        child_id, ParentClosePolicy.ABANDON, "COMPLETED")
    assert {e.workflow_context.root_workflow_exec_id for e in of(events, child_id)} == {"seed-ff"}


async def test_parent_close_policy_terminate_ends_the_child_when_the_parent_closes_first(env: Environment) -> None:
    child_id = await workflows.execute_workflow(TerminatePolicyParent, params=ParentInput(data="cut"),
                                                execution_id="seed-term")
    child = env.client.get_handle(child_id, root_execution_id="seed-term")
    with pytest.raises(workflows.WorkflowFailureError) as caught:
        await child.result(timeout=20)
    assert caught.value.status == "TERMINATED"
    assert caught.value.cause.message == "parent seed-term closed (COMPLETED)"
    events = await tree(env, "seed-term")
    [applied] = [e.payload for e in events if e.event_type is T.PARENT_CLOSE_POLICY_APPLIED]
    assert (applied.child_workflow_exec_id, applied.policy) == (child_id, ParentClosePolicy.TERMINATE)
    assert index(events, "seed-term", T.PARENT_CLOSE_POLICY_APPLIED) < index(
        events, "seed-term", T.WORKFLOW_EXECUTION_COMPLETED) < index(events, child_id, T.WORKFLOW_EXECUTION_TERMINATED)
    assert T.WORKFLOW_EXECUTION_COMPLETED not in {e.event_type for e in of(events, child_id)}
