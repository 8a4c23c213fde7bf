"""images: data URLs, remote fetches from a real local aiohttp server, decoding guards."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from PIL import Image

from services.gateway.errors import APIError
from services.gateway.images import (
    decode_data_url,
    decode_image_bytes,
    decode_image_url,
    fetch_remote,
)
from shared.engine.multimodal import content_hash

MB = 1 << 20


def picture(fmt: str = "PNG", size=(12, 8), mode="RGB") -> bytes:
    img = Image.new(mode, size)
    img.putdata([((x * 20) % 256, (y * 30) % 256, 77, 255)[:len(mode)]
                 for y in range(size[1]) for x in range(size[0])])
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


async def decode(url: str, **kw):
    args = {"allow_remote": False, "max_bytes": MB, "timeout_s": 2.0, **kw}
    return await decode_image_url(url, **args)


async def bad(url: str, status=400, match="", **kw) -> APIError:
    with pytest.raises(APIError) as info:
        await decode(url, **kw)
    assert info.value.status == status and info.value.param == "messages"
    assert match in info.value.message, info.value.message
    return info.value


async def test_png_data_url():
    raw = picture()
    img = await decode(data_url(raw))
    assert img.image.mode == "RGB" and img.size == (12, 8)
    assert img.bytes_len == len(raw) and img.data == raw
    assert img.content_hash == content_hash(raw)  # the engine's name for the same image


@pytest.mark.parametrize("fmt,mime", [("JPEG", "image/jpeg"), ("WEBP", "image/webp"),
                                      ("GIF", "image/gif"), ("BMP", "image/bmp")])
async def test_other_formats(fmt, mime):
    img = await decode(data_url(picture(fmt), mime))
    assert img.size == (12, 8) and len(img.content_hash) == 64


async def test_same_pixels_same_hash():
    png, webp = picture("PNG"), picture("WEBP")  # lossless: the same pixels
    b64 = base64.b64encode(png).decode()
    wrapped = "\n".join(b64[i:i + 10] for i in range(0, len(b64), 10))
    hashes = {(await decode(u)).content_hash for u in (
        data_url(png), data_url(webp, "image/webp"), f"data:image/png;base64,{wrapped}",
        f"data:image/png;base64,{b64.rstrip('=')}",
        "data:image/png;base64," + base64.urlsafe_b64encode(png).decode())}
    assert len(hashes) == 1
    other = await decode(data_url(picture(size=(8, 12))))
    assert other.content_hash not in hashes


async def test_transparency_composited_like_engine():
    rgba = picture(mode="RGBA")
    img = await decode(data_url(rgba))
    assert img.image.mode == "RGB" and img.content_hash == content_hash(rgba)


async def test_bad_data_urls():
    await bad("data:image/png;base64,@@@@", match="base64")
    await bad("data:image/png,rawbytes", match="data:image")
    await bad("data:text/plain;base64,aGVsbG8=", match="not an image")
    await bad("data:image/png;base64,", match="empty")
    await bad(data_url(b"hello, not an image"), match="cannot decode")
    await bad(data_url(picture()[:60]), match="cannot decode")  # truncated
    await bad("ftp://example.invalid/x.png", match="scheme")
    await bad("file:///etc/passwd", match="scheme")
    await bad("not a url", match="scheme")


async def test_size_limits():
    raw = picture(size=(64, 64))
    await bad(data_url(raw), status=413, max_bytes=len(raw) - 1)
    assert (await decode(data_url(raw), max_bytes=len(raw))).bytes_len == len(raw)
    await bad(data_url(b"x" * 4000), status=413, max_bytes=1000)  # refused before decoding
    with pytest.raises(APIError):
        decode_data_url("data:image/png;base64," + "A" * 4000, max_bytes=100)


async def test_pixel_limits():
    raw = picture(size=(100, 100))
    await bad(data_url(raw), match="10000 pixels", max_pixels=9999)
    bomb = io.BytesIO()
    Image.new("L", (6000, 6000)).save(bomb, format="PNG")  # ~36 Mpx in a few kB
    with pytest.raises(APIError, match="pixels"):
        decode_image_bytes(bomb.getvalue(), max_pixels=10_000_000)


async def test_remote_disabled():
    await bad("https://example.com/cat.png", match="remote image URLs are disabled")
    await bad("http://127.0.0.1:1/cat.png", match="remote image URLs are disabled")


# --- remote fetches against a real server on 127.0.0.1 -----------------------------------------
@pytest.fixture
async def image_server():
    png = picture(size=(20, 10))

    async def ok(_r):
        return web.Response(body=png, content_type="image/png")

    async def big(_r):
        return web.Response(body=b"\0" * (2 * MB), content_type="image/png")

    async def chunked_big(_r):  # no Content-Length: the cap must hold while streaming
        resp = web.StreamResponse()
        await resp.prepare(_r)
        for _ in range(64):
            await resp.write(b"\0" * 65536)
        return resp

    async def slow(_r):
        await asyncio.sleep(5)
        return web.Response(body=png)

    async def redirect(_r):
        raise web.HTTPFound("/ok.png")

    async def text(_r):
        return web.Response(text="<html>not an image</html>", content_type="text/html")

    app = web.Application()
    for path, handler in (("/ok.png", ok), ("/big.png", big), ("/chunked.png", chunked_big),
                          ("/slow.png", slow), ("/page.html", text), ("/redirect", redirect)):
        app.router.add_get(path, handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    server.png = png
    yield server
    await server.close()


async def test_remote_png(image_server):
    url = str(image_server.make_url("/ok.png"))
    img = await decode(url, allow_remote=True)
    assert img.size == (20, 10) and img.content_hash == content_hash(image_server.png)
    redirected = await decode(str(image_server.make_url("/redirect")), allow_remote=True)
    assert redirected.content_hash == img.content_hash


async def test_remote_failures(image_server):
    def url(p):
        return str(image_server.make_url(p))

    await bad(url("/big.png"), status=413, allow_remote=True)
    await bad(url("/chunked.png"), status=413, allow_remote=True)
    await bad(url("/page.html"), match="cannot decode", allow_remote=True)
    await bad(url("/missing.png"), match="HTTP 404", allow_remote=True)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await bad(url("/slow.png"), match="timed out", allow_remote=True, timeout_s=0.3)
    assert loop.time() - t0 < 3


async def test_fetch_remote_streaming_cap(image_server):
    data = await fetch_remote(str(image_server.make_url("/ok.png")), max_bytes=MB, timeout_s=2)
    assert data == image_server.png
    with pytest.raises(APIError) as info:
        await fetch_remote(str(image_server.make_url("/chunked.png")), max_bytes=100_000,
                           timeout_s=2)
    assert info.value.status == 413


async def test_connection_refused():
    srv = TestServer(web.Application(), host="127.0.0.1")
    await srv.start_server()
    url = str(srv.make_url("/x.png"))
    await srv.close()  # nothing listens there any more
    await bad(url, match="failed", allow_remote=True)
