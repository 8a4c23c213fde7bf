"""image_url -> DecodedImage: base64 data URLs always, http(s) only when enabled.

    "data:image/png;base64,..." --decode_data_url-->  raw bytes (size-capped: 413)
    "https://..."               --fetch_remote----->  raw bytes (timeout, streaming size cap)
    raw bytes --decode_image_bytes--> header check (format allow-list, pixel cap) -> RGB
              -> content_hash: shared.engine.multimodal.rgb_hash (the engine's own name for
                 the image, torch-free), so the same picture as PNG /
                 lossless WebP / re-wrapped base64 gets the same name here, on the encoder and
                 in the KV block hashes

Every failure is an APIError: 400 (param "messages") for bad input, 413 for oversize.
Decoding is CPU work: `decode_image_url` runs it in a thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
from dataclasses import dataclass

import aiohttp

from services.gateway.errors import APIError
from shared.engine.errors import InvalidRequestError
from shared.engine.multimodal import load_image, rgb_hash

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # decoders PIL may use on client bytes
DEFAULT_MAX_PIXELS = 40_000_000
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*),(?P<data>.*)",
                       re.DOTALL)
_WS = re.compile(rb"\s+")
_PARAM = "messages"


@dataclass(frozen=True)
class DecodedImage:
    """A client image: `image` RGB PIL (transparency composited on white, as the engine
    does), `content_hash` its name everywhere, `data` the raw bytes as received (what travels
    to the encoder in ImageRef.data), `bytes_len` == len(data)."""

    image: object
    content_hash: str
    data: bytes
    bytes_len: int

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size  # type: ignore[attr-defined]


def _bad(msg: str) -> APIError:
    return APIError(400, msg, param=_PARAM)


def _too_large(n: int | str, max_bytes: int) -> APIError:
    return APIError(413, f"image is too large ({n} bytes; the limit is {max_bytes} bytes)",
                    param=_PARAM)


def decode_data_url(url: str, *, max_bytes: int) -> bytes:
    """The bytes of a base64 `data:` URL (whitespace and missing padding tolerated; url-safe
    alphabet accepted). Raises APIError 400 (not base64, not an image media type) / 413."""
    m = _DATA_URL.fullmatch(url)
    if m is None or ";base64" not in m["params"].lower():
        raise _bad("image data URLs must look like data:image/<type>;base64,<data>")
    mime = (m["mime"] or "").lower()
    if mime and not mime.startswith("image/") and mime != "application/octet-stream":
        raise _bad(f"data URL media type {mime!r} is not an image")
    raw = _WS.sub(b"", m["data"].encode("ascii", errors="replace"))
    if len(raw) // 4 * 3 > max_bytes + 3:  # refuse before decoding
        raise _too_large(f"about {len(raw) // 4 * 3}", max_bytes)
    raw = raw.replace(b"-", b"+").replace(b"_", b"/").rstrip(b"=")
    try:
        data = base64.b64decode(raw + b"=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise _bad(f"image data URL is not valid base64: {e}") from e
    if len(data) > max_bytes:
        raise _too_large(len(data), max_bytes)
    return data


def decode_image_bytes(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Raw image bytes -> DecodedImage. The pixel count is checked from the header before any
    pixel is decoded (decompression bombs), against min(max_pixels, PIL's MAX_IMAGE_PIXELS).
    Raises APIError(400) for empty, unknown-format, truncated, zero-size or oversized images."""
    from PIL import Image

    if not data:
        raise _bad("image is empty (0 bytes)")
    limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
        w, h = img.size
        if w <= 0 or h <= 0:
            raise _bad(f"image has zero size {w}x{h}")
        if w * h > limit:
            raise _bad(f"image is {w}x{h} = {w * h} pixels; the limit is {limit}")
        rgb = load_image(img)
        digest = rgb_hash(rgb)
    except APIError:
        raise
    except InvalidRequestError as e:
        raise _bad(str(e)) from e
    except Image.DecompressionBombError as e:
        raise _bad(f"image is too large to decode: {e}") from e
    except Exception as e:  # any decoder failure: not an image, unsupported, truncated
        raise _bad(f"cannot decode image: {e}") from e
    return DecodedImage(rgb, digest, bytes(data), len(data))


async def fetch_remote(url: str, *, max_bytes: int, timeout_s: float,
                       session: aiohttp.ClientSession | None = None) -> bytes:
    """GET an http(s) image with a total timeout and a streaming size cap (the body is read
    in chunks and abandoned as soon as it passes `max_bytes`, whatever Content-Length says).
    Raises APIError: 413 oversize; 400 for HTTP errors, timeouts and connection failures.
    Uses `session` when given (not closed), else a fresh one."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    own = session is None
    session = session or aiohttp.ClientSession()
    try:
        async with session.get(url, timeout=timeout, allow_redirects=True) as resp:
            if resp.status != 200:
                raise _bad(f"fetching the image URL failed: HTTP {resp.status}")
            if resp.content_length is not None and resp.content_length > max_bytes:
                raise _too_large(resp.content_length, max_bytes)
            buf = bytearray()
            async for chunk in resp.content.iter_chunked(64 * 1024):
                buf += chunk
                if len(buf) > max_bytes:
                    raise _too_large(f"more than {max_bytes}", max_bytes)
            return bytes(buf)
    except TimeoutError as e:
        raise _bad(f"fetching the image URL timed out after {timeout_s:g} s") from e
    except aiohttp.ClientError as e:
        raise _bad(f"fetching the image URL failed: {type(e).__name__}: {e}") from e
    finally:
        if own:
            await session.close()


async def decode_image_url(url: str, *, allow_remote: bool, max_bytes: int, timeout_s: float,
                           max_pixels: int = DEFAULT_MAX_PIXELS,
                           session: aiohttp.ClientSession | None = None) -> DecodedImage:
    """An OpenAI image_url -> DecodedImage (decoding off the event loop). Raises APIError:
    400 "remote image URLs are disabled" for http(s) unless `allow_remote`, 400 for other
    schemes and bad images, 413 oversize."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = decode_data_url(url, max_bytes=max_bytes)
    elif scheme in ("http", "https"):
        if not allow_remote:
            raise _bad("remote image URLs are disabled on this server; send the image as a "
                       "base64 data URL")
        data = await fetch_remote(url, max_bytes=max_bytes, timeout_s=timeout_s, session=session)
    else:
        raise _bad(f"unsupported image URL scheme {scheme or url[:16]!r}: use data: or https:")
    return await asyncio.to_thread(decode_image_bytes, data, max_pixels=max_pixels)
