"""Mistral's Workflows HTTP API (executions and events) on treeflow: the routes the gateway
mounts under ``/v1/workflows`` so that the `mistralai` client works against ``treeflow serve``.

`MistralApi` holds the handlers (`routes()` lists them); `treeflow.consumers.mistral.shapes`
turns treeflow's events and executions into Mistral's JSON shapes. README.md, "Mistral's
HTTP API", documents the routes and what differs from Mistral's. Needs the ``serve`` extra.
"""

from .routes import MISTRAL, TREEFLOW, MistralApi, MistralFrames

__all__ = ["MISTRAL", "TREEFLOW", "MistralApi", "MistralFrames"]
