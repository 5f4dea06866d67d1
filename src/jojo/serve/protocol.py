"""The OpenAI wire format: request bodies (validated), errors, and the response and stream-chunk objects.

Requests are parsed strictly (a string where a number belongs is a 400, not a silent conversion), in OpenAI's
field names: `max_tokens` or `max_completion_tokens` (the newer name wins), `temperature`, `top_p`, `n`, `seed`,
`stop` (a string or up to 4), `stream`, `stream_options.include_usage`; `top_k` and `repetition_penalty` are
extensions (vLLM and llama.cpp accept the same names), and so is `ignore_eos` (vLLM's: generate exactly
`max_tokens` tokens, for benchmarks). Parameters the engine cannot honour (`logprobs`, tools,
`logit_bias`, non-zero frequency/presence penalties, `echo`, `suffix`, `best_of` > 1, a non-text
`response_format`) are refused with a 400 naming them, rather than silently ignored. Other unknown fields are
ignored, as OpenAI-compatible servers commonly do.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class APIError(Exception):
    """An error answered as OpenAI's JSON: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields common to both endpoints."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    ignore_eos: bool = False  # an extension (vLLM's name): keep going past <|endoftext|>/<|im_end|> (benchmarks)
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # accepted for compatibility when they ask for nothing the engine would have to do
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, Any] | None = None

    @field_validator(
        "temperature",
        "top_p",
        "top_k",
        "repetition_penalty",
        "ignore_eos",
        "n",
        "stream",
        "frequency_penalty",
        "presence_penalty",
        mode="before",
    )
    @classmethod
    def _null_means_default(cls, value, info):
        # many clients send "temperature": null for "not set"; OpenAI takes it as the default
        return cls.model_fields[info.field_name].default if value is None else value

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for a parameter set to something this server does not do, else None."""
        if self.frequency_penalty or self.presence_penalty:
            param = "frequency_penalty" if self.frequency_penalty else "presence_penalty"
            return param, f"{param} is not supported; use repetition_penalty (> 1 discourages repeats)"
        if self.logprobs or self.top_logprobs:
            return "logprobs", "logprobs are not supported by this server"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported by this server"
        return None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if len(stops) > 4:
            raise APIError(400, "stop takes at most 4 sequences", param="stop")
        return [s for s in stops if s]

    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.tools:
            return "tools", "tools (function calling) are not supported by this server"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format", "only the text response_format is supported"
        return super().unsupported()

    def chat_messages(self) -> list[dict]:
        # "developer" is OpenAI's newer name for the system role
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.echo:
            return "echo", "echo is not supported by this server"
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported by this server"
        if self.best_of not in (None, 1):
            return "best_of", "best_of is not supported by this server; use n"
        return super().unsupported()

    def prompts(self) -> list[str]:
        if isinstance(self.prompt, str):
            return [self.prompt]
        if not self.prompt:
            raise APIError(400, "prompt is an empty list", param="prompt")
        return list(self.prompt)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "literal"}


def parse(model: type[BaseModel], data: Any):
    """Validate a decoded JSON body; a bad one raises APIError 400 naming the first offending field."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        req = model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        # pydantic names the member of a union it tried (`prompt.str`, `stop.list[str]`): keep the field path only
        loc = ".".join(str(p) for p in err["loc"] if isinstance(p, int) or p.isidentifier() and p not in _TYPE_TAGS)
        raise APIError(400, f"invalid '{loc}': {err['msg']}", param=loc or None) from None
    bad = req.unsupported()
    if bad:
        raise APIError(400, bad[1], param=bad[0])
    return req


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
