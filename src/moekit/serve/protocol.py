"""OpenAI-compatible request bodies and the errors the API returns.

Requests are validated here into plain values the app can act on; anything wrong becomes an
`APIError` with the OpenAI error shape: {"error": {"message", "type", "param", "code"}}.

- Types are strict, as JSON types: `true` is not a number and `"5"` is not an integer.
- An explicit `null` for an optional field means its default, as in the OpenAI API.
- Unknown fields are accepted and ignored (vLLM does the same; clients and evaluation tools
  send extras), but known fields that would change the output and that moekit does not
  implement (`logit_bias`, penalties, `suffix`, `best_of`, ...)
  are refused with a 400 naming the field rather than silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from moekit.infer.sampling import MAX_SEED

# OpenAI documents up to 4 stop sequences; lm-evaluation-harness and similar tools send more
# (one per answer delimiter of a task), and vLLM sets no limit. 16 covers them. Their length is
# bounded too: the engine holds back and searches text as long as the longest of them after
# every token. Real stop strings are delimiters ("\n\n", "Question:", "</answer>").
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 512  # per stop string
MAX_STOP_TOTAL_CHARS = 2048  # all of a request's stop strings together


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def check_text(value: str) -> str:
    """Refuse text that is not valid Unicode: JSON can carry a lone UTF-16 surrogate
    ("\\ud800"), which no tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            "contains a lone UTF-16 surrogate, which is not valid Unicode text"
        ) from None
    return value


Text = Annotated[str, AfterValidator(check_text)]


def _empty(v: Any) -> bool:
    return not v


def _none(v: Any) -> bool:
    return v is None


class _Body(BaseModel):
    """Strict JSON types; `null` for a field that has a default means that default."""

    model_config = ConfigDict(strict=True, extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            k: v
            for k, v in data.items()
            if not (v is None and k in fields and not fields[k].is_required())
        }


class MoekitOptions(_Body):
    """The `moekit` extension object: `routing` returns each token's experts and weights per
    MoE layer; `top_k` routes every token to that many experts (within what the model allows);
    `return_routed_experts` and `routed_experts` record and replay a routing."""

    model_config = ConfigDict(strict=True, extra="forbid")
    routing: bool = False
    top_k: int | None = Field(default=None, ge=1)
    # Routing replay (serve/replay.py): return the experts every token went to, in compact
    # form; force a routing recorded so (checked against the model at admission).
    return_routed_experts: bool = False
    routed_experts: Any = None  # checked by moekit.infer.routing_replay.decode_routing


class StreamOptions(_Body):
    include_usage: bool = False


# The fields that constrain the output (moekit.serve.structured).
STRUCTURED_FIELDS = (
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
)


class _Common(_Body):
    # Fields that change the output and that this server does not implement: refused unless
    # the value is harmless (the check returns True). Other unknown fields are ignored.
    refused: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "logit_bias": _empty,
        "functions": _empty,  # the API's old name for tools
        "function_call": lambda v: v in (None, "none"),
        "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
        "modalities": lambda v: v in (None, ["text"]),
        "audio": _none,
        "min_tokens": lambda v: v in (None, 0),
        "use_beam_search": lambda v: v in (None, False),
        "include_stop_str_in_output": lambda v: v in (None, False),
        "truncate_prompt_tokens": _none,
        "prompt_logprobs": _none,
        "logits_processors": _empty,
        "guided_json": _none,
        "guided_regex": _none,
        "guided_choice": _none,
        "guided_grammar": _none,
        "structured_outputs": _none,
    }
    # Structured output's fields are implemented: moekit.serve.structured reads them.
    refused = {k: v for k, v in refused.items() if k not in STRUCTURED_FIELDS}

    model: Text
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stop: Text | list[Text] | None = Field(default=None, validate_default=True)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Sampling controls beyond OpenAI's (the names vLLM uses).
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, lt=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    ignore_eos: bool = False
    stop_token_ids: list[int] = Field(default_factory=list)
    moekit: MoekitOptions = Field(default_factory=MoekitOptions)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        longest = max((len(s) for s in stops), default=0)
        if longest > MAX_STOP_CHARS:
            raise ValueError(
                f"a stop sequence may be at most {MAX_STOP_CHARS} characters long "
                f"(one has {longest})"
            )
        total = sum(len(s) for s in stops)
        if total > MAX_STOP_TOTAL_CHARS:
            raise ValueError(
                f"the stop sequences may have at most {MAX_STOP_TOTAL_CHARS} characters "
                f"together (these have {total})"
            )
        return stops

    @field_validator("seed")
    @classmethod
    def _seed_per_choice(cls, v: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if v is not None and v + n - 1 > MAX_SEED:
            raise ValueError(
                f"choice i samples with seed + i, so seed + n - 1 must be at most {MAX_SEED}"
            )
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, v: float) -> float:
        if v != 0.0:
            raise ValueError("is not supported by this server; use repetition_penalty")
        return v


class CompletionRequest(_Common):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    max_tokens: int = 16
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    suffix: Text | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("must not be empty")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> None:
        if v:
            raise ValueError("is not supported by this server")
        return None

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v: int | None) -> None:
        if v not in (None, 1):
            raise ValueError("is not supported by this server")
        return None


class FunctionCall(_Body):
    name: Text
    arguments: Text  # a JSON object, as text


class ToolCallIn(_Body):
    """A call an earlier assistant message made (sent back in the conversation)."""

    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant messages
    tool_call_id: Text | None = None  # tool messages: the call they answer
    name: Text | None = None

    @model_validator(mode="after")
    def _shape(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry 'tool_calls'")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the 'tool_call_id' of the call it answers")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs 'content'")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, "only text content parts are supported", param="messages")
            try:
                parts.append(check_text(part["text"]))
            except ValueError as e:
                raise APIError(
                    400, f"invalid value for 'messages': {e}", param="messages"
                ) from None
        return "".join(parts)


FUNCTION_NAME = r"^[A-Za-z0-9_.-]{1,64}$"


class FunctionDef(_Body):
    name: str = Field(pattern=FUNCTION_NAME)
    description: Text | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class ToolDef(_Body):
    type: Literal["function"]
    function: FunctionDef


class ChosenFunction(_Body):
    name: Text


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: ChosenFunction


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolDef] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v and not info.data.get("logprobs"):
            raise ValueError("needs 'logprobs': true")
        return v


def parse(model: type[_Common], data: Any) -> Any:
    """Validate a decoded JSON body, turning the first problem into a 400 APIError."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name, harmless in model.refused.items():
        if name in data and not harmless(data[name]):
            raise APIError(
                400,
                f"{name!r} is not supported by this server (moekit would have to ignore it, "
                "which would change the output silently)",
                param=name,
                code="unsupported_parameter",
            )
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(p) for p in err["loc"]]
        # Name the request field (and the field inside the `moekit` / `stream_options` objects);
        # the rest of pydantic's location names union members and list indices.
        param = loc[0] if loc else None
        if param in ("moekit", "stream_options") and len(loc) > 1:
            param = f"{param}.{loc[1]}"
        if err["type"] == "missing":
            message = f"missing required parameter {param!r}"
        else:
            message = f"invalid value for {param!r}: {err['msg']}"
        raise APIError(400, message, param=param, code="invalid_value") from None
