"""Tool calling on /v1/chat/completions: the request's `tools` and `tool_choice` checked
against its conversation, the conversation as a chat template takes it, and the answer's
calls read back.

`tool_choice` decides how the answer is made and read (a `ToolPlan`):
- "none" (the default without tools): plain text; the tools are still shown to the model.
- "auto" (the default with tools): the model decides; calls written in its format (see
  moekit.infer.tool_calls) become `message.tool_calls`, the text before them `content`.
- "required" or a named function: the answer is constrained, token by token, to a JSON
  schema of the call(s) (moekit.infer.constrain), so it always parses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from moekit.infer.tool_calls import (
    ToolCall,
    ToolCallParser,
    ToolCallStream,
    forced_call_schema,
    forced_calls,
)
from moekit.serve.protocol import APIError, ChatRequest


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request's answer is read: `mode` "none", "auto" or "forced" (then
    `function` names the forced function, None for "required"), with the server's parser."""

    mode: str
    parser: ToolCallParser
    function: str | None = None

    def read(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """A finished answer as the message's `content` (None when it is only calls) and its
        calls."""
        if self.mode == "none":
            return text, []
        if self.mode == "forced":
            calls = forced_calls(text, self.function)
            return (None, calls) if calls else (text, [])
        content, calls = self.parser.parse(text)
        return (content or None) if calls else text, calls

    def reader(self) -> StreamedAnswer:
        """What reads one choice's answer while it streams."""
        return StreamedAnswer(self)


class StreamedAnswer:
    """One streamed choice read under a plan: `feed(text)` returns the content that can be
    sent now; `finish()`, at the end, the content still held and the calls."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan, self.text = plan, ""
        self.calls = ToolCallStream(plan.parser) if plan.mode == "auto" else None

    def feed(self, text: str) -> str:
        if self.plan.mode == "none":
            return text
        if self.calls is None:  # a forced call: the answer is the call, read at the end
            self.text += text
            return ""
        return self.calls.feed(text)[0]

    def finish(self) -> tuple[str, list[ToolCall]]:
        if self.plan.mode == "none":
            return "", []
        if self.calls is None:
            calls = forced_calls(self.text, self.plan.function)
            return ("", calls) if calls else (self.text, [])
        return self.calls.finish()


def plan_tools(req: ChatRequest, parser: ToolCallParser) -> ToolPlan:
    """The request's plan, after checking its tools against `tool_choice` and its messages
    (a 400 naming the problem)."""
    names = [t.function.name for t in req.tools or ()]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise APIError(400, f"two tools are named {duplicate!r}", param="tools")
    check_tool_messages(req)
    choice = req.tool_choice or ("auto" if names else "none")
    if choice == "none":
        return ToolPlan("none", parser)
    if not names:
        raise APIError(
            400, f"tool_choice {_shown(choice)} needs 'tools' to choose from", param="tool_choice"
        )
    if choice == "auto":
        return ToolPlan("auto", parser)
    if choice == "required":
        return ToolPlan("forced", parser)
    assert not isinstance(choice, str)
    name = choice.function.name
    if name not in names:
        raise APIError(
            400,
            f"tool_choice names the function {name!r}, which is not among the tools "
            f"({', '.join(names)})",
            param="tool_choice",
        )
    return ToolPlan("forced", parser, name)


def _shown(choice: Any) -> str:
    return repr(choice) if isinstance(choice, str) else repr(choice.function.name)


def check_tool_messages(req: ChatRequest) -> None:
    """Each tool message answers a call an earlier assistant message made."""
    made: set[str] = set()
    for i, m in enumerate(req.messages):
        for call in m.tool_calls or ():
            made.add(call.id)
        if m.role == "tool" and m.tool_call_id not in made:
            raise APIError(
                400,
                f"message {i} (role 'tool') answers tool_call_id {m.tool_call_id!r}, but no "
                "earlier assistant message made a call with that id",
                param="messages",
            )


def template_messages(req: ChatRequest) -> list[dict[str, Any]]:
    """The conversation as chat templates take it (Hugging Face's form): a call's arguments
    as an object, a tool message with the name of the function it answers."""
    names: dict[str, str] = {}
    out = []
    for m in req.messages:
        message: dict[str, Any] = {
            "role": "system" if m.role == "developer" else m.role,
            "content": m.text(),
        }
        if m.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": _object(c)},
                }
                for c in m.tool_calls
            ]
            names.update((c.id, c.function.name) for c in m.tool_calls)
        if m.role == "tool":
            message["tool_call_id"] = m.tool_call_id
            message["name"] = m.name or names.get(m.tool_call_id or "", "")
        out.append(message)
    return out


def _object(call: Any) -> Any:
    """A call's arguments decoded (templates write them with `tojson`); its text when it is
    not JSON."""
    try:
        return json.loads(call.function.arguments)
    except json.JSONDecodeError:
        return call.function.arguments


def template_tools(req: ChatRequest) -> list[dict[str, Any]] | None:
    """The tool definitions as chat templates take them (OpenAI's form, unset fields left
    out)."""
    if not req.tools:
        return None
    return [t.model_dump(exclude_none=True) for t in req.tools]


def forced_schema(req: ChatRequest, plan: ToolPlan) -> dict[str, Any]:
    """The JSON schema a forced answer follows."""
    tools = [
        {"name": t.function.name, "parameters": t.function.parameters} for t in req.tools or ()
    ]
    return forced_call_schema(tools, plan.function, parallel=req.parallel_tool_calls)
