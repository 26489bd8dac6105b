"""treeflow: a durable workflow engine for Python whose source of truth is a keyed Kafka topic.

Subpackages: `treeflow.schemas` (the event contract), `treeflow.kafka` (brokers,
topics, partitioning), `treeflow.consumers` (the consumer library services embed).
"""

from treeflow.schemas import ParentClosePolicy

__version__ = "0.1.0"

__all__ = ["ParentClosePolicy", "__version__"]
