"""Find the root of an execution: which tree, and so which partition, holds it.

The events of an execution are keyed by its tree's root id, which the execution
id alone does not say. Candidates come from the id: the id itself (a top-level
execution is its own root) and each prefix before a ``.`` — a child's default id
is ``<parent id>.<suffix>``, so a grandchild ``r.a1.b2`` has candidates ``r``,
``r.a1`` and ``r.a1.b2``. Their partitions are read first; with `scan=True`, the
other partitions after them. Only the execution's own records are decoded (the
processor's ``tf.exec`` header names a record's execution), and the search stops
at its first event. Cost: the records before that event in its partition; for an
id that names none of its ancestors, up to one read of the whole events topic.

A caller that knows the root should pass it instead (the gateway's
``root_workflow_exec_id`` parameter).

Which tree an id names (README "Execution ids"): its *home* tree, whose root is the
id itself or one of its dot-prefixes, when that tree holds it; otherwise the one other
tree that holds it. An id held by several trees outside its home is ambiguous: with
`scan=True` every partition is read to make sure, and `AmbiguousExecutionError` names
the roots. A lookup never answers with another tree's execution silently.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import aclosing

from aiokafka import ConsumerRecord

from treeflow.kafka import KafkaSettings, partition_for

from .reader import EventReader, partition_count

#: The header the processor puts on each event: the execution it belongs to.
EXEC_HEADER = "tf.exec"


class AmbiguousExecutionError(LookupError):
    """Several trees hold executions of this id and none is its home tree: pass the root."""

    def __init__(self, execution_id: str, roots: list[str]) -> None:
        self.execution_id = execution_id
        self.roots = roots
        super().__init__(f"execution id {execution_id} is used in {len(roots)} trees (roots {', '.join(roots)}): "
                         "pass the root execution id")


def root_candidates(execution_id: str) -> list[str]:
    """The ids that may be the root of `execution_id`, shortest (most likely) first."""
    prefixes = [execution_id[:index] for index, char in enumerate(execution_id) if char == "." and index > 0]
    return list(dict.fromkeys([*prefixes, execution_id]))


async def find_root(settings: KafkaSettings, execution_id: str, *, scan: bool = False) -> str | None:
    """The root id of the tree that holds `execution_id` (its home tree first, see the
    module docstring), or None when no event of it was found. Raises
    `AmbiguousExecutionError` when several other trees hold it."""
    count = await partition_count(settings)
    candidates = set(root_candidates(execution_id))
    first = list(dict.fromkeys(partition_for(candidate, count) for candidate in root_candidates(execution_id)))
    groups = [first, [p for p in range(count) if p not in first] if scan else []]
    wanted = execution_id.encode()

    def maybe_of_execution(record: ConsumerRecord[bytes, bytes]) -> bool:
        named = dict(record.headers or ()).get(EXEC_HEADER)
        return named is None or named == wanted

    others: list[str] = []  # roots of other trees holding the id, in the order found
    for partitions in groups:
        if not partitions:
            continue
        reader = EventReader(settings, partitions, accept=maybe_of_execution)
        async with aclosing(reader.__aiter__()) as items:
            async for item in items:
                context = item.event.workflow_context
                if context.workflow_exec_id != execution_id:
                    continue
                if context.root_workflow_exec_id in candidates:
                    return context.root_workflow_exec_id
                if context.root_workflow_exec_id not in others:
                    others.append(context.root_workflow_exec_id)
    if len(others) > 1:
        raise AmbiguousExecutionError(execution_id, others)
    return others[0] if others else None


class RootCache:
    """`find_root` with the answers remembered (a root never changes), least recently used out first."""

    def __init__(self, settings: KafkaSettings, *, scan: bool = False, size: int = 10_000) -> None:
        self.settings = settings
        self.scan = scan
        self.size = size
        self._roots: OrderedDict[str, str] = OrderedDict()

    def remember(self, execution_id: str, root: str) -> None:
        """Record a root known otherwise (an execution started here is its own root)."""
        self._roots[execution_id] = root
        self._roots.move_to_end(execution_id)
        while len(self._roots) > self.size:
            self._roots.popitem(last=False)

    async def find(self, execution_id: str) -> str | None:
        root = self._roots.get(execution_id)
        if root is None:
            root = await find_root(self.settings, execution_id, scan=self.scan)
            if root is not None:
                self.remember(execution_id, root)
        else:
            self._roots.move_to_end(execution_id)
        return root
