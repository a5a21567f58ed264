"""Images of a request: from data URLs, and only when the operator allows it from http(s) URLs or
files under one folder; checked (byte size, format, pixel count from the header) before they
reach the engine, whose door decodes each once.

URLs are fetched from public addresses only (unless the operator allows private ones): the host
is resolved, every address it resolves to must be public, and the connection goes to the address
that was checked (so a second DNS answer cannot swap in another); redirects are followed one by
one, each checked the same way. A client cannot make the server probe its own network (SSRF).
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import socket
import urllib.parse
from pathlib import Path
from typing import Awaitable, Callable

import anyio
import httpx
from PIL import Image

from flamingo.serving.limits import RequestError, ServerSettings

# Formats PIL decodes by itself (no external programs, unlike EPS); anything else is refused.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")
MAX_REDIRECTS = 3
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
# The addresses a host name resolves to (IPv4 or IPv6 text), as the system resolver answers.
HostResolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve_host(host: str, port: int) -> list[str]:
    return [info[4][0] for info in await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def is_public(address: str) -> bool:
    """Whether an address is globally routable: not loopback, private, link-local (cloud metadata at
    169.254.169.254), shared, reserved, unspecified or multicast; IPv4-mapped IPv6 as its IPv4."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope ("fe80::1%eth0") is not part of it
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _short(text: str, limit: int = 48) -> str:
    """A value quoted in an error message, never unbounded."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _too_big(param: str, size: int, cap: int) -> RequestError:
    return RequestError(f"{param}: the image is {size} bytes, more than the limit of {cap} bytes", param,
                        code="image_too_large")


class MediaResolver:
    """Turns the `url` of an image_url part (or an `images` entry) into checked image bytes."""

    def __init__(self, settings: ServerSettings, transport: httpx.AsyncBaseTransport | None = None,
                 resolve: HostResolver = resolve_host) -> None:
        self.settings = settings
        self._transport = transport
        self._resolve = resolve
        self._client: httpx.AsyncClient | None = None

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def load(self, url: str, param: str) -> bytes:
        scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
        if scheme == "data":
            data = self._data_url(url, param)
        elif scheme in ("http", "https"):
            data = await self._fetch(url, param)
        elif scheme in ("file", ""):
            data = await anyio.to_thread.run_sync(self._local_file, url, param)
        else:
            raise RequestError(f"{param}: unsupported URL scheme {_short(scheme)}; expected a data:image/...;base64 "
                               f"URL", param, code="invalid_image_url")
        check_image(data, param, self.settings.max_image_pixels)
        return data

    def _data_url(self, url: str, param: str) -> bytes:
        header, sep, payload = url.partition(",")
        media_type, *options = header[len("data:"):].split(";")
        if not sep or "base64" not in options or not media_type.lower().startswith("image/"):
            raise RequestError(f"{param}: expected a data URL like data:image/png;base64,<data>, got "
                               f"{_short(url)}", param, code="invalid_image_url")
        cap = self.settings.max_image_bytes
        if len(payload) // 4 * 3 > cap + 2:  # before decoding anything
            raise _too_big(param, len(payload) // 4 * 3, cap)
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"{param}: the data URL's payload is not valid base64", param,
                               code="invalid_image_url") from None
        if len(data) > cap:
            raise _too_big(param, len(data), cap)
        return data

    async def _fetch(self, url: str, param: str) -> bytes:
        if not self.settings.allow_url_fetch:
            raise RequestError(f"{param}: http(s) image URLs are refused by this server (start it with "
                               f"--allow-url-fetch to fetch them); send the image as a data URL", param,
                               code="url_fetch_disabled")
        if self._client is None:
            self._client = httpx.AsyncClient(transport=self._transport, follow_redirects=False,
                                             timeout=self.settings.url_fetch_timeout_s)
        try:
            with anyio.fail_after(self.settings.url_fetch_timeout_s):  # in all: a slow trickle times out too
                for _ in range(MAX_REDIRECTS + 1):
                    request = await self._request(url, param)
                    response = await self._client.send(request, stream=True)
                    try:
                        location = response.headers.get("location")
                        if response.status_code in REDIRECT_STATUSES and location:
                            url = str(httpx.URL(url).join(location))  # against the URL asked for, not the address
                            continue
                        return await self._body(response, param)
                    finally:
                        await response.aclose()
                raise RequestError(f"{param}: fetching the image was redirected more than {MAX_REDIRECTS} times",
                                   param, code="image_fetch_failed")
        except TimeoutError:
            raise RequestError(f"{param}: fetching the image took longer than {self.settings.url_fetch_timeout_s} s",
                               param, code="image_fetch_failed") from None
        except httpx.HTTPError as err:
            raise RequestError(f"{param}: fetching the image failed: {type(err).__name__}", param,
                               code="image_fetch_failed") from None

    async def _request(self, url: str, param: str) -> httpx.Request:
        """The GET of `url` (the client's, or a redirect's), to an address checked to be public
        unless private ones are allowed; the Host header and TLS name stay the URL's."""
        try:
            target = httpx.URL(url)
        except httpx.InvalidURL:
            target = None
        if target is None or target.scheme not in ("http", "https") or not target.host or not (
                target.port is None or 0 < target.port < 65536):
            raise RequestError(f"{param}: expected an http(s) URL with a host, got {_short(url)}", param,
                               code="invalid_image_url")
        if self.settings.allow_private_urls:
            return self._client.build_request("GET", target)
        try:
            addresses = await self._resolve(target.host, target.port or (443 if target.scheme == "https" else 80))
        except OSError:
            raise RequestError(f"{param}: the image's host {_short(target.host)} could not be resolved", param,
                               code="image_fetch_failed") from None
        private = [a for a in addresses if not is_public(a)]
        if private or not addresses:
            raise RequestError(f"{param}: the image's host {_short(target.host)} resolves to "
                               f"{_short(private[0] if private else 'nothing')}, not a public address; this server "
                               f"fetches public addresses only (start it with --allow-private-urls to fetch others)",
                               param, code="private_address")
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        return self._client.build_request("GET", target.copy_with(host=addresses[0].split("%", 1)[0]),
                                          headers={"Host": target.netloc.decode("ascii")}, extensions=extensions)

    async def _body(self, response: httpx.Response, param: str) -> bytes:
        if response.status_code != 200:
            raise RequestError(f"{param}: fetching the image failed with HTTP {response.status_code}", param,
                               code="image_fetch_failed")
        cap = self.settings.max_image_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise _too_big(param, int(declared), cap)
        data = bytearray()
        async for chunk in response.aiter_bytes():
            data += chunk
            if len(data) > cap:
                raise _too_big(param, len(data), cap)
        return bytes(data)

    def _local_file(self, url: str, param: str) -> bytes:
        root = self.settings.allowed_local_media_path
        if root is None:
            raise RequestError(f"{param}: local files are refused by this server (start it with "
                               f"--allowed-local-media-path DIR to serve images from DIR); send the image as a "
                               f"data URL", param, code="local_media_disabled")
        if url.lower().startswith("file:"):
            parsed = urllib.parse.urlsplit(url)
            if parsed.netloc not in ("", "localhost"):
                raise RequestError(f"{param}: file URLs must name a local file (file:///path)", param,
                                   code="invalid_image_url")
            text = urllib.parse.unquote(parsed.path)
        else:
            text = url
        path = Path(text)
        if "\x00" in text or ".." in path.parts:
            raise RequestError(f"{param}: the path may not contain '..' or NUL characters", param,
                               code="invalid_image_url")
        resolved = (path if path.is_absolute() else root / path).resolve()  # follows symlinks
        if not resolved.is_relative_to(root):
            raise RequestError(f"{param}: {_short(text)} is outside the allowed media folder", param,
                               code="invalid_image_url")
        if not resolved.is_file():
            raise RequestError(f"{param}: no image file {_short(text)} in the allowed media folder", param,
                               code="invalid_image_url")
        cap = self.settings.max_image_bytes
        with open(resolved, "rb") as f:
            data = f.read(cap + 1)
        if len(data) > cap:
            raise _too_big(param, resolved.stat().st_size, cap)
        return data


