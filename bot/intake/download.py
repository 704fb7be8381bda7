"""Fetch a Discord attachment with three byte guards and a host allowlist."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import aiohttp

from bot.intake.errors import IntakeError

CHUNK_BYTES = 64 * 1024


def _too_big(limit: int, what: str) -> IntakeError:
    return IntakeError(
        "too_many_bytes", f"That file is larger than {limit / 2**20:.0f} MiB; please upload a smaller {what}."
    )


async def download_attachment(
    session: aiohttp.ClientSession,
    url: str,
    *,
    declared_size: int | None,
    max_bytes: int,
    allowed_hosts: list[str],
    allow_insecure: bool = False,
    timeout_seconds: float = 30.0,
    what: str = "image",
) -> bytes:
    """The attachment's bytes, or an IntakeError (whose sentence calls the file ``what``).

    Guards: the declared size before any request, ``Content-Length`` before the body,
    and the bytes actually streamed (a header can lie, a chunked body has none).
    """
    parts = urlsplit(url)
    schemes = {"https", "http"} if allow_insecure else {"https"}
    if parts.scheme not in schemes or (parts.hostname or "") not in allowed_hosts:
        raise IntakeError("host_not_allowed", f"{what[0].upper()}{what[1:]}s can only come from Discord attachments.")
    if declared_size is not None and declared_size > max_bytes:
        raise _too_big(max_bytes, what)
    timeout = aiohttp.ClientTimeout(
        total=timeout_seconds, connect=min(10.0, timeout_seconds), sock_read=min(15.0, timeout_seconds)
    )
    try:
        # No redirects: a redirect could lead off the allowlist.
        async with session.get(url, timeout=timeout, allow_redirects=False) as response:
            if response.status != 200:
                raise IntakeError(
                    "download_failed",
                    f"Discord answered {response.status} when fetching the {what}; please try again.",
                )
            if response.content_length is not None and response.content_length > max_bytes:
                raise _too_big(max_bytes, what)
            received = bytearray()
            async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                received += chunk
                if len(received) > max_bytes:
                    raise _too_big(max_bytes, what)
            return bytes(received)
    except TimeoutError:
        raise IntakeError("timeout", f"Fetching the {what} took too long; please try again.") from None
    except (aiohttp.ClientError, asyncio.IncompleteReadError) as exc:
        raise IntakeError(
            "download_failed", f"The {what} could not be fetched from Discord; please try again."
        ) from exc
