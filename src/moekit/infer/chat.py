"""A simple chat template: role-tagged turns as plain text.

```
<|system|>
You are helpful.
<|user|>
Hi!
<|assistant|>
Hello.
```

A model directory may carry its own template as chat_template.json (fine-tuning writes the
one it trained with); otherwise this default is used. Generation stops when the model starts a
new turn. `ChatSession` holds a conversation (what `moekit chat` runs).
"""

from __future__ import annotations

import contextlib
import json
import string
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from moekit.model_dir import ModelDir

if TYPE_CHECKING:
    from moekit.infer.generate import Generator
    from moekit.infer.sampling import SamplingParams

ROLES = ("system", "user", "assistant")
TEMPLATE_FILE = ModelDir.CHAT_TEMPLATE


@dataclass(frozen=True)
class ChatTemplate:
    turn: dict[str, str] = field(
        default_factory=lambda: {role: f"<|{role}|>\n{{content}}\n" for role in ROLES}
    )
    generation_prompt: str = "<|assistant|>\n"
    stop: tuple[str, ...] = ("<|user|>", "<|system|>", "<|assistant|>", "<|tool|>")
    # The formatted text holds no special tokens: a prompt gets the tokenizer's own (its BOS).
    includes_special_tokens: ClassVar[bool] = False

    def format(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """The prompt text for `messages` (each {"role": ..., "content": ...}). With `tools`
        (OpenAI function definitions), a system turn lists them and says how to call one:
        `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; an assistant message's
        `tool_calls` are written that way, and "tool" messages (the calls' results) take a
        turn of their own."""
        turns = {"tool": TOOL_TURN, **self.turn}
        messages = _with_tools(messages, tools) if tools else messages
        parts = []
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in turns:
                raise ValueError(f"message {i}: role {role!r} is not one of {', '.join(turns)}")
            if not isinstance(content, str):
                raise ValueError(f"message {i}: content must be a string")
            calls = [_call_text(c) for c in message.get("tool_calls") or ()]
            if calls:
                content = "\n".join([content, *calls] if content else calls)
            parts.append(turns[role].format(content=content))
        if add_generation_prompt:
            parts.append(self.generation_prompt)
        return "".join(parts)

    def to_json(self) -> str:
        return (
            json.dumps(
                {
                    "turn": self.turn,
                    "generation_prompt": self.generation_prompt,
                    "stop": list(self.stop),
                },
                indent=2,
            )
            + "\n"
        )

    @classmethod
    def load(cls, model_dir: str | Path) -> ChatTemplate:
        """The template of a model directory, or the default when it has none."""
        path = Path(model_dir) / TEMPLATE_FILE
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
            return cls(
                turn=dict(data["turn"]),
                generation_prompt=str(data["generation_prompt"]),
                stop=tuple(data.get("stop", ())),
            )
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a valid chat template ({e})") from e


TOOL_TURN = "<|tool|>\n{content}\n"
TOOLS_PREAMBLE = (
    "You may call these functions, described as JSON schemas, to help answer:\n<tools>\n"
    "{tools}\n</tools>\nTo call one, answer with a JSON object of its name and arguments "
    'inside <tool_call></tool_call> tags: <tool_call>{{"name": ..., "arguments": {{...}}}}'
    "</tool_call>. Each result comes back in a tool turn."
)


def _with_tools(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    """The conversation with the tool definitions added to its system message (a system
    message of their own when it has none)."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    preamble = TOOLS_PREAMBLE.format(tools=listed)
    out = list(messages)
    if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{preamble}"}
    else:
        out.insert(0, {"role": "system", "content": preamble})
    return out


def _call_text(call: Mapping[str, Any]) -> str:
    """An earlier call as the model writes it (OpenAI's {"function": {"name", "arguments"}}
    or a bare {"name", "arguments"}; the arguments an object or its JSON text)."""
    function = call.get("function", call)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        with contextlib.suppress(json.JSONDecodeError):  # else written as it is
            arguments = json.loads(arguments)
    body = json.dumps({"name": function.get("name"), "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


class PromptTemplate(Protocol):
    """What a chat needs of a template: moekit's `ChatTemplate` or a Jinja one
    (moekit.infer.jinja_chat)."""

    @property
    def stop(self) -> tuple[str, ...]: ...

    @property
    def includes_special_tokens(self) -> bool: ...

    def format(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str: ...


def prompt_ids(template: PromptTemplate, tokenizer: Any, text: str) -> list[int]:
    """The token ids of a prompt `template` formatted: as it is when the template wrote the
    special tokens itself, else after the tokenizer's own prompt prefix."""
    if template.includes_special_tokens:
        return list(tokenizer.encode(text))
    return list(tokenizer.encode_prompt(text))


class ChatSession:
    """A conversation with a model: each `send` adds the user's message, streams the reply
    and remembers both. When the conversation outgrows the model's context, the oldest
    exchanges are forgotten (a system message is kept)."""

    def __init__(
        self,
        generator: Generator,
        params: SamplingParams,
        *,
        template: PromptTemplate | None = None,
        system: str | None = None,
    ) -> None:
        self.generator = generator
        self.template: PromptTemplate = template or ChatTemplate()
        self.params = params
        self.system = system
        self.history: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (keeping the system message)."""
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, message: str) -> Iterator[str]:
        """Stream the reply to `message` as text pieces. A message too long for the model's
        context even alone is a ContextLengthError, and is not remembered."""
        import dataclasses

        from moekit.infer.generate import ContextLengthError

        params = dataclasses.replace(
            self.params, stop=[*self.params.stop, *(s for s in self.template.stop)]
        )
        self.history.append({"role": "user", "content": message})
        first = 1 if self.system else 0
        while True:
            try:
                text = self.template.format(self.history)
                ids = prompt_ids(self.template, self.generator.tokenizer, text)
                pieces = self.generator.stream(ids, params)
                reply = ""
                for chunk in pieces:
                    reply += chunk.text
                    yield chunk.text
                break
            except ContextLengthError:
                if len(self.history) - first <= 1:  # the message alone does not fit
                    self.history.pop()
                    raise
                del self.history[first : first + 2]  # forget the oldest exchange
        if reply:
            self.history.append({"role": "assistant", "content": reply.strip()})


def check_template(template: ChatTemplate, source: str) -> None:
    """Render a probe conversation (a turn of every role) with `template`; a ValueError
    naming `source` (where the template came from) and the faulty turn when it cannot be
    rendered, e.g. a placeholder other than {content}."""
    for role, turn in template.turn.items():
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(turn) if name is not None]
            unknown = next((n for n in names if n != "content"), None)
            if unknown is None:
                template.format([{"role": role, "content": "probe"}])
                continue
            problem = f"has the placeholder {{{unknown}}}, but {{content}} is the only one"
        except (ValueError, KeyError, IndexError, AttributeError, TypeError) as e:
            problem = f"cannot be rendered ({type(e).__name__}: {e})"
        raise ValueError(
            f"{source}: the {role!r} turn {turn!r} {problem} (write {{{{ and }}}} for a "
            "literal brace)"
        )
