"""Evaluation tasks (registered) and the report."""

from anatomap.eval import position  # noqa: F401  (registers "position")
