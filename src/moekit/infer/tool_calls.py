"""Tool calls in a model's output: finding them, and forcing them.

A chat model that was trained to call tools writes each call in its family's own format; the
chat template that renders tool definitions into the prompt tells which. Four formats cover
the families moekit imports:

    hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call>   (Qwen2.5/3, OLMoE,
                 moekit's own template, and most fine-tunes)
    mistral      [TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]      (Mixtral, Mistral)
    llama3_json  {"name": ..., "parameters": {...}}  (the whole answer; Llama 3.1+/4 JSON calls)
    deepseek_v3  <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
                 ```json {...}```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>      (DeepSeek-V3)

`ToolCallParser.parse(text)` splits a finished answer into its text and its calls;
`ToolCallStream` does the same while the answer streams: text is released as long as it
cannot be the start of a call; the calls, once the answer has ended.

A call the request forces (`tool_choice` "required" or a named function) is not left to the
format: the answer is constrained to a JSON schema (`forced_call_schema`), as vLLM does, and
read back with `forced_calls`.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

TOOL_PARSERS = ("hermes", "mistral", "llama3_json", "deepseek_v3")


@dataclass(frozen=True)
class ToolCall:
    """One call: the function's name and its arguments as a JSON text (as the OpenAI API
    carries them), with an id the tool's answer refers to."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        if index is not None:
            out = {"index": index, **out}
        return out


