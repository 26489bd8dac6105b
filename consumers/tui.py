"""`treeflow tail`'s picture of a tree: its executions as an indented tree, and the latest events.

Drawn with Rich; pure functions of a `TreeTracker` and the recent events, so they
can be rendered anywhere (a terminal, a test's recording console).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from treeflow.schemas import CLOSING_STATUS, EventType

from .events import TreeEvent
from .tree import RUNNING, ExecutionNode, TreeTracker

STATUS_STYLES = {
    RUNNING: "bold cyan", "PENDING": "yellow", "COMPLETED": "green", "FAILED": "bold red", "CANCELED": "magenta",
    "TERMINATED": "red", "TIMED_OUT": "red", "CONTINUED_AS_NEW": "blue", "START_FAILED": "red", "UNKNOWN": "dim",
}


def execution_label(node: ExecutionNode) -> Text:
    label = Text()
    label.append(node.workflow_name or "?", style="bold")
    label.append(f"  {node.workflow_exec_id}  ", style="dim")
    label.append(node.status, style=STATUS_STYLES.get(node.status, ""))
    if node.runs > 1:
        label.append(f"  run {node.runs}", style="blue")
    if node.last_event_type is not None:
        label.append(f"  {node.last_event_type.value}", style="dim")
    return label


def tree_view(tracker: TreeTracker) -> RenderableType:
    """The executions, each under its parent, with status and latest event."""
    root = tracker.root
    if root is None:
        return Text(f"waiting for {tracker.root_workflow_exec_id} to start…", style="yellow")
    view = Tree(execution_label(root))

    def grow(branch: Tree, node: ExecutionNode) -> None:
        for child_id in node.children:
            child = tracker.executions[child_id]
            grow(branch.add(execution_label(child)), child)

    grow(view, root)
    return view


def events_table(events: Iterable[TreeEvent[Any]]) -> Table:
    """The latest events, oldest first (their cursors are in `treeflow tail --json`)."""
    table = Table(box=None, pad_edge=False, show_header=True, header_style="dim")
    table.add_column("time", no_wrap=True)
    table.add_column("#", justify="right")
    table.add_column("event", no_wrap=True)
    table.add_column("execution", overflow="fold")
    for event in events:
        table.add_row(event.timestamp.strftime("%H:%M:%S.%f")[:-3], str(event.sequence),
                      Text(event.event_type.value, style=STATUS_STYLES.get(_status_of(event), "")),
                      f"{event.workflow_context.workflow_name} {event.workflow_exec_id}")
    return table


def screen(tracker: TreeTracker, recent: Iterable[TreeEvent[Any]], *, closed: bool = False) -> RenderableType:
    footer = Text("tree closed", style="green") if closed else Text("following… (Ctrl-C to stop)", style="dim")
    return Group(tree_view(tracker), Text(), events_table(recent), footer)


def _status_of(event: TreeEvent[Any]) -> str:
    if event.event_type is EventType.WORKFLOW_EXECUTION_STARTED:
        return RUNNING
    return CLOSING_STATUS.get(event.event_type, "")
