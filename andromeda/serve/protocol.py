"""The OpenAI API's request and response shapes, as the server reads and writes them.

- `CompletionRequest`, `ChatRequest`: pydantic models of the request bodies (unknown fields
  are refused only where accepting them would silently change the answer: `echo`, `suffix`,
  `logit_bias`, `best_of`, `tools`, `response_format`); `top_k`, `min_p`,
  `repetition_penalty` and `ignore_eos` are extra fields, as vLLM accepts them.
- `ApiError(status, message, param, code)`: an error to return as OpenAI's error body.
- `error_body`, `completion_logprobs`, `chat_logprobs`, `usage`: pieces of the responses.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               405: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: StrictInt = Field(1, ge=1)
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    seed: Optional[StrictInt] = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    user: Optional[StrictStr] = None  # informational only, as in OpenAI's API
    # Extra fields (vLLM's names).
    top_k: Optional[StrictInt] = Field(None, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: StrictBool = False  # generate up to max_tokens even past end-of-sequence (benchmarks)

    REFUSED: ClassVar[tuple] = ("logit_bias", "tools", "tool_choice", "functions", "response_format", "suffix")

    def refuse_unsupported(self) -> None:
        for name in self.REFUSED:
            value = (self.model_extra or {}).get(name)
            if value not in (None, {}, [], "", "none", "auto"):
                raise ApiError(400, f"'{name}' is not supported by this server", param=name,
                               code="unsupported_parameter")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if any(not s for s in stops):
            raise ApiError(400, "stop strings must not be empty", param="stop")
        if len(stops) > 4:
            raise ApiError(400, f"at most 4 stop strings, got {len(stops)}", param="stop")
        return stops


class CompletionRequest(_Sampling):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)
    echo: StrictBool = False
    best_of: Optional[StrictInt] = None

    def prompts(self) -> list:
        """Each prompt of the request: a string or a list of token ids."""
        if self.echo:
            raise ApiError(400, "'echo' is not supported by this server", param="echo", code="unsupported_parameter")
        if self.best_of not in (None, self.n):
            raise ApiError(400, "'best_of' other than n is not supported", param="best_of",
                           code="unsupported_parameter")
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise ApiError(400, "the prompt is empty", param="prompt")
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: StrictStr
    content: Union[StrictStr, list[dict], None] = None

    def text(self, i: int) -> str:
        if isinstance(self.content, str):
            return self.content
        if self.content is None:
            raise ApiError(400, f"messages[{i}] has no content", param=f"messages[{i}].content")
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}]: only text content parts are supported",
                               param=f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: StrictBool = False
    top_logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)

    def token_limit(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprob_count(self) -> Optional[int]:
        if not self.logprobs:
            if self.top_logprobs:
                raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            return None
        return self.top_logprobs or 0


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tokenizer, entries: list[tuple[int, Any]], offset: int = 0) -> dict:
    """The completions API's logprobs object for (token_id, (logprob, top)) entries."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, (lp, top) in entries:
        text = tokenizer.decode([token])
        out["tokens"].append(text)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append({tokenizer.decode([t]): v for t, v in top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(tokenizer, entries: list[tuple[int, Any]]) -> dict:
    """The chat API's logprobs object: {"content": [{token, logprob, bytes, top_logprobs}]}."""

    def item(token: int, lp: float) -> dict:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [dict(item(t, lp), top_logprobs=[item(u, v) for u, v in top]) for t, (lp, top) in entries]}
