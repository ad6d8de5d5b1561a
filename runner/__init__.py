"""The protocol runner behind ``pipeline.py``: recipes, the plan of commands, running and
resuming the stages, and the report (docs/PIPELINE.md)."""
