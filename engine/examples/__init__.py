"""Runnable examples: `treeflow dev` accepts any of these files."""