def check_image(data: bytes, param: str, max_pixels: int) -> None:
    """Refuse anything that is not a PNG/JPEG/GIF/WebP/BMP of at most `max_pixels`, from its
    header, before any pixel is decoded (the engine's door decodes it, once)."""
    size = header_size(data)
    if size is None:
        raise RequestError(f"{param}: not an image in a supported format ({', '.join(IMAGE_FORMATS)})", param,
                           code="invalid_image")
    width, height = size
    if width * height > max_pixels:
        raise RequestError(f"{param}: the image is {width}x{height} = {width * height} pixels, more than the limit "
                           f"of {max_pixels}", param, code="image_too_large")


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of an image in one of IMAGE_FORMATS, (0, 0) when its header
    is damaged (the full decode names the problem), None when it is in no such format. Read with
    the format's own PIL plugin, as `Image.open` does, but without `Image.open`'s own
    decompression-bomb check, which would refuse a huge image before our limit could."""
    Image.init()
    prefix = data[:16]
    for name in IMAGE_FORMATS:
        factory, accept = Image.OPEN[name]
        if accept is not None and not accept(prefix):
            continue
        try:
            with factory(io.BytesIO(data)) as image:
                return image.size
        except Exception:  # noqa: BLE001 - a damaged header: the full decode names the problem
            return 0, 0
    return None
