"""Tool use: tools a policy calls mid-episode (``calls``), and the rollout in turns (``turns``)."""

from jaxrlhf.tools.calculator import calculator
from jaxrlhf.tools.calls import Toolbox, ToolConfig, call_text, load_tool, tool_schema
from jaxrlhf.tools.turns import sample_turns

__all__ = [
    "ToolConfig",
    "Toolbox",
    "calculator",
    "call_text",
    "load_tool",
    "sample_turns",
    "tool_schema",
]
