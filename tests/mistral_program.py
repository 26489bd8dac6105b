"""A program written for Mistral's Workflows SDK, run with only its import line changed
(`import mistralai.workflows as workflows` -> `import treeflow as workflows`)."""

from datetime import timedelta

from pydantic import BaseModel

import treeflow as workflows


class Customer(BaseModel):
    name: str
    tier: str = "basic"


@workflows.activity(timedelta(seconds=20), retry_policy_max_attempts=2, retry_policy_backoff_coefficient=1.5)
async def quote(item: str, qty: int) -> int:
    return qty * len(item)


@workflows.activity(heartbeat_timeout=timedelta(seconds=30))
async def pack(items: list[str]) -> str:
    workflows.activity_heartbeat(len(items))
    async with workflows.task("packing", state={"packed": 0}) as progress:
        await progress.set_state({"packed": len(items)})
    return ",".join(items)


@workflows.workflow.define(name="order_workflow", workflow_description="Takes an order",
                           workflow_display_name="Order")
class OrderWorkflow:
    def __init__(self) -> None:
        self.items: dict[str, int] = {}
        self.total = 0
        self.closed = False

    @workflows.workflow.signal(name="add_item", description="Put items in the basket")
    async def add_item(self, item: str, qty: int = 1) -> None:
        self.items[item] = self.items.get(item, 0) + qty

    @workflows.workflow.signal(name="checkout")
    def checkout(self) -> None:
        self.closed = True

    @workflows.workflow.query(name="basket")
    def basket(self, only: str | None = None) -> dict[str, int]:
        return {k: v for k, v in self.items.items() if only is None or k == only}

    @workflows.workflow.update(name="price")
    async def price(self, item: str, qty: int = 1) -> int:
        self.total += await quote(item, qty)
        return self.total

    @price.validator
    def check_price(self, item: str, qty: int = 1) -> None:
        if qty > 100:
            raise ValueError("at most 100 at a time")

    @workflows.workflow.entrypoint
    async def run(self, customer: Customer, max_items: int = 10) -> dict:
        async with workflows.task("order", state={"stage": "open"}) as stage:
            await workflows.workflow.wait_condition(
                lambda: self.closed or sum(self.items.values()) >= max_items, timeout=timedelta(minutes=5))
            await stage.update_state({"stage": "packing"})
            packed = await pack(sorted(self.items))
        return {"customer": customer.name, "packed": packed, "total": self.total,
                "execution_id": workflows.get_execution_id()}
