"""The three code blocks of the seed's "Child workflows" page (shared/seeds/child-workflows.txt),
as the page has them but for the import lines: `mistralai.workflows` is `treeflow` here.

Block 1 ("Basic usage") is a whole program and comes first, unchanged below its import.
Blocks 2 ("Fire and forget") and 3 ("Parent close policy") are fragments of a parent
workflow's code; each sits unchanged in the entrypoint of a parent workflow defined here,
which builds the `child_params` the fragment uses from its input and returns the handle's
execution id (so a test can follow the child). The page shows `timedelta` and `workflow`
without their imports: `from datetime import timedelta`, and `workflow` is the SDK's
workflow module (`treeflow.workflow`, whose `execute_workflow` is the one inside workflows).
tests/integration/test_seed_conformance.py checks that the blocks are here verbatim.
"""

# ---------------------------------------------------------------- block 1: Basic usage
# (the page's second line: import mistralai.workflows as workflows)
import asyncio
import treeflow as workflows
from pydantic import BaseModel


@workflows.activity()
async def process_item(value: str) -> str:
    return f"processed:{value}"


class ChildInput(BaseModel):
    value: str


@workflows.workflow.define(name="child_workflow")
class ChildWorkflow:
    @workflows.workflow.entrypoint
    async def run(self, params: ChildInput) -> str:
        return await process_item(params.value)


class ParentInput(BaseModel):
    data: str


@workflows.workflow.define(name="parent_workflow")
class ParentWorkflow:
    @workflows.workflow.entrypoint
    async def run(self, params: ParentInput) -> str:
        child_result = await workflows.execute_workflow(
            ChildWorkflow, params=ChildInput(value=params.data)
        )
        return f"Parent got: {child_result}"


async def main():
    result = await workflows.execute_workflow(
        ParentWorkflow,
        params=ParentInput(data="hello"),
    )
    print(result)
# ---------------------------------------------------------------- end of block 1


from datetime import timedelta  # noqa: E402  (used by blocks 2 and 3; the page leaves it out)

from treeflow import workflow  # noqa: E402  (the page's `workflow`)
# block 3's import line; the page: from mistralai.workflows import ParentClosePolicy
from treeflow import ParentClosePolicy  # noqa: E402


@workflows.workflow.define(name="fire_and_forget_parent")
class FireAndForgetParent:
    @workflows.workflow.entrypoint
    async def run(self, params: ParentInput) -> str:
        child_params = ChildInput(value=params.data)
        # ------------------------------------------------------------ block 2: Fire and forget
        handle = await workflow.execute_workflow(
            ChildWorkflow,
            params=child_params,
            execution_timeout=timedelta(hours=1),
            wait=False,
        )
        # Parent continues immediately — child runs independently
        # Optionally await later: result = await handle
        # ------------------------------------------------------------ end of block 2
        return handle.execution_id


@workflows.workflow.define(name="terminate_policy_parent")
class TerminatePolicyParent:
    @workflows.workflow.entrypoint
    async def run(self, params: ParentInput) -> str:
        child_params = ChildInput(value=params.data)
        # ------------------------------------------------------------ block 3: Parent close policy
        handle = await workflow.execute_workflow(
            ChildWorkflow,
            params=child_params,
            execution_timeout=timedelta(hours=1),
            wait=False,
            parent_close_policy=ParentClosePolicy.TERMINATE,
        )
        # ------------------------------------------------------------ end of block 3
        return handle.execution_id
