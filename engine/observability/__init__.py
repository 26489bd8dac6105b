"""Metrics, health checks and (optionally) traces of treeflow's processes.

- `treeflow.observability.metrics`: every Prometheus metric, one module.
- `treeflow.observability.http`: `/metrics`, `/healthz`, `/readyz` for the processor and workers.
- `treeflow.observability.tracing`: OpenTelemetry spans and `traceparent` headers (the `tracing` extra).

Importing this package imports neither faust nor the tracing SDK.
"""
