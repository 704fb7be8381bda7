"""Attachment downloads against a local aiohttp server: every byte guard, the timeout and the allowlist."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from bot.intake import IntakeError
from bot.intake.download import download_attachment

LIMIT = 10_000


async def _lying(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Length": "100"})
    await response.prepare(request)
    try:
        await response.write(b"x" * 100)
        await response.write(b"y" * (LIMIT * 2))
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        pass
    return response


async def _chunked(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    try:
        for _ in range(50):
            await response.write(b"z" * 1000)
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        pass
    return response


async def _slow(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    await response.prepare(request)
    await response.write(b"a")
    await asyncio.sleep(5)
    return response


async def _ok(request: web.Request) -> web.Response:
    return web.Response(body=b"p" * 500)


async def _big(request: web.Request) -> web.Response:
    return web.Response(body=b"b" * (LIMIT + 1))


@pytest.fixture
async def server() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/ok", _ok)
    app.router.add_get("/big", _big)
    app.router.add_get("/lying", _lying)
    app.router.add_get("/chunked", _chunked)
    app.router.add_get("/slow", _slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def fetch(url: str, declared: int | None = None, hosts: list[str] | None = None, timeout: float = 5) -> bytes:
    async with aiohttp.ClientSession() as session:
        return await download_attachment(
            session, url, declared_size=declared, max_bytes=LIMIT, allowed_hosts=hosts or ["127.0.0.1"],
            allow_insecure=True, timeout_seconds=timeout,
        )


async def test_small_file_downloads(server: str) -> None:
    assert await fetch(f"{server}/ok") == b"p" * 500


async def test_a_lying_content_length_never_lets_more_than_the_limit_through(server: str) -> None:
    # HTTP framing stops the client at the claimed length; what follows is never read.
    assert len(await fetch(f"{server}/lying")) == 100


@pytest.mark.parametrize("path", ["/big", "/chunked"])
async def test_over_limit_bodies_are_refused(server: str, path: str) -> None:
    with pytest.raises(IntakeError) as info:
        await fetch(f"{server}{path}")
    assert info.value.code == "too_many_bytes"


async def test_declared_size_is_refused_before_any_request(server: str) -> None:
    with pytest.raises(IntakeError) as info:
        await fetch(f"{server}/ok", declared=LIMIT + 1)
    assert info.value.code == "too_many_bytes"


async def test_slow_server_hits_the_timeout(server: str) -> None:
    with pytest.raises(IntakeError) as info:
        await fetch(f"{server}/slow", timeout=1)
    assert info.value.code == "timeout"


async def test_hosts_off_the_allowlist_are_never_fetched(server: str) -> None:
    with pytest.raises(IntakeError) as info:
        await fetch(f"{server}/ok", hosts=["cdn.discordapp.com"])
    assert info.value.code == "host_not_allowed"
    async with aiohttp.ClientSession() as session:
        with pytest.raises(IntakeError, match="Discord attachments"):
            await download_attachment(session, f"{server}/ok", declared_size=None, max_bytes=LIMIT,
                                      allowed_hosts=["127.0.0.1"], allow_insecure=False)
