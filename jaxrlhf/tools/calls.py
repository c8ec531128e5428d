"""Tools a policy may call mid-episode: loading them, running a call safely, wrapping the answer.

A tool is a plain Python function ``fn(call_text) -> str``. The policy writes
``<tool_call>…</tool_call>`` (Qwen2.5 / Hermes markers by default, ``ToolConfig``); the text between
the markers is the call, and the tool's answer comes back to the policy as
``<tool_response>…</tool_response>``. With several tools the call names one: either as JSON
``{"name": "calculator", "arguments": …}`` (the Hermes format) or as the first word of the call;
with a single tool every call goes to it.

A tool must never end a training run: an exception, a result that is not a string, or a call that
runs past ``timeout_s`` becomes an error text the policy reads (``"error: …"``), and every answer is
cut to ``max_response_chars``. A timed-out call's thread cannot be killed from Python; it is left to
finish in the background, and its result is dropped.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import json
from collections.abc import Callable, Sequence

from jaxrlhf.config import option, require

ToolFn = Callable[[str], str]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToolConfig:
    """How tool calls are marked in the text, and how many and how long they may be."""

    call_start: str = option("<tool_call>", "Text that opens a tool call written by the policy.")
    call_end: str = option(
        "</tool_call>", "Text that closes a tool call: generation pauses here and the tool runs."
    )
    response_start: str = option("<tool_response>", "Text put before a tool's answer.")
    response_end: str = option("</tool_response>", "Text put after a tool's answer.")
    max_turns: int = option(2, "Tool calls per episode; later calls are left unanswered.")
    max_response_chars: int = option(200, "A tool's answer is cut to this many characters.")
    max_response_tokens: int = option(
        32, "A tool's answer, with its markers, is cut to this many tokens."
    )
    timeout_s: float = option(5.0, "A call that runs longer answers with an error text.")

    def __post_init__(self):
        for name in ("call_start", "call_end"):
            require(bool(getattr(self, name)), self, name, "must be a non-empty string")
        require(self.max_turns >= 1, self, "max_turns", "must be ≥ 1")
        for name in ("max_response_chars", "max_response_tokens"):
            require(getattr(self, name) >= 1, self, name, "must be ≥ 1")
        require(self.timeout_s > 0, self, "timeout_s", "must be > 0 seconds")


def load_tool(spec: str) -> ToolFn:
    """``"package.module:function"`` → the function (the ``--tool`` flag's value)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"--tool {spec!r}: expected module:function, e.g. jaxrlhf.tools:calculator"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"--tool {spec!r}: cannot import {module_name!r} ({err})") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise TypeError(f"--tool {spec!r}: {module_name} has no function {attr!r}")
    return fn


def tool_name(fn: ToolFn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


class Toolbox:
    """The tools of a run, called by name with a timeout; answers are always strings."""

    def __init__(self, tools: Sequence[ToolFn], config: ToolConfig | None = None):
        if not tools:
            raise ValueError("a Toolbox needs at least one tool")
        self.config = config or ToolConfig()
        self.tools = {tool_name(fn): fn for fn in tools}
        if len(self.tools) != len(tools):
            raise ValueError(f"two tools share a name: {[tool_name(fn) for fn in tools]}")
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)

    def pick(self, call: str) -> tuple[ToolFn | None, str]:
        """The tool a call names (the only tool when there is one) → (fn or None, its name)."""
        if len(self.tools) == 1:
            return next(iter(self.tools.values())), next(iter(self.tools))
        try:
            name = json.loads(call).get("name", "")
        except (ValueError, AttributeError):
            name = call.strip().split(maxsplit=1)[0] if call.strip() else ""
        return self.tools.get(name), name

    def __call__(self, call: str) -> str:
        """Run one call → the answer text (an ``error: …`` text instead of raising)."""
        return self.answer_all([call])[0]

    def answer_all(self, calls: Sequence[str]) -> list[str]:
        """Run calls side by side (threads) → their answers, each within ``timeout_s``."""
        running = []
        for call in calls:
            fn, name = self.pick(call)
            running.append((name, None if fn is None else self._pool.submit(fn, call)))
        return [self._answer(name, future)[: self.config.max_response_chars]
                for name, future in running]  # fmt: skip

    def _answer(self, name: str, future) -> str:
        if future is None:
            return f"error: no tool named {name!r} (tools: {', '.join(self.tools)})"
        try:
            answer = future.result(timeout=self.config.timeout_s)
        except concurrent.futures.TimeoutError:
            return f"error: {name} timed out after {self.config.timeout_s:g} s"
        except Exception as err:  # noqa: BLE001 — a tool's failure is an answer, not a crash
            return f"error: {type(err).__name__}: {err}"
        if not isinstance(answer, str):
            return f"error: {name} returned {type(answer).__name__}, not str"
        return answer

    def wrap(self, answer: str) -> str:
        """The text appended to the episode: ``<tool_response>answer</tool_response>``."""
        return f"{self.config.response_start}{answer}{self.config.response_end}"


def call_text(text: str, config: ToolConfig) -> str:
    """The call of the turn that ``text`` (an episode so far, ending in ``call_end``) closes: what
    lies after the last ``call_start``, or after the last tool answer when the opener is missing."""
    body = text[: text.rfind(config.call_end)] if config.call_end in text else text
    for opener in (config.call_start, config.response_end):
        if opener in body:
            return body[body.rfind(opener) + len(opener) :].strip()
    return body.strip()


def tool_schema(fn: ToolFn) -> dict:
    """The JSON schema of a tool for a chat template's ``tools=`` (one string argument, the call)."""
    doc = (getattr(fn, "__doc__", None) or "").strip().splitlines()
    return {
        "type": "function",
        "function": {
            "name": tool_name(fn),
            "description": doc[0] if doc else tool_name(fn),
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string", "description": "the call"}},
                "required": ["expression"],
            },
        },
    }
