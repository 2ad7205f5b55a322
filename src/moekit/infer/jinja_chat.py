"""Chat templates as Hugging Face checkpoints carry them: a Jinja2 template in
tokenizer_config.json (`chat_template`), rendered the way transformers renders it.

The template sees `messages` (each {"role", "content"}), `add_generation_prompt`, the
tokenizer's `bos_token` and `eos_token` strings and, when given, `tools`; it may call
`raise_exception(message)` (a conversation it refuses: a ValueError here) and
`strftime_now(format)`. It runs in Jinja2's immutable sandbox with `trim_blocks` and
`lstrip_blocks`, as in transformers, and its `tojson` keeps non-ASCII text as it is. The
rendered text already holds the special tokens the model expects (a BOS token, turn markers),
so it is encoded without adding any (`includes_special_tokens`).

`load_chat_template(model_dir)` picks a model directory's template: moekit's own
chat_template.json (written by fine-tuning, which lays data out with it) first, then the
Jinja template of tokenizer_config.json (an imported checkpoint's), then moekit's default.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from moekit.files import read_json
from moekit.infer.chat import TEMPLATE_FILE, ChatTemplate
from moekit.model_dir import ModelDir


class JinjaChatTemplate:
    """A Jinja2 chat template (`source`) with the special token strings it may use. Same
    interface as moekit's `ChatTemplate` (`format`, `stop`), plus `includes_special_tokens`."""

    includes_special_tokens = True
    stop: tuple[str, ...] = ()  # turns end at the model's end-of-sequence ids instead

    def __init__(
        self, source: str, *, bos_token: str | None = None, eos_token: str | None = None
    ) -> None:
        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token

    @cached_property
    def _template(self) -> Any:
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        def tojson(value: Any, indent: int | None = None, **_: Any) -> str:
            return json.dumps(value, ensure_ascii=False, indent=indent)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.source)
        except TemplateError as e:
            raise ValueError(f"the chat template does not parse: {e}") from None

    def format(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """The prompt text for `messages`; a ValueError saying why when the template refuses
        them (its own `raise_exception`) or fails."""
        from jinja2 import TemplateError

        for i, message in enumerate(messages):
            if not isinstance(message.get("role"), str):
                raise ValueError(f"message {i}: role must be a string")
        try:
            return str(
                self._template.render(
                    messages=[dict(m) for m in messages],
                    add_generation_prompt=add_generation_prompt,
                    bos_token=self.bos_token or "",
                    eos_token=self.eos_token or "",
                    tools=list(tools) if tools else None,
                )
            )
        except TemplateError as e:
            raise ValueError(f"the chat template refused the messages: {e}") from None
        except (TypeError, KeyError, AttributeError, IndexError) as e:
            raise ValueError(f"the chat template failed ({type(e).__name__}: {e})") from None


def hf_chat_template(model_dir: str | Path) -> str | None:
    """The Jinja chat template of a model directory's tokenizer_config.json (a string, or the
    "default" of a list of named templates), or None."""
    path = Path(model_dir) / ModelDir.TOKENIZER_CONFIG
    if not path.is_file():
        return None
    template = read_json(path, what="the tokenizer config").get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def load_chat_template(model_dir: str | Path) -> ChatTemplate | JinjaChatTemplate:
    """The chat template a model directory is used with: moekit's chat_template.json, else
    the Jinja template of tokenizer_config.json, else moekit's default."""
    if (Path(model_dir) / TEMPLATE_FILE).is_file():
        return ChatTemplate.load(model_dir)
    source = hf_chat_template(model_dir)
    if source is None:
        return ChatTemplate()
    from moekit.data.tokenizer import Tokenizer

    tok = Tokenizer.load(model_dir)
    template = JinjaChatTemplate(source, bos_token=tok.bos_token, eos_token=tok.eos_token)
    template.format([{"role": "user", "content": "probe"}])  # fails early, naming the problem
    return template
