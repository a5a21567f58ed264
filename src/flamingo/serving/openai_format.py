"""OpenAI's request and response formats, mapped onto Flamingo prompts and engine requests.

Chat messages become the paper's dialogue prompt (B.1.6, as `flamingo chat` builds it):

    <preamble>User: <image>What is this?\nFlamingo: A cat.<|endofchunk|>\nUser: And this?\nFlamingo:

or, for a model of another family, its own chat format (`MediaFamily.chat_text`: Llama 3.2
Vision's chat template).

Completions take the paper's interleaved prompt as it is: `<image>` where each image of the
`images` list (an extension field) goes. Numeric fields are validated by pydantic; content parts,
stop strings and the server's caps are checked here, each error naming its field.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Literal, Sequence

import anyio
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from flamingo.inference.family import dialogue_text
from flamingo.model.families import MEDIA
from flamingo.model.families import ChatMessage as FamilyMessage
from flamingo.serving.engine import Delta, SamplingParams
from flamingo.serving.input_processor import Fields, InputProcessor, ProcessedPrompt
from flamingo.serving.limits import RequestError, ServerSettings
from flamingo.serving.media import MediaResolver

MAX_STOP_CHARS = 128
MAX_CANDIDATE_CHARS = 1000
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Request(BaseModel):
    # Clients send fields we do not use (user, logprobs, frequency_penalty, ...): ignored, as OpenAI-compatible
    # servers do; every field we use is validated.
    model_config = ConfigDict(extra="ignore")
    model: str | None = None


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class SamplingFields(_Request):
    max_tokens: StrictInt | None = Field(None, ge=1)
    # strict, as OpenAI's: numbers only (1 and 1.0 alike), no "0.5" strings or booleans
    temperature: float | None = Field(None, ge=0, le=2, strict=True)  # 0 or absent: greedy
    top_p: float | None = Field(None, gt=0, le=1, strict=True)
    n: StrictInt = Field(1, ge=1)
    stop: Any = None  # a string or a list of strings (checked below)
    seed: StrictInt | None = Field(None, ge=0, lt=1 << 63)
    num_beams: StrictInt = Field(1, ge=1, description="beam search width (extension; the paper uses 3)")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Any = None  # a string or a list of content parts (checked below)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)


class CompletionRequest(SamplingFields):
    prompt: Any  # a string (or a list holding one string)
    images: list[str] = Field(default_factory=list, description="one image URL per <image> (extension)")


class RankRequest(_Request):
    prompt: str
    images: list[str] = Field(default_factory=list)
    candidates: list[str] = Field(min_length=1)


@dataclass
class PromptSpec:
    """A prompt before its images are loaded: text with one media token per image URL."""

    text: str
    image_urls: list[tuple[str, str]] = field(default_factory=list)  # (url, the field it came from)


# ------------------------------------------------------------------------------------ requests
def check_unicode(body: BaseModel) -> None:
    """Refuse a request with a lone UTF-16 surrogate ("\\ud800", which JSON allows) in any string it
    carries: no tokenizer or UTF-8 encoder takes one. The error names the first such field."""
    param = _lone_surrogate(body, "body")
    if param is not None:
        raise RequestError(f"{param}: the text contains a lone UTF-16 surrogate (half of a character pair, "
                           f"e.g. \\ud800); send valid Unicode", param)


def _lone_surrogate(value: Any, path: str) -> str | None:
    """The path of the first string under `value` (a request model, a list, a dict) that is not
    valid Unicode, or None. Paths are written as in every error: messages[0].content[1].text."""
    if isinstance(value, str):
        return path if _SURROGATE.search(value) else None
    if isinstance(value, BaseModel):
        children = [(name, getattr(value, name)) for name in type(value).model_fields]
    elif isinstance(value, dict):
        children = list(value.items())
    elif isinstance(value, list):
        children = list(enumerate(value))
    else:
        return None
    for key, child in children:
        where = f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path != "body" else str(key))
        found = _lone_surrogate(child, where)
        if found is not None:
            return found
    return None


def sampling_params(body: SamplingFields, settings: ServerSettings, extra_stop: tuple[str, ...] = ()) -> SamplingParams:
    max_tokens_field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
    max_tokens = getattr(body, max_tokens_field) or settings.default_max_tokens
    if max_tokens > settings.max_tokens:
        raise RequestError(f"{max_tokens_field}: {max_tokens} is more than this server's limit of "
                           f"{settings.max_tokens}", max_tokens_field)
    if body.n > settings.max_n:
        raise RequestError(f"n: {body.n} is more than this server's limit of {settings.max_n}", "n")
    if body.num_beams > settings.max_beams:
        raise RequestError(f"num_beams: {body.num_beams} is more than this server's limit of {settings.max_beams}",
                           "num_beams")
    temperature = body.temperature or 0.0
    if body.num_beams > 1:
        if temperature > 0:
            raise RequestError("temperature: beam search (num_beams > 1) is deterministic; use temperature 0",
                               "temperature")
        if body.n > body.num_beams:
            raise RequestError(f"n: beam search returns at most num_beams={body.num_beams} choices, got "
                               f"n={body.n}", "n")
    return SamplingParams(max_tokens=max_tokens, temperature=temperature,
                          top_p=1.0 if body.top_p is None else body.top_p, n=body.n,
                          stop=_stop_strings(body.stop, settings) + extra_stop, seed=body.seed,
                          num_beams=body.num_beams)


def _stop_strings(stop: Any, settings: ServerSettings) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise RequestError(f"stop: expected a string or a list of strings of 1 to {MAX_STOP_CHARS} characters",
                           "stop")
    if len(stops) > settings.max_stop:
        raise RequestError(f"stop: {len(stops)} stop strings, more than the limit of {settings.max_stop}", "stop")
    return tuple(stops)


def special_tokens(tokenizer: Any, media_token: str, end_of_chunk: str) -> tuple[str, ...]:
    """Every special token of the model's tokenizer (BOS/EOS such as <|endoftext|>, the media and
    end-of-chunk tokens, any other added special token), longest first: typed in user text, the
    tokenizer would read each as the control token, so user text may contain none of them."""
    added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special]
    tokens = {t for t in [*tokenizer.all_special_tokens, *added, media_token, end_of_chunk] if t}
    return tuple(sorted(tokens, key=lambda t: (-len(t), t)))


def _check_text(text: str, param: str, special: tuple[str, ...]) -> str:
    for token in special:
        if token in text:
            raise RequestError(f"{param}: the text contains {token!r}, a special token of the model's tokenizer, "
                               f"which user text may not contain (send images as image_url parts)", param)
    return text


def chat_prompt(messages: list[ChatMessage], media_token: str, end_of_chunk: str,
                special: tuple[str, ...] = (),
                render: Callable[[Sequence[FamilyMessage]], str] | None = None) -> PromptSpec:
    """The prompt of a conversation: by `render` (the model family's `chat_text`), by default the
    paper's dialogue prompt; images go where their parts are, in user messages. No text may
    contain a special token (`special`, and always the media and end-of-chunk tokens)."""
    special = (*special, media_token, end_of_chunk)
    chat, urls = [], []
    for i, message in enumerate(messages):
        param = f"messages[{i}].content"
        if message.role in ("system", "developer"):
            if any(m.role != "system" for m in chat):
                raise RequestError(f"messages[{i}].role: system messages must come before the conversation",
                                   f"messages[{i}].role")
            chat.append(FamilyMessage("system", [_check_text(_text_only(message.content, param), param, special)]))
        elif message.role == "assistant":
            chat.append(FamilyMessage("assistant", [_check_text(_text_only(message.content, param), param, special)]))
        else:
            chat.append(FamilyMessage("user", _user_content(message.content, param, special, urls)))
    if messages[-1].role != "user":
        raise RequestError(f"messages[{len(messages) - 1}].role: the last message must be the user's, got "
                           f"{messages[-1].role!r}", f"messages[{len(messages) - 1}].role")
    text = render(chat) if render is not None else dialogue_text(chat, media_token, end_of_chunk)
    return PromptSpec(text, urls)


def _text_only(content: Any, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(_part_text(p, f"{param}[{j}]") for j, p in enumerate(content))
    raise RequestError(f"{param}: system and assistant messages take text only (a string or text parts)", param)


def _part_text(part: dict, param: str) -> str:
    text = part.get("text")
    if not isinstance(text, str):
        raise RequestError(f"{param}.text: expected a string", f"{param}.text")
    return text


def _user_content(content: Any, param: str, special: tuple[str, ...], urls: list[tuple[str, str]]) -> list[Any]:
    """A user message's text pieces and `MEDIA` markers (one per image, its URL added to `urls`)."""
    if isinstance(content, str):
        return [_check_text(content, param, special)]
    if not isinstance(content, list) or not content:
        raise RequestError(f"{param}: expected a string or a non-empty list of content parts", param)
    pieces = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            pieces.append(_check_text(_part_text(part, where), f"{where}.text", special))
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise RequestError(f"{where}.image_url.url: expected a URL string", f"{where}.image_url.url")
            urls.append((url, f"{where}.image_url.url"))
            pieces.append(MEDIA)
        else:
            raise RequestError(f"{where}.type: expected 'text' or 'image_url' parts", f"{where}.type")
    return pieces


def completion_prompt(body: CompletionRequest | RankRequest, media_token: str, end_of_chunk: str,
                      special: tuple[str, ...] = ()) -> PromptSpec:
    """The interleaved prompt: `<image>` (or the model's own media token) where each image goes and
    <|endofchunk|> after each example, the paper's format; no other special token (`special`)."""
    prompt = body.prompt
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("prompt: expected a non-empty string (one prompt per request)", "prompt")
    _check_text(prompt, "prompt", tuple(t for t in special if t not in ("<image>", media_token, end_of_chunk)))
    text = prompt.replace("<image>", media_token)  # placeholders vs images: checked at the engine's door
    return PromptSpec(text, [(url, f"images[{i}]") for i, url in enumerate(body.images)])


async def prepare_prompt(processor: InputProcessor, resolver: MediaResolver, settings: ServerSettings,
                         spec: PromptSpec, fields: Fields, max_new_tokens: int, prompt_cap: int | None
                         ) -> ProcessedPrompt:
    """A prompt through the engine's door (`InputProcessor`): cheap checks first (image count, then
    tokenized once: placeholders, length up to `prompt_cap`, with `max_new_tokens` more the
    context), then the images loaded and each decoded once (off the event loop)."""
    if len(spec.image_urls) > settings.max_images:
        raise RequestError(f"{fields.images}: {len(spec.image_urls)} images, more than the limit of "
                           f"{settings.max_images} per request", fields.images, code="too_many_images")
    ids = processor.tokenize(spec.text, len(spec.image_urls), max_new_tokens, fields, prompt_cap)
    images = [await resolver.load(url, where) for url, where in spec.image_urls]
    return await anyio.to_thread.run_sync(processor.process, ids, images, fields, settings.max_image_pixels)


def check_candidates(candidates: list[str], settings: ServerSettings, special: tuple[str, ...]) -> None:
    if len(candidates) > settings.max_candidates:
        raise RequestError(f"candidates: {len(candidates)} candidates, more than the limit of "
                           f"{settings.max_candidates}", "candidates")
    for i, candidate in enumerate(candidates):
        if not candidate or len(candidate) > MAX_CANDIDATE_CHARS:
            raise RequestError(f"candidates[{i}]: expected 1 to {MAX_CANDIDATE_CHARS} characters", f"candidates[{i}]")
        _check_text(candidate, f"candidates[{i}]", special)


def field_path(loc: tuple) -> str | None:
    """A pydantic error location ('body', 'messages', 0, 'role') as a field path: messages[0].role."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or None


def invalid_field(error: dict) -> RequestError:
    """The refusal of a request that failed validation, from pydantic's first error."""
    param = field_path(tuple(error.get("loc", ())))
    return RequestError(f"{param or 'request body'}: {error.get('msg', 'invalid')}", param or "body")


# ----------------------------------------------------------------------------------- responses
async def collect_choices(deltas: AsyncIterator[Delta], n: int) -> tuple[list[str], list[str], dict[str, int]]:
    """The `n` choices of a request's deltas, whole: their texts, finish reasons, and the usage."""
    texts, reasons = [""] * n, ["length"] * n
    prompt_tokens = completion_tokens = 0
    async for delta in deltas:
        texts[delta.index] += delta.text
        if delta.finish_reason is not None:
            reasons[delta.index] = delta.finish_reason
            prompt_tokens = delta.prompt_tokens
            completion_tokens += delta.completion_tokens
    return texts, reasons, usage(prompt_tokens, completion_tokens)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
