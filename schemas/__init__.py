"""treeflow's record contract: Avro schemas, typed models and the codec.

`Event` is what the events topic holds, `Command` the commands topic, `Task` the
tasks topics and `Reply` the replies topic; `EVENTS`, `COMMANDS`, `TASKS` and
`REPLIES` encode and decode them.
"""

from ._base import MODELS_BY_AVRO_NAME, AvroModel
from .codec import COMMANDS, EVENTS, REPLIES, SNAPSHOTS, TASKS, DecodeError, RecordCodec, RecordPosition
from .models import *  # noqa: F403  (the generated models are the public surface)
from .models import EventType


def _record_name(event_type: EventType) -> str:
    return "treeflow.events." + "".join(part.capitalize() for part in event_type.value.split("_"))


#: The payload model of each event type (the record named after it).
PAYLOAD_MODELS: dict[EventType, type[AvroModel]] = {
    event_type: MODELS_BY_AVRO_NAME[_record_name(event_type)] for event_type in EventType
}
#: The event type of each payload model.
EVENT_TYPES: dict[type[AvroModel], EventType] = {model: t for t, model in PAYLOAD_MODELS.items()}

#: The event types that close an execution's run, and the status each leaves.
CLOSING_STATUS: dict[EventType, str] = {
    EventType.WORKFLOW_EXECUTION_COMPLETED: "COMPLETED",
    EventType.WORKFLOW_EXECUTION_FAILED: "FAILED",
    EventType.WORKFLOW_EXECUTION_CANCELED: "CANCELED",
    EventType.WORKFLOW_EXECUTION_TERMINATED: "TERMINATED",
    EventType.WORKFLOW_EXECUTION_TIMED_OUT: "TIMED_OUT",
    EventType.WORKFLOW_EXECUTION_CONTINUED_AS_NEW: "CONTINUED_AS_NEW",
}

#: Events of a schedule (README "Schedules"), not of an execution: their workflow_context's
#: workflow_exec_id and root are the schedule id; the schedule's runs are keyed in that tree.
SCHEDULE_EVENTS: frozenset[EventType] = frozenset({
    EventType.SCHEDULE_CREATED, EventType.SCHEDULE_PAUSED, EventType.SCHEDULE_RESUMED, EventType.SCHEDULE_DELETED,
    EventType.SCHEDULE_FIRED, EventType.SCHEDULE_SKIPPED, EventType.SCHEDULE_BUFFERED,
})
