"""Deadlines of the calls that wait for the processor, and why a call got no answer.

A client's command (start, signal, cancel, terminate) is answered by the processor
that holds the command's partition of `<prefix>.commands`. When no answer comes
within the deadline, `why_no_answer` looks at the processor's consumer group (Kafka's
DescribeGroups and OffsetFetch) to say whether any processor runs and holds that
partition.
"""

from __future__ import annotations

import asyncio
import logging
import math

from aiokafka import TopicPartition
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment

from treeflow.kafka import KafkaSettings, SettingsError, clients
from treeflow.kafka.settings import seconds_env

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_ENV = "TREEFLOW_COMMAND_TIMEOUT"
#: Seconds a command waits for the processor's answer unless told otherwise.
DEFAULT_COMMAND_TIMEOUT = 30.0
#: Seconds spent, after a deadline, finding out why no answer came.
DIAGNOSIS_TIMEOUT = 5.0


def command_timeout(seconds: float | None = None) -> float:
    """`seconds`, else `TREEFLOW_COMMAND_TIMEOUT`, else 30; `math.inf` waits forever."""
    if seconds is None:
        seconds = seconds_env(COMMAND_TIMEOUT_ENV)
        if seconds is None:
            return DEFAULT_COMMAND_TIMEOUT
    if not seconds > 0:  # also refuses NaN
        raise SettingsError(f"a command timeout must be more than 0 seconds (got {seconds!r}); "
                            "use inf to wait forever")
    return seconds


def wait_arg(seconds: float) -> float | None:
    """The timeout for `asyncio.wait_for` (None for no deadline)."""
    return None if math.isinf(seconds) else seconds


def processor_group(settings: KafkaSettings) -> str:
    """The consumer group (the faust app id) of the processors of these topics."""
    return f"{settings.topic_prefix}-processor"


async def why_no_answer(settings: KafkaSettings, partition: int, offset: int | None,
                        group: str | None = None) -> str | None:
    """What the processor group says about `partition` of the commands topic, as a
    sentence; None when the broker could not tell within `DIAGNOSIS_TIMEOUT`."""
    try:
        return await asyncio.wait_for(_describe(settings, partition, offset, group or processor_group(settings)),
                                      DIAGNOSIS_TIMEOUT)
    except Exception as error:  # best effort: the deadline is the error, this only explains it
        log.debug("could not describe the processor group: %r", error)
        return None


async def _describe(settings: KafkaSettings, partition: int, offset: int | None, group: str) -> str:
    commands = settings.topics.commands
    admin = await clients.start(clients.admin(settings, "deadlines"), settings)
    try:
        (response, *_) = await admin.describe_consumer_groups([group])
        error_code, _, state, _, _, members, *_ = response.groups[0]
        tp = TopicPartition(commands, partition)
        committed = (await admin.list_consumer_group_offsets(group, partitions=[tp])).get(tp)
    finally:
        await clients.stop(admin)
    position = _position(committed.offset if committed else -1, offset)
    if error_code or not members:
        return (f"no processor is running: its consumer group {group!r} has no members (state {state or 'unknown'}); "
                f"start one (treeflow processor){position}")
    holders, readable = [], True
    for member_id, client_id, client_host, _, assignment in members:
        if not assignment:  # a group in rebalance has none; Tansu never reports them
            readable = False
            continue
        decoded = ConsumerProtocolMemberAssignment.decode(assignment)
        if any(topic == commands and partition in partitions for topic, partitions in decoded.assignment):
            holders.append(f"{member_id} ({client_id or 'no client id'} at {client_host or 'unknown host'})")
    if holders:
        return (f"processor {holders[0]} holds partition {partition} of {commands} but did not answer: "
                f"it is busy, recovering the partition, or stuck{position}")
    if readable:
        return (f"no processor has taken partition {partition} of {commands}: group {group!r} has "
                f"{len(members)} member(s) in state {state}, none assigned that partition (a rebalance?)"
                f"{position}")
    return (f"processor group {group!r} has {len(members)} member(s) (state {state}) but none answered for "
            f"partition {partition} of {commands}: it is rebalancing, recovering, busy or stuck{position}")


def _position(committed: int, offset: int | None) -> str:
    if offset is None:
        return ""
    if committed < 0:
        return f"; no processor has committed any command of that partition yet (this one is at offset {offset})"
    return (f"; the processor group has committed that partition's commands before offset {committed}, "
            f"this one is at offset {offset}")