def _call(obj: Any, arguments_key: str = "arguments") -> ToolCall | None:
    """A call from a decoded {"name": ..., "arguments": {...}} object, or None when it is not
    one (a call the model got wrong stays text)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(arguments_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _decoded_calls(items: Iterable[tuple[str | None, str]]) -> list[ToolCall] | None:
    """Calls from (name, JSON text) pairs: with a name, the text holds the arguments; without,
    the whole {"name", "arguments"} object. None when one of them is malformed."""
    calls = []
    for name, body in items:
        try:
            data = json.loads(body)
        except json.JSONDecodeError:
            return None
        call = _call(data if name is None else {"name": name.strip(), "arguments": data})
        if call is None:
            return None
        calls.append(call)
    return calls or None


class ToolCallParser:
    """One output format: `start`, the text that opens the calls, and `calls(block)`, the
    calls in the text from `start` on (None when it holds no well-formed call)."""

    name = ""
    start = ""

    def calls(self, block: str) -> list[ToolCall] | None:
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """A finished answer's text before the calls, and the calls ([] when there are none,
        or when they are malformed: then the whole answer stays text)."""
        at = text.find(self.start)
        if at < 0:
            return text, []
        calls = self.calls(text[at:])
        if not calls:
            return text, []
        return text[:at].rstrip(), calls


class HermesParser(ToolCallParser):
    name, start = "hermes", "<tool_call>"
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def calls(self, block: str) -> list[ToolCall] | None:
        return _decoded_calls((None, body) for body in self._block.findall(block))


class MistralParser(ToolCallParser):
    name, start = "mistral", "[TOOL_CALLS]"

    def calls(self, block: str) -> list[ToolCall] | None:
        body = block[len(self.start) :].strip()
        try:
            data, _ = json.JSONDecoder().raw_decode(body)
        except json.JSONDecodeError:
            return None
        items = data if isinstance(data, list) else [data]
        calls = [_call(item) for item in items]
        return [c for c in calls if c is not None] if calls and all(calls) else None


class Llama3JsonParser(ToolCallParser):
    """The whole answer is one JSON object {"name", "parameters"} (after an optional
    <|python_tag|>), or several separated by ";"."""

    name, start = "llama3_json", "{"

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if not body.startswith("{"):
            return text, []
        calls = self.calls(body)
        return ("", calls) if calls else (text, [])

    def calls(self, block: str) -> list[ToolCall] | None:
        decoder, calls, at = json.JSONDecoder(), [], 0
        while at < len(block):
            try:
                obj, at = decoder.raw_decode(block, at)
            except json.JSONDecodeError:
                return None
            call = _call(obj, "parameters")
            if call is None:
                return None
            calls.append(call)
            rest = block[at:].lstrip()
            if rest.startswith(";"):
                rest = rest[1:].lstrip()
            elif rest:
                return None
            at = len(block) - len(rest)
        return calls or None


class DeepSeekV3Parser(ToolCallParser):
    name, start = "deepseek_v3", "<｜tool▁calls▁begin｜>"
    _call_re = re.compile(
        r"<｜tool▁call▁begin｜>\s*(?:function)?\s*<｜tool▁sep｜>\s*([^\n<]+?)\s*\n?"
        r"```(?:json)?\s*(.*?)\s*```\s*<｜tool▁call▁end｜>",
        re.DOTALL,
    )

    def calls(self, block: str) -> list[ToolCall] | None:
        return _decoded_calls(self._call_re.findall(block))


_PARSERS: dict[str, type[ToolCallParser]] = {
    p.name: p for p in (HermesParser, MistralParser, Llama3JsonParser, DeepSeekV3Parser)
}


def tool_parser(name: str) -> ToolCallParser:
    """The parser of a format by name (one of TOOL_PARSERS)."""
    if name not in _PARSERS:
        raise ValueError(f"unknown tool-call format {name!r}: one of {', '.join(TOOL_PARSERS)}")
    return _PARSERS[name]()


def detect_tool_parser(template_source: str | None) -> ToolCallParser:
    """The format a chat template asks its model to call tools in, read from the markers the
    template writes; hermes (moekit's own template's) when it shows none."""
    source = template_source or ""
    if "<｜tool▁calls▁begin｜>" in source or "tool▁call" in source:
        return DeepSeekV3Parser()
    if "[TOOL_CALLS]" in source:
        return MistralParser()
    if "<tool_call>" in source:
        return HermesParser()
    if "<|python_tag|>" in source or ('"parameters"' in source and "ipython" in source):
        return Llama3JsonParser()
    return HermesParser()


class ToolCallStream:
    """Tool calls found while an answer streams. `feed(text)` returns the text that can be
    released (it cannot belong to a call); `finish()`, at the end, the text still held and
    the calls. Once a call starts, everything after it is held until the answer ends."""

    def __init__(self, parser: ToolCallParser) -> None:
        self.parser = parser
        self.held = ""  # text that may be the start of a call, or a call's block
        self.in_calls = False
        # Formats whose call is the whole answer decide on its first characters.
        self.whole_answer = isinstance(parser, Llama3JsonParser)
        self.decided = False

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self.held += text
        if self.in_calls:
            return "", []
        if self.whole_answer:
            return self._feed_whole()
        start = self.parser.start
        at = self.held.find(start)
        if at >= 0:
            self.in_calls = True
        else:
            at = len(self.held) - _partial_suffix(self.held, start)
        # Whitespace before a call is not the answer's text: it waits for what follows.
        out = self.held[:at].rstrip()
        self.held = self.held[len(out) :]
        return out, []

    def _feed_whole(self) -> tuple[str, list[ToolCall]]:
        if self.decided:
            return self._release_all()
        head, tag = self.held.lstrip(), "<|python_tag|>"
        if head.startswith(tag):
            head = head[len(tag) :].lstrip()
        elif tag.startswith(head):
            return "", []  # empty so far, or the tag's beginning
        if not head:
            return "", []
        if head.startswith("{"):
            self.in_calls = True
            return "", []
        self.decided = True
        return self._release_all()

    def _release_all(self) -> tuple[str, list[ToolCall]]:
        out, self.held = self.held, ""
        return out, []

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the end of the answer: the text still held and the calls (text and no calls
        when the held block turns out not to be a well-formed call)."""
        held, self.held = self.held, ""
        return self.parser.parse(held) if self.in_calls else (held, [])


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a proper beginning of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


# ---- forced calls --------------------------------------------------------------------------
def forced_call_schema(
    tools: Sequence[Mapping[str, Any]], choice: str | None, *, parallel: bool = True
) -> dict[str, Any]:
    """The JSON schema an answer must follow when the request forces a call: a named
    function's arguments (`choice` its name), or for "required" (`choice` None) a list of one
    or more {"name", "parameters"} objects, one of the tools each."""
    by_name = {t["name"]: t for t in tools}
    if choice is not None:
        return _parameters(by_name[choice])
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "parameters": _parameters(tool)},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for name, tool in by_name.items()
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": options}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def _parameters(tool: Mapping[str, Any]) -> dict[str, Any]:
    params = tool.get("parameters")
    return dict(params) if params else {"type": "object", "properties": {}}


def forced_calls(text: str, choice: str | None) -> list[ToolCall]:
    """The calls in an answer written under `forced_call_schema` (the named function's
    arguments, or the list of calls); [] when it is not complete JSON (cut by max_tokens)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return []
    if choice is not None:
        return [ToolCall(choice, json.dumps(data, ensure_ascii=False))]
    if not isinstance(data, list):
        return []
    calls = [_call(item, "parameters") for item in data]
    return [c for c in calls if c is not None]
