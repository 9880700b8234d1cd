"""The OpenAI request bodies this server accepts, and OpenAI-style errors.

Parameters are checked, not silently ignored: one this server does not implement is refused with
400 and its name, so a benchmark never measures something other than what it asked for. Accepted
beyond OpenAI's: vLLM's `ignore_eos`, `min_tokens` and `return_token_ids` (which benchmark clients
send), and `session_id` (which conversation a request continues; also the `X-Session-ID` header).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SESSION_HEADER = "x-session-id"
MAX_STOP = 4


class ApiError(Exception):
    """An error answered as OpenAI answers them: {"error": {message, type, param, code}} with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def kind(self) -> str:
        return {400: "invalid_request_error", 404: "not_found_error", 503: "service_unavailable"}.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    seed: int | None = None
    n: Literal[1] = 1
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0
    user: str | None = None  # who the end user is; not which conversation
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    return_token_ids: bool = False
    session_id: str | None = Field(default=None, min_length=1, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
        return stops


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens
    logprobs: Literal[False] | None = None

    @model_validator(mode="after")
    def _one_limit(self) -> ChatRequest:
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self

    def chat(self) -> list[dict[str, str]]:
        """The messages as chat templates take them (a developer message is a system message)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: Literal[False] = False
    suffix: None = None
    best_of: Literal[1] | None = None
    logprobs: None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        """One prompt per request: a list of strings or of id lists must hold exactly one."""
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            if len(value) != 1:
                raise ValueError(f"one prompt per request (n=1), got a batch of {len(value)}")
            return value[0]
        if isinstance(value, list) and not value:
            raise ValueError("the prompt is empty")
        return value


def parse(model: type[BaseModel], body: object) -> BaseModel:
    """`body` as `model`, or ApiError(400) naming the first offending parameter."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(part) for part in error["loc"] if not str(part).startswith(("function-", "list[")))
        if error["type"] == "extra_forbidden":
            message = (f"unsupported parameter {param!r}: this server does not implement it (see pensieve serve "
                       "--help for what is accepted)")
            raise ApiError(400, message, param, "unsupported_parameter") from None
        if error["type"] == "missing":
            raise ApiError(400, f"missing required parameter {param!r}", param, "missing_required_parameter") from None
        if error["type"] == "literal_error" and param in {"n", "presence_penalty", "frequency_penalty", "echo",
                                                            "best_of", "logprobs", "suffix"}:
            message = f"unsupported value for {param!r}: {error['msg'].lower()}; other values are not implemented"
            raise ApiError(400, message, param, "unsupported_value") from None
        raise ApiError(400, f"{param}: {error['msg']}", param or None, "invalid_value") from None
