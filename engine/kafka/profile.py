"""Broker profiles: the one place where client settings differ between brokers.

treeflow's clients behave the same on every broker; a profile only tunes what a
broker needs tuned. The embedded Tansu broker has gaps (DESIGN.md §8) that the
`tansu` profile works around; on Apache Kafka the `kafka` profile changes nothing
the engine relies on. Every Kafka call is written to Apache Kafka's protocol; a
Tansu gap is worked around here, or in `treeflow.kafka.offsets` keyed by
`exact_list_offsets`, never by weakening what the engine does on Kafka.

The profile is chosen, not detected (`TREEFLOW_BROKER_PROFILE`, `kafka` when unset):
a guess would cost a probe on every start and could be wrong on other brokers. The
wrong profile's one symptom, the broker refusing an idempotent producer, is turned
into `WrongProfileError` naming the fix (`treeflow.kafka.clients.start`).

Tansu 0.6.0 deviations found and handled (beside DESIGN.md §8's list):

- Metadata (v1+) with an EMPTY topic list answers every topic; Kafka answers none.
  Handled everywhere, not here: treeflow reads partition counts with Metadata
  requests naming its topics (`treeflow.kafka.topics.partition_counts`), never from
  a client's cluster view.
- Metadata naming a missing topic with ``allow_auto_topic_creation=true`` creates it
  (4 partitions); with ``false`` it answers UNKNOWN_TOPIC_OR_PARTITION as Kafka does.
  aiokafka 0.14 always sends ``true``: every client treeflow builds sends ``false``
  (`treeflow.kafka.clients`), on every broker.
- InitProducerId fails with UnknownError: `idempotent_producer=False` below.
- TLS cannot be enabled from the command line (`--cert` and `--key` are in one clap
  group that admits only one); with `--authentication`, SASL PLAIN is not offered and
  SCRAM users cannot be created on the in-memory store. The security tests put a
  TLS/SASL front before it.
- Not Tansu's, aiokafka's (on Kafka too): a commit to a deleted topic fails with a
  retriable error that aiokafka retries forever; treeflow stops committing once its
  topics vanished.

- A fetch lists the partition's stored batches from the first one until it reaches
  the fetch offset or the fetch's max wait is over (dynostore `fetch`): its cost
  grows with the partition's history, and past what it lists within the wait it
  answers no records at all, while the high watermark says there are some. In the
  `tansu` profile a consumer's wait grows after such an answer and comes back down
  while records flow (`fetch_max_wait_ceiling_ms`, `treeflow.kafka.fetch_wait`); a
  long-lived embedded broker still slows down as its partitions grow (more
  partitions help). Kafka finds an offset through its index, in constant time.

Found since DESIGN.md §8 was written (consumer library, aiokafka 0.14): Tansu
acknowledges LeaveGroup but keeps the member until its session times out, so a
consumer that rejoins a group soon after another member left waits for that: the
join took 7.2 s at `session_timeout_ms=3000` (2.1 s for a first join) and 4.2 s at
1500 (1.1 s). Nothing is lost; a restarted service consumer only starts later.
No setting works around it short of a session timeout too short for a loaded host.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .errors import SettingsError
from .partitioner import key_partitioner

PROFILE_ENV = "TREEFLOW_BROKER_PROFILE"
FETCH_WAIT_ENV = "TREEFLOW_FETCH_MAX_WAIT_MS"


@dataclass(frozen=True)
class BrokerProfile:
    """Client settings for one kind of broker."""

    name: str
    #: How long a fetch may wait for data. Tansu does not wake a waiting fetch
    #: when data arrives (it looks again after half the remaining wait), so a low
    #: bound is what keeps latency low there (a hop took 3.5 ms at 2 ms, 9.4 ms at
    #: 10 ms); 0 makes Tansu answer with no data at all.
    fetch_max_wait_ms: int
    #: Where the wait may grow to, or None for a fixed wait. Tansu finds the fetch
    #: offset by listing every stored batch of the partition from the first, and
    #: stops listing when the wait is over: a fetch deeper than it can list within
    #: the wait answers nothing, every time (at 2 ms a loaded machine stalled every
    #: consumer of a partition past ~10,000 batches). There the wait doubles after
    #: such an answer and comes back down while records flow (`treeflow.kafka.fetch_wait`).
    fetch_max_wait_ceiling_ms: int | None
    #: Tansu makes a group join wait half the session timeout (at least ~1 s):
    #: keep it short there.
    session_timeout_ms: int
    heartbeat_interval_ms: int
    #: Tansu has no idempotent or transactional producer.
    idempotent_producer: bool
    #: Tansu's ListOffsets answers the last batch's first offset + 1, too low when
    #: that batch holds several records; fetch responses carry the true high
    #: watermark, which `treeflow.kafka.offsets.end_offsets` then reads instead.
    exact_list_offsets: bool

    def producer_options(self) -> dict[str, Any]:
        return {
            "acks": "all",
            "enable_idempotence": self.idempotent_producer,
            "partitioner": key_partitioner,
            "linger_ms": 0,
        }

    def fetch_wait_ms(self) -> int:
        """`fetch_max_wait_ms`, or `TREEFLOW_FETCH_MAX_WAIT_MS` when set."""
        raw = os.environ.get(FETCH_WAIT_ENV)
        if not raw:
            return self.fetch_max_wait_ms
        if not raw.isdigit() or int(raw) < 1:
            raise SettingsError(f"{FETCH_WAIT_ENV}={raw!r} must be a whole number of milliseconds, at least 1")
        return int(raw)

    def consumer_options(self) -> dict[str, Any]:
        return {
            "fetch_max_wait_ms": self.fetch_wait_ms(),
            "session_timeout_ms": self.session_timeout_ms,
            "heartbeat_interval_ms": self.heartbeat_interval_ms,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
        }


KAFKA = BrokerProfile(
    name="kafka",
    fetch_max_wait_ms=100,
    fetch_max_wait_ceiling_ms=None,
    session_timeout_ms=10_000,
    heartbeat_interval_ms=3_000,
    idempotent_producer=True,
    exact_list_offsets=True,
)

TANSU = BrokerProfile(
    name="tansu",
    fetch_max_wait_ms=2,
    fetch_max_wait_ceiling_ms=500,
    session_timeout_ms=3_000,
    heartbeat_interval_ms=1_000,
    idempotent_producer=False,
    exact_list_offsets=False,
)

PROFILES = {profile.name: profile for profile in (KAFKA, TANSU)}


def profile_named(name: str) -> BrokerProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise SettingsError(f"unknown broker profile {name!r}; choose one of {sorted(PROFILES)}") from None


def current_profile() -> BrokerProfile:
    """The profile named by `TREEFLOW_BROKER_PROFILE`, `kafka` when unset."""
    return profile_named(os.environ.get(PROFILE_ENV, KAFKA.name))
