"""Fresh ids for commands: random UUIDs without a system call each.

`uuid.uuid4()` reads the OS's random source on every call, which is slow on some
virtual machines (tens of microseconds) and commands are made on the hot path.
These come from a generator seeded once from the OS: unique, not secret.
"""

from __future__ import annotations

import os
import random
import uuid

_random = random.Random(os.urandom(32))
# A forked child must not repeat its parent's ids.
os.register_at_fork(after_in_child=lambda: _random.seed(os.urandom(32)))


def new_id() -> str:
    return str(uuid.UUID(int=_random.getrandbits(128), version=4))
