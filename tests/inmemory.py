"""A broker-free driver of the processor's partition engine and a task runner, for tests of
workflow semantics: commands go through `PartitionEngine.handle`, dispatched tasks through
`TaskRunner`, and time is virtual (`advance`)."""

from __future__ import annotations

import uuid
from collections import deque
from datetime import datetime, timedelta, timezone
from typing import Any

from treeflow.definitions import workflow_definition
from treeflow.payloads import to_json
from treeflow.processor.engine import PartitionEngine
from treeflow.schemas import Command, Event
from treeflow.schemas import models as m
from treeflow.worker.runner import TaskRunner

EPOCH = datetime(2026, 1, 1, tzinfo=timezone.utc)


class InMemory:
    def __init__(self, workflows: list[type], activities: list[Any]) -> None:
        definitions = [workflow_definition(w) for w in workflows]
        self.engine = PartitionEngine(0)
        self.runner = TaskRunner({d.name: d for d in definitions}, {a.name: a for a in activities},
                                 clock=lambda: self.now)
        self.now = EPOCH
        self.queue: deque[Command] = deque()
        self.events: list[Event] = []
        self.replies: list[Any] = []
        self.hold_activities = False
        self.held: list[Any] = []

    def command(self, exec_id: str, payload: Any, root: str | None = None) -> Command:
        return Command(command_id=str(uuid.uuid4()), timestamp=self.now, root_workflow_exec_id=root or exec_id,
                       workflow_exec_id=exec_id, payload=payload)

    async def start(self, workflow: type, params: Any = None, exec_id: str = "root") -> None:
        name = workflow_definition(workflow).name
        self.queue.append(self.command(exec_id, m.StartWorkflowExecution(
            workflow_name=name, task_queue="default", input_json=None if params is None else to_json(params))))
        await self.drain()

    async def send(self, cmd: Command) -> None:
        self.queue.append(cmd)

    async def drain(self) -> None:
        while self.queue:
            cmd = self.queue.popleft()
            effects = self.engine.handle(cmd, self.now)
            self._record(effects)
            await self._run(effects.dispatches)

    async def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        effects = self.engine.tick(self.now, str(uuid.uuid4()))
        self._record(effects)
        await self._run(effects.dispatches)
        await self.drain()

    def _record(self, effects: Any) -> None:
        self.events.extend(effects.events)
        self.replies.extend(effects.replies)

    async def _run(self, dispatches: list[Any]) -> None:
        for dispatch in dispatches:
            if dispatch.history is not None:
                self.queue.append(self.runner.run_workflow_task(dispatch.context, dispatch.task.task_id,
                                                                dispatch.history))
            elif dispatch.item.kind == "query":
                self.queue.append(self.runner.run_query_task(dispatch.context, dispatch.task.payload))
            elif self.hold_activities:
                self.held.append(dispatch)
            else:
                self.queue.append(await self.runner.run_activity_task(dispatch.context, dispatch.task.payload,
                                                                      self.send))

    async def release(self) -> None:
        held, self.held = self.held, []
        for dispatch in held:
            self.queue.append(await self.runner.run_activity_task(dispatch.context, dispatch.task.payload, self.send))
        await self.drain()

    def history(self, exec_id: str) -> list[Event]:
        return [e for e in self.events if e.workflow_context.workflow_exec_id == exec_id]

    def types(self, exec_id: str) -> list[str]:
        return [e.event_type.value for e in self.history(exec_id)]

    def state(self, exec_id: str) -> Any:
        return self.engine.states[exec_id]
