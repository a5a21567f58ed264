"""What the HTTP server accepts: request and media limits, media sources, authentication.

Every limit is checked before the expensive step it protects: the body size before the body is
read whole, an image's byte size before it is base64-decoded or downloaded, its pixel count from
its header before it is decoded, the prompt's length in characters before it is tokenized.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flamingo.errors import UserError
from flamingo.model.image_processing import DEFAULT_MAX_PIXELS


class ServerSettingsError(UserError):
    """A server option is out of range."""


class RequestError(UserError):
    """A request the server refuses: becomes an OpenAI-format error response with this HTTP status.
    `param` names the offending field ("messages[0].content[1].image_url.url"); the message starts with it."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 error_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.error_type = message, param, status, code, error_type

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServerSettings:
    model_name: str = "flamingo"
    api_key: str | None = None                  # when set, /v1/* needs "Authorization: Bearer <key>"
    # Host header names served (None: any). A server on loopback serves only loopback names, so a web
    # page elsewhere cannot reach it through DNS rebinding.
    allowed_hosts: tuple[str, ...] | None = None
    max_body_bytes: int = 32 << 20              # a whole request body
    body_timeout_s: float = 30.0                # to receive a whole request body (slow senders)
    max_images: int = 16                        # images per request
    max_image_bytes: int = 8 << 20              # one encoded image
    max_image_pixels: int = 16_000_000          # one image, read from its header (decompression bombs)
    max_prompt_tokens: int | None = None        # None: the language model's context length
    max_tokens: int = 512                       # cap of a request's max_tokens
    default_max_tokens: int = 64                # max_tokens when a request gives none
    max_n: int = 8                              # choices per request
    max_beams: int = 8                          # num_beams (extension)
    max_stop: int = 4                           # stop strings per request (OpenAI's own limit)
    max_candidates: int = 64                    # /v1/rank candidates per request
    max_rank_tokens: int = 1024                 # /v1/rank candidate tokens per request, all candidates together
    allow_url_fetch: bool = False               # image_url with http(s)://
    allow_private_urls: bool = False            # ... also from loopback, private, link-local, reserved addresses
    url_fetch_timeout_s: float = 10.0
    allowed_local_media_path: Path | None = None  # file:// URLs and paths, resolved strictly under this folder

    def __post_init__(self) -> None:
        positive = ("max_body_bytes", "max_images", "max_image_bytes", "max_image_pixels", "max_tokens",
                    "default_max_tokens", "max_n", "max_beams", "max_stop", "max_candidates", "max_rank_tokens")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ServerSettingsError(f"{name}: expected an integer >= 1, got {value!r}")
        if self.max_image_pixels > DEFAULT_MAX_PIXELS:  # the engine decodes images up to that many
            raise ServerSettingsError(f"max_image_pixels: at most {DEFAULT_MAX_PIXELS}, got {self.max_image_pixels}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ServerSettingsError(f"max_prompt_tokens: expected an integer >= 1, got {self.max_prompt_tokens!r}")
        if self.default_max_tokens > self.max_tokens:
            raise ServerSettingsError(f"default_max_tokens ({self.default_max_tokens}) is above the "
                                      f"max_tokens cap ({self.max_tokens})")
        for name in ("url_fetch_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ServerSettingsError(f"{name}: expected > 0, got {getattr(self, name)!r}")
        if self.api_key is not None and not self.api_key:
            raise ServerSettingsError("api_key: expected a non-empty key (or none)")
        if self.allowed_local_media_path is not None:
            root = Path(self.allowed_local_media_path)
            if not root.is_dir():
                raise ServerSettingsError(f"allowed_local_media_path: {root} is not a directory")
            object.__setattr__(self, "allowed_local_media_path", root.resolve(strict=True))
