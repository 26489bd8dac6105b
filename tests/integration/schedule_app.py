"""The workflow the schedule tests start (hosted by a `treeflow processor --module` subprocess)."""

from __future__ import annotations

import treeflow as workflows


@workflows.workflow.define(name="scheduled_echo")
class ScheduledEcho:
    @workflows.workflow.entrypoint
    async def run(self, params: dict) -> dict:
        return {"echo": params, "run": workflows.get_execution_id()}
