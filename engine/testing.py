"""A complete treeflow in one process, for users' tests and for `treeflow dev`.

    async with Environment(workflows=[ParentWorkflow, ChildWorkflow], activities=[process_item]) as env:
        result = await env.client.execute_workflow(ParentWorkflow, ParentInput(data="hello"))

It uses the Kafka named by `bootstrap_servers` or `TREEFLOW_BOOTSTRAP_SERVERS`, or
the embedded broker: one per process (`shared_broker()`), started by the first
environment and reused by the next ones (`own_broker=True` starts one of its own); creates
the topics under its own prefix; and runs the processor with the given workflows and
activities hosted in-process, and the visibility service on a SQLite file of its own
(``visibility=False`` leaves it out). While it runs, `TREEFLOW_*` variables point at it
(`TREEFLOW_VISIBILITY_URL` too), so `treeflow.execute_workflow`, `treeflow.connect()` and
`client.list_executions()` need no arguments.

`Replayer` (from `treeflow.replay`) checks changed workflow code against recorded
histories.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from types import ModuleType, TracebackType
from typing import Any

from treeflow.consumers.visibility import VISIBILITY_URL_ENV, VisibilityService
from treeflow.kafka import TANSU, BrokerProfile, EmbeddedBroker, KafkaSettings, ensure_topics
from treeflow.kafka.profile import PROFILE_ENV
from treeflow.kafka.settings import BOOTSTRAP_ENV, PARTITIONS_ENV, PREFIX_ENV

from .client import Client, close_default_clients
from .definitions import DEFAULT_TASK_QUEUE, ActivityDefinition, collect, workflow_definition
from .processor.app import Processor
from .replay import Replayer, ReplayResult
from .worker.runner import TaskRunner

__all__ = ["Environment", "ReplayResult", "Replayer", "shared_broker"]

_shared: EmbeddedBroker | None = None


def shared_broker() -> EmbeddedBroker:
    """The embedded broker that every `Environment` of this process shares: started on
    first use, stopped when the process exits. Each environment has topics of its own
    (a fresh prefix), so they never see each other's data."""
    global _shared
    if _shared is None or not _shared.running:
        _shared = EmbeddedBroker().start()
        atexit.register(_shared.stop)
    return _shared


class Environment:
    def __init__(self, *, workflows: Iterable[type] = (), activities: Iterable[ActivityDefinition] = (),
                 modules: Iterable[ModuleType] = (), bootstrap_servers: str | None = None,
                 topic_prefix: str | None = None, partitions: int | None = None,
                 task_queues: Iterable[str] | None = None, profile: BrokerProfile | None = None,
                 own_broker: bool = False, visibility: bool = True) -> None:
        found_workflows, found_activities = collect(modules)
        self.workflows = {**found_workflows, **{d.name: d for d in map(workflow_definition, workflows)}}
        self.activities = {**found_activities, **{a.name: a for a in activities}}
        queues = {DEFAULT_TASK_QUEUE}
        queues |= {d.task_queue for d in self.workflows.values() if d.task_queue}
        queues |= {a.options.task_queue for a in self.activities.values() if a.options.task_queue}
        self.task_queues = sorted(task_queues) if task_queues is not None else sorted(queues)
        self._bootstrap = bootstrap_servers
        self._prefix = topic_prefix
        self._partitions = partitions
        self._profile = profile
        self._own_broker = own_broker
        self._broker: EmbeddedBroker | None = None
        self._saved_env: dict[str, str | None] = {}
        self.settings: KafkaSettings | None = None
        self.processor: Processor | None = None
        self.client: Client = None  # type: ignore[assignment]
        self._visibility = visibility
        self._visibility_dir: str | None = None
        #: The visibility service keeping `visibility_url` (None with ``visibility=False``).
        self.visibility: VisibilityService | None = None
        self.visibility_url: str | None = None

    async def __aenter__(self) -> Environment:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        bootstrap = self._bootstrap or os.environ.get(BOOTSTRAP_ENV)
        profile = self._profile
        if not bootstrap:
            if self._own_broker:
                self._broker = EmbeddedBroker().start()
                bootstrap = self._broker.bootstrap_servers
            else:
                bootstrap = shared_broker().bootstrap_servers
            profile = TANSU
        self.settings = KafkaSettings.resolve(
            bootstrap, topic_prefix=self._prefix or f"test-{uuid.uuid4().hex[:8]}",
            partitions=self._partitions or 4, profile=profile)
        self._export({BOOTSTRAP_ENV: bootstrap, PREFIX_ENV: self.settings.topic_prefix,
                      PARTITIONS_ENV: str(self.settings.partitions), PROFILE_ENV: self.settings.profile.name})
        await ensure_topics(self.settings, self.task_queues)
        runner = TaskRunner(self.workflows, self.activities)
        self.processor = Processor(self.settings, runner=runner, local_queues=self.task_queues)
        await self.processor.start()
        await self.processor.wait_assigned()
        if self._visibility:
            self._visibility_dir = tempfile.mkdtemp(prefix="treeflow-visibility-")
            self.visibility_url = f"sqlite:///{self._visibility_dir}/visibility.db"
            self._export({VISIBILITY_URL_ENV: self.visibility_url})
            self.visibility = VisibilityService(self.visibility_url, settings=self.settings)
            await self.visibility.start()  # it joins its group in the background
        self.client = Client(self.settings)
        await self.client.start()

    async def stop(self) -> None:
        await close_default_clients()
        if self.client is not None:
            await self.client.close()
        if self.visibility is not None:
            await self.visibility.stop()
        if self._visibility_dir is not None:
            shutil.rmtree(self._visibility_dir, ignore_errors=True)
        if self.processor is not None:
            await self.processor.stop()
        if self._broker is not None:
            self._broker.stop()
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    def _export(self, variables: dict[str, str]) -> None:
        for name, value in variables.items():
            self._saved_env.setdefault(name, os.environ.get(name))
            os.environ[name] = value

    async def execute_workflow(self, workflow: type | str, params: Any = None, **options: Any) -> Any:
        return await self.client.execute_workflow(workflow, params, **options)
