"""The engine's door: a request's prompt is tokenized once and each of its images decoded once,
here, and every limit on them (placeholders vs images, prompt tokens, the model's context) is
checked here, before the request waits in the queue. What goes down to the scheduler and the
model runner is a `ProcessedPrompt`: token ids, decoded images (preprocessed on the engine thread),
and where the prompt may be cut for the prefix cache.

Two steps, so that the server checks the cheap limits before it fetches any image:
`tokenize` (text -> ids, with the limits) then `process` (ids + image bytes -> the processed
prompt); `prompt` runs both.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable

from PIL import Image

from flamingo.inference.family import family_io
from flamingo.inference.generation import GenerationConfig
from flamingo.inference.prompt import context_length
from flamingo.model.flamingo import Flamingo
from flamingo.model.image_processing import DEFAULT_MAX_PIXELS, ImageProcessingError, decode_image
from flamingo.serving.limits import RequestError

MIN_TEXT_PREFIX_TOKENS = 32  # a prefix without images is cached only from this length on
# A prompt this many times longer in characters than the token cap is refused before tokenizing it.
MAX_CHARS_PER_TOKEN = 32


class EngineRequestError(RequestError):
    """A request the engine cannot run: the message starts with the field it names (`param`)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 -> greedy
    top_p: float = 1.0
    n: int = 1  # independent samples (choices)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    num_beams: int = 1  # > 1: beam search (extension field); n <= num_beams

    def __post_init__(self) -> None:
        def check(ok: bool, param: str, message: str) -> None:
            if not ok:
                raise EngineRequestError(f"{param}: {message}", param)

        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        check(is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens",
              f"expected an integer >= 1, got {self.max_tokens!r}")
        check(isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 100, "temperature",
              f"expected a number in [0, 100], got {self.temperature!r}")
        check(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "top_p",
              f"expected a number in (0, 1], got {self.top_p!r}")
        check(is_int(self.n) and self.n >= 1, "n", f"expected an integer >= 1, got {self.n!r}")
        check(is_int(self.num_beams) and self.num_beams >= 1, "num_beams",
              f"expected an integer >= 1, got {self.num_beams!r}")
        check(self.seed is None or is_int(self.seed), "seed", f"expected an integer, got {self.seed!r}")
        check(isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop), "stop",
              "expected a tuple of non-empty strings")
        if self.num_beams > 1:
            check(self.n <= self.num_beams, "n", f"expected at most num_beams ({self.num_beams}) with beam search, "
                  f"got {self.n}")
            check(self.temperature == 0, "temperature", "beam search is deterministic; use temperature 0 with "
                  "num_beams > 1")

    def generation_config(self, choice: int = 0) -> GenerationConfig:
        """The decoding options of one choice; choice i of a seeded request draws with seed + i."""
        sample = self.temperature > 0
        return GenerationConfig(max_new_tokens=self.max_tokens, num_beams=self.num_beams, do_sample=sample,
                                temperature=self.temperature if sample else 1.0, top_p=self.top_p,
                                seed=None if self.seed is None else self.seed + choice, stop_strings=self.stop)


@dataclass(frozen=True)
class Fields:
    """The request fields that errors name: the engine's own, or the HTTP API's."""

    prompt: str = "text"
    images: str = "images"
    image_names: tuple[str, ...] = ()  # one per image (default: images[i])
    new_tokens: str = "max_tokens"  # what asks for tokens after the prompt ("candidates" for a ranking)

    def image(self, i: int) -> str:
        return self.image_names[i] if i < len(self.image_names) else f"{self.images}[{i}]"


def prefix_key(ids: list[int], digests: list[bytes]) -> str:
    """The prefix cache's key of a prompt prefix: its token ids and its images' bytes (hashed)."""
    digest = hashlib.sha256(repr(ids).encode())
    for image in digests:
        digest.update(image)
    return digest.hexdigest()


