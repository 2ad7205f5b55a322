"""OpenAI-compatible request bodies and the errors the API returns.

Requests are validated here into plain values the app can act on; anything wrong becomes an
`APIError` with the OpenAI error shape: {"error": {"message", "type", "param", "code"}}.
Unknown fields are accepted and ignored, as the OpenAI API does; fields moekit cannot honour
(penalties it does not implement, `suffix`, `best_of`) are refused rather than ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


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


class MoekitOptions(BaseModel):
    """The `moekit` extension object: `routing` returns each token's experts and weights per
    MoE layer; `top_k` routes every token to that many experts (within what the model allows)."""

    model_config = ConfigDict(extra="forbid")
    routing: bool = False
    top_k: int | None = Field(default=None, ge=1)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Sampling controls beyond OpenAI's (the names vLLM uses).
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, lt=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    ignore_eos: bool = False
    moekit: MoekitOptions = Field(default_factory=MoekitOptions)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, v: float) -> float:
        if v != 0.0:
            raise ValueError("is not supported by this server; use repetition_penalty")
        return v


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    suffix: str | None = None
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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, "only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=5)


def parse(model: type[BaseModel], data: Any) -> Any:
    """Validate a decoded JSON body, turning the first problem into a 400 APIError."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
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