@dataclass
class ProcessedPrompt:
    """A prompt ready to run: its token ids (`<image>` tokens included), and per image its bytes'
    digest and the decoded image. `pixels` preprocesses images when the engine thread encodes them
    (`MediaFamily.preprocess`: [T, 3, H, W] for our own models, tiles and aspect ratios for Llama
    3.2 Vision): torch work on the request's thread would start a second OpenMP team beside the
    engine thread's, which throttles it (serve_throughput: 5.0x -> 3.6x). The images before `split`
    (the cut the prefix cache keeps the state at, a token position, or None) are left undecoded
    (None) when that prefix was cached at the door, as are images in the image cache; `pixels` decodes
    them if they must be encoded after all."""

    ids: list[int]
    cuts: list[int]  # token positions where the prompt may be cut (before an image, after <|endofchunk|>)
    images: list[bytes]
    digests: list[bytes]
    split: int | None
    media_before: list[int]  # images before each token position (len(ids) + 1 entries)
    decode: Callable[[int], Any] = field(repr=False)
    preprocess: Callable[[Any], Any] = field(repr=False)
    decoded: list[Any] = field(default_factory=list, repr=False)  # PIL images; None: not decoded yet
    chat: bool = False  # a chat's: its prefix goes to the prefix cache's chat budget

    def key(self, cut: int) -> str:
        """The prefix cache's key of the prompt up to token position `cut`."""
        return prefix_key(self.ids[:cut], self.digests[:self.media_before[cut]])

    def pixels(self, start: int, stop: int) -> list[Any]:
        """The pixels of the images between token positions `start` and `stop`."""
        return [self.image(i) for i in range(self.media_before[start], self.media_before[stop])]

    def image(self, i: int) -> Any:
        """The pixels of image `i`."""
        if self.decoded[i] is None:  # cached at the door (its prefix, or the image itself), evicted since
            self.decoded[i] = self.decode(i)
        return self.preprocess(self.decoded[i])


class InputProcessor:
    """Tokenizes, decodes and checks requests for one model (`Engine.processor`)."""

    def __init__(self, model: Flamingo, max_prompt_tokens: int | None, cache_prefixes: bool,
                 is_cached: Callable[[str], bool], image_is_cached: Callable[[bytes], bool] = lambda digest: False
                 ) -> None:
        self.model, self.max_prompt_tokens = model, max_prompt_tokens
        self.cache_prefixes, self.is_cached, self.image_is_cached = cache_prefixes, is_cached, image_is_cached
        self.context = context_length(model)
        self.media_id, self.end_id = model.media_token_id, model.eoc_token_id
        self.family = family_io(model)
        # Under "group" attention consecutive images form one group: never cut between them. Where text
        # before the first image sees every image of its prompt (zero_attention_without_media off), a
        # prompt that starts with text has no prefix that other prompts could share.
        xattn = model.config.cross_attention
        self.cut_in_groups, self.leading_text_sees_all = xattn.media_attention != "group", \
            not xattn.zero_attention_without_media

    def prompt(self, text: str, images: list[bytes], max_new_tokens: int, fields: Fields = Fields()
               ) -> ProcessedPrompt:
        """`tokenize` then `process`."""
        return self.process(self.tokenize(text, len(images), max_new_tokens, fields), images, fields)

    def tokenize(self, text: str, num_images: int, max_new_tokens: int, fields: Fields = Fields(),
                 prompt_cap: int | None = None) -> list[int]:
        """The prompt's token ids, once its placeholders match `num_images` and it fits the limits:
        `prompt_cap` and the engine's max_prompt_tokens, and with `max_new_tokens` more the
        model's context. A prompt far longer in characters than the cap is refused untokenized."""
        if not isinstance(text, str) or not text:
            raise EngineRequestError(f"{fields.prompt}: expected a non-empty prompt", fields.prompt)
        token = self.model.config.media_token
        placeholders = text.count(token)
        if placeholders != num_images:
            raise EngineRequestError(f"{fields.images}: the prompt has {placeholders} {token} placeholder(s) but "
                                     f"{num_images} image(s) were given; put one {token} where each image goes",
                                     fields.images)
        caps = [c for c in (prompt_cap, self.max_prompt_tokens, self.context) if c is not None]
        cap = min(caps) if caps else None
        if cap is not None and len(text) > cap * MAX_CHARS_PER_TOKEN:
            raise EngineRequestError(f"{fields.prompt}: the prompt has {len(text)} characters, far more than the "
                                     f"limit of {cap} tokens", fields.prompt, code="context_length_exceeded")
        ids = self.family.tokenize(self.model, text, True)
        if cap is not None and len(ids) > cap:
            raise EngineRequestError(f"{fields.prompt}: the prompt has {len(ids)} tokens, more than the limit of "
                                     f"{cap}", fields.prompt, code="context_length_exceeded")
        if self.context is not None and len(ids) + max_new_tokens > self.context:
            what = "the longest candidate has" if fields.new_tokens == "candidates" else f"{fields.new_tokens} is"
            raise EngineRequestError(f"{fields.new_tokens}: the prompt has {len(ids)} tokens and {what} "
                                     f"{max_new_tokens}, {len(ids) + max_new_tokens} in all, more than the model's "
                                     f"context of {self.context} tokens", fields.new_tokens,
                                     code="context_length_exceeded")
        return ids

    def candidates(self, candidates: list[str]) -> list[int]:
        """A ranking's candidates, tokenized once: their lengths in tokens (at least one each)."""
        if not isinstance(candidates, list) or not candidates:
            raise EngineRequestError("candidates: expected a non-empty list of strings", "candidates")
        lengths = []
        for i, candidate in enumerate(candidates):
            ids = self.model.tokenizer(candidate, add_special_tokens=False)["input_ids"] if isinstance(
                candidate, str) else []
            if not ids:
                raise EngineRequestError(f"candidates[{i}]: expected a string of at least one token",
                                         f"candidates[{i}]")
            lengths.append(len(ids))
        return lengths

    def process(self, ids: list[int], images: list[bytes], fields: Fields = Fields(),
                max_pixels: int = DEFAULT_MAX_PIXELS) -> ProcessedPrompt:
        """The processed prompt of `tokenize`'s ids and the images' bytes: each image decoded (at
        most `max_pixels`), except those of a prefix already in the cache and those in the image cache."""
        media_before = [0]
        for token in ids:
            media_before.append(media_before[-1] + (token == self.media_id))
        cuts = [k for k in range(1, len(ids)) if (ids[k] == self.media_id and (
            self.cut_in_groups or ids[k - 1] != self.media_id)) or ids[k - 1] == self.end_id]
        if self.leading_text_sees_all and ids and ids[0] != self.media_id:
            cuts = []
        prompt = ProcessedPrompt(ids, cuts, images, [hashlib.sha256(data).digest() for data in images], None,
                                 media_before, lambda i: self._decode(images[i], fields.image(i), max_pixels),
                                 lambda image: self.family.preprocess(self.model, [image]))
        cut = cuts[-1] if cuts and self.cache_prefixes else None
        if cut is not None and (media_before[cut] > 0 or cut >= MIN_TEXT_PREFIX_TOKENS):
            prompt.split = cut
        cached = media_before[cut] if prompt.split is not None and self.is_cached(prompt.key(cut)) else 0
        # An image in the image cache is not decoded either (its bytes were decoded before).
        prompt.decoded = [None if i < cached or self.image_is_cached(prompt.digests[i]) else prompt.decode(i)
                          for i in range(len(images))]
        return prompt

    def _decode(self, data: bytes, name: str, max_pixels: int) -> Image.Image:
        """One image's bytes -> the image, checked (at most `max_pixels`)."""
        if self.model.vision_encoder is None:
            raise EngineRequestError(f"{name}: this model has no vision encoder, so it cannot take images", name)
        try:
            image = decode_image(data, max_pixels=max_pixels, name=name)
        except ImageProcessingError as err:
            raise EngineRequestError(str(err), name, code="invalid_image") from None
        return image
