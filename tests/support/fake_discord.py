"""A loopback fake of Discord's REST API, gateway and CDN for end-to-end tests.

The real, unmodified discord.py client connects to it once ``discord.http.Route.BASE``
and ``DiscordWebSocket.DEFAULT_GATEWAY`` point here (``tests/support/fake_bot.py`` does that
in the bot process). Wire details follow docs/LIBRARIES.md, 'discord.py 2.7 against a
loopback fake': exact
``application/json`` content type, JSON bodies for interaction callbacks, 404 (never
5xx) for unknown routes, text gateway frames, heartbeat ACKs, no rate-limit headers.

Every REST request is recorded, uploads included, so tests assert on what the bot sent.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

DISCORD_EPOCH_MS = 1420070400000
MESSAGE_CONTENT_INTENT = 1 << 15
PREMIUM_LIMITS = {0: 10 * 2**20, 1: 10 * 2**20, 2: 50 * 2**20, 3: 100 * 2**20}
_counter = itertools.count(1)


def snowflake() -> str:
    return str(((int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22) | (next(_counter) & 0x3FFFFF))


def _iso_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000+00:00", time.gmtime())


def json_response(payload: Any, status: int = 200) -> web.Response:
    # Exactly "application/json": discord.py compares the header verbatim (http.py json_or_text).
    return web.Response(body=json.dumps(payload).encode(), status=status, content_type="application/json")


@dataclass
class Upload:
    field: str
    filename: str
    content_type: str
    data: bytes


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any = None
    files: list[Upload] = field(default_factory=list)
    status: int = 200
    message_id: str | None = None  # the message this request created, if any
    at: float = field(default_factory=time.monotonic)


@dataclass
class FakeUser:
    id: str
    name: str
    roles: list[str] = field(default_factory=list)
    bot: bool = False

    def user_payload(self) -> dict[str, Any]:
        return {"id": self.id, "username": self.name, "global_name": self.name, "discriminator": "0",
                "avatar": None, "bot": self.bot}

    def member_payload(self) -> dict[str, Any]:
        return {"user": self.user_payload(), "roles": self.roles, "joined_at": _iso_now(), "deaf": False,
                "mute": False, "flags": 0, "nick": None, "avatar": None, "premium_since": None,
                "pending": False, "permissions": "2248473465835073"}


class FakeDiscord:
    def __init__(self, *, premium_tier: int = 0) -> None:
        self.app_id = snowflake()
        self.bot_user = FakeUser(self.app_id, "ltxbot", bot=True)
        self.guild_id = snowflake()
        self.channel_id = snowflake()
        self.role_ids = {"artist": snowflake(), "moderator": snowflake()}
        self.premium_tier = premium_tier
        # A stricter per-upload limit than the tier gives, to test delivery near the limit.
        self.upload_limit: int | None = None
        # The only token the fake accepts; any other gets 401 on login, as Discord answers.
        self.token = "fake-token"
        # Seconds each CDN download takes, to hold a request between its checks and its insert.
        self.cdn_delay = 0.0
        # An outage: the gateway refuses every new connection (with 503) while this is set.
        self.gateway_down = False
        self.refused_connections = 0
        self.requests: list[Recorded] = []
        self.messages: dict[str, dict[str, Any]] = {}
        self.commands: dict[str, dict[str, Any]] = {}
        self.interactions: dict[str, dict[str, Any]] = {}  # token -> interaction payload
        self.cdn: dict[str, tuple[bytes, str]] = {}
        self.nonces: dict[str, str] = {}
        self.identify: dict[str, Any] | None = None
        self.sockets: list[web.WebSocketResponse] = []
        self._seq = 0
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # --- lifecycle --------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=200 * 2**20)
        app.router.add_get("/gateway/", self._gateway)
        app.router.add_get("/cdn/{tail:.*}", self._cdn)
        app.router.add_route("*", "/api/v10/{tail:.*}", self._rest)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        for ws in list(self.sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _changed_now(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 60.0) -> Any:
        """Wait until ``predicate()`` returns something truthy, and return it."""
        async def poll() -> Any:
            async with self._changed:
                while True:
                    value = predicate()
                    if value:
                        return value
                    await self._changed.wait()

        return await asyncio.wait_for(poll(), timeout)

    def find(self, method: str, pattern: str, since: int = 0) -> list[Recorded]:
        regex = re.compile(pattern)
        return [r for r in self.requests[since:] if r.method == method and regex.search(r.path)]

    # --- CDN -------------------------------------------------------------------

    def attachment(self, data: bytes, filename: str, content_type: str = "image/png",
                   declared_size: int | None = None) -> dict[str, Any]:
        att_id = snowflake()
        path = f"attachments/{self.channel_id}/{att_id}/{filename}"
        self.cdn[path] = (data, content_type)
        url = f"{self.url}/cdn/{path}?ex=1&is=1&hm=abc"
        return {"id": att_id, "filename": filename, "size": len(data) if declared_size is None else declared_size,
                "url": url, "proxy_url": url, "content_type": content_type}

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(Recorded("GET", request.path, dict(request.query), dict(request.headers)))
        if self.cdn_delay:
            await asyncio.sleep(self.cdn_delay)
        item = self.cdn.get(request.match_info["tail"])
        if item is None:
            return json_response({"message": "Unknown attachment", "code": 0}, 404)
        return web.Response(body=item[0], content_type=item[1])

    # --- gateway ---------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.StreamResponse:
        if self.gateway_down:
            self.refused_connections += 1
            await self._changed_now()
            return web.Response(status=503, text="gateway unavailable")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets.append(ws)
        self._seq = 0
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 30000}}))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                op = frame["op"]
                if op == 1:
                    await ws.send_str(json.dumps({"op": 11}))
                elif op == 2:
                    self.identify = frame["d"]
                    await self._send_ready(ws)
                elif op == 6:
                    await self._dispatch_to(ws, "RESUMED", {})
        finally:
            if ws in self.sockets:
                self.sockets.remove(ws)
        return ws

    async def _send_ready(self, ws: web.WebSocketResponse) -> None:
        await self._dispatch_to(ws, "READY", {
            "v": 10, "user": self.bot_user.user_payload(), "guilds": [{"id": self.guild_id, "unavailable": True}],
            "session_id": "fake-session", "resume_gateway_url": f"ws://127.0.0.1:{self.port}/gateway/",
            "application": {"id": self.app_id, "flags": 0},
        })
        await self._dispatch_to(ws, "GUILD_CREATE", self.guild_payload())
        await self._changed_now()

    def guild_payload(self) -> dict[str, Any]:
        everyone = {"id": self.guild_id, "name": "@everyone", "permissions": "2248473465835073", "position": 0,
                    "color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0}
        roles = [everyone] + [
            {**everyone, "id": role_id, "name": name, "position": i + 1}
            for i, (name, role_id) in enumerate(self.role_ids.items())
        ]
        return {
            "id": self.guild_id, "name": "Fake Guild", "owner_id": snowflake(), "premium_tier": self.premium_tier,
            "member_count": 3, "roles": roles, "emojis": [], "stickers": [], "features": [],
            "channels": [{"id": self.channel_id, "type": 0, "name": "clips", "position": 0,
                          "permission_overwrites": [], "guild_id": self.guild_id}],
            "members": [self.bot_user.member_payload()], "threads": [], "voice_states": [], "presences": [],
            "large": False, "unavailable": False, "verification_level": 0, "mfa_level": 0,
            "default_message_notifications": 0, "explicit_content_filter": 0, "system_channel_flags": 0,
        }

    async def _dispatch_to(self, ws: web.WebSocketResponse, event: str, data: Any) -> None:
        self._seq += 1
        await ws.send_str(json.dumps({"op": 0, "s": self._seq, "t": event, "d": data}))

    async def dispatch(self, event: str, data: Any) -> None:
        await self.wait_for(lambda: self.sockets and self.identify, timeout=30)
        await self._dispatch_to(self.sockets[-1], event, data)

    @property
    def message_content_intent(self) -> bool:
        return bool(self.identify and self.identify.get("intents", 0) & MESSAGE_CONTENT_INTENT)

    # --- what users do -----------------------------------------------------------

    def _interaction(self, kind: int, user: FakeUser, data: dict[str, Any] | None,
                     message: dict[str, Any] | None = None) -> dict[str, Any]:
        token = f"tok{snowflake()}"
        payload: dict[str, Any] = {
            "id": snowflake(), "application_id": self.app_id, "type": kind, "token": token, "version": 1,
            "guild_id": self.guild_id, "channel_id": self.channel_id,
            "channel": {"id": self.channel_id, "type": 0, "name": "clips", "guild_id": self.guild_id,
                        "position": 0, "permission_overwrites": []},
            "member": user.member_payload(), "app_permissions": "2248473465835073",
            "attachment_size_limit": PREMIUM_LIMITS[self.premium_tier], "locale": "en-US", "guild_locale": "en-US",
            "entitlements": [], "authorizing_integration_owners": {"0": self.guild_id}, "context": 0,
        }
        if data is not None:
            payload["data"] = data
        if message is not None:
            payload["message"] = message
        self.interactions[token] = payload
        return payload

    async def slash(self, user: FakeUser, name: str, options: dict[str, Any] | None = None,
                    attachment: dict[str, Any] | None = None, group: str | None = None,
                    attachments: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        """``attachment`` fills the ``image`` option; ``attachments`` maps other attachment options to theirs."""
        command = self.commands[group or name]
        opts: list[dict[str, Any]] = []
        types = {o["name"]: o["type"] for o in _leaf_options(command, name if group else None)}
        for key, value in (options or {}).items():
            opts.append({"name": key, "type": types[key], "value": value})
        resolved: dict[str, Any] = {}
        if attachment is not None:
            opts.append({"name": "image", "type": 11, "value": attachment["id"]})
            resolved["attachments"] = {attachment["id"]: attachment}
        for option, extra in (attachments or {}).items():
            opts.append({"name": option, "type": 11, "value": extra["id"]})
            resolved.setdefault("attachments", {})[extra["id"]] = extra
        data: dict[str, Any] = {"id": command["id"], "name": command["name"], "type": 1, "guild_id": self.guild_id,
                                "options": [{"name": name, "type": 1, "options": opts}] if group else opts}
        if resolved:
            data["resolved"] = resolved
        for opt in opts:
            if opt["type"] == 6:  # a user option
                uid = opt["value"]
                users = data.setdefault("resolved", {}).setdefault("users", {})
                users[uid] = FakeUser(uid, f"user{uid[-4:]}").user_payload()
        payload = self._interaction(2, user, data)
        await self.dispatch("INTERACTION_CREATE", payload)
        return payload

    async def context_menu(self, user: FakeUser, name: str, target: dict[str, Any]) -> dict[str, Any]:
        command = self.commands[name]
        data = {"id": command["id"], "name": name, "type": 3, "guild_id": self.guild_id, "target_id": target["id"],
                "resolved": {"messages": {target["id"]: target}}}
        payload = self._interaction(2, user, data)
        await self.dispatch("INTERACTION_CREATE", payload)
        return payload

    async def click(self, user: FakeUser, message: dict[str, Any], custom_id: str) -> dict[str, Any]:
        payload = self._interaction(3, user, {"custom_id": custom_id, "component_type": 2}, message=message)
        await self.dispatch("INTERACTION_CREATE", payload)
        return payload

    async def submit_modal(self, user: FakeUser, modal: dict[str, Any], values: dict[str, str]) -> dict[str, Any]:
        """Answer a modal the bot opened; ``values`` maps text-input labels (or custom ids) to what was typed."""
        rows = []
        for row in modal["components"]:
            inner = row.get("components") or [row.get("component")]
            for comp in inner:
                if comp and comp.get("type") == 4:
                    names = (comp.get("label"), row.get("label"), comp["custom_id"])
                    key = next((k for k in names if k in values), None)
                    text = {"type": 4, "custom_id": comp["custom_id"], "value": values.get(key, "") if key else ""}
                    rows.append({"type": 1, "components": [text]})
        payload = self._interaction(5, user, {"custom_id": modal["custom_id"], "components": rows})
        await self.dispatch("INTERACTION_CREATE", payload)
        return payload

    async def post_message(self, user: FakeUser, content: str, attachments: list[dict[str, Any]] | None = None,
                           mention_bot: bool = False, reply_to: dict[str, Any] | None = None) -> dict[str, Any]:
        mentions = [{**self.bot_user.user_payload(), "member": {k: v for k, v in self.bot_user.member_payload().items()
                                                                if k != "user"}}] if mention_bot else []
        message = self.message_payload(user, content, attachments or [], mentions=mentions)
        if reply_to is not None:
            message["message_reference"] = {"message_id": reply_to["id"], "channel_id": self.channel_id,
                                            "guild_id": self.guild_id, "type": 0}
            message["referenced_message"] = reply_to
        self.messages[message["id"]] = message
        await self.dispatch("MESSAGE_CREATE", self._as_seen(message))
        return message

    def _as_seen(self, message: dict[str, Any]) -> dict[str, Any]:
        """Without the message-content intent Discord blanks content except where the bot is mentioned."""
        if self.message_content_intent or any(m["id"] == self.app_id for m in message.get("mentions", [])):
            seen = dict(message)
        else:
            seen = {**message, "content": "", "attachments": [], "embeds": [], "components": []}
        ref = seen.get("referenced_message")
        if ref is not None and not self.message_content_intent and ref["author"]["id"] != self.app_id:
            seen["referenced_message"] = {**ref, "content": "", "attachments": [], "embeds": []}
        return seen

    def message_payload(self, user: FakeUser, content: str, attachments: list[dict[str, Any]],
                        mentions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return {
            "id": snowflake(), "channel_id": self.channel_id, "guild_id": self.guild_id, "type": 0,
            "author": user.user_payload(), "member": {k: v for k, v in user.member_payload().items() if k != "user"},
            "content": content, "timestamp": _iso_now(), "edited_timestamp": None, "tts": False,
            "mention_everyone": False, "mentions": mentions or [], "mention_roles": [], "attachments": attachments,
            "embeds": [], "components": [], "pinned": False, "flags": 0,
        }

    # --- what the bot did ----------------------------------------------------------

    def bot_messages(self) -> list[dict[str, Any]]:
        return [m for m in self.messages.values() if m["author"]["id"] == self.app_id]

    def callbacks(self, interaction: dict[str, Any]) -> list[Recorded]:
        return self.find("POST", rf"/interactions/{interaction['id']}/")

    def webhook_calls(self, interaction: dict[str, Any]) -> list[Recorded]:
        return [r for r in self.requests if f"/webhooks/{self.app_id}/{interaction['token']}" in r.path]

    def original_content(self, interaction: dict[str, Any]) -> str | None:
        """The last content the bot gave its first answer to this interaction (callback or @original edit)."""
        content = None
        for r in self.requests:
            if f"/interactions/{interaction['id']}/" in r.path and r.json is not None:
                content = (r.json.get("data") or {}).get("content", content)
            elif r.path.endswith(f"/webhooks/{self.app_id}/{interaction['token']}/messages/@original") and r.json:
                content = r.json.get("content", content)
        return content

    def is_ephemeral(self, interaction: dict[str, Any]) -> bool:
        for r in self.callbacks(interaction):
            data = (r.json or {}).get("data") or {}
            if data.get("flags", 0) & 64:
                return True
        return False

    # --- REST ------------------------------------------------------------------------

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["tail"]
        rec = Recorded(request.method, path, dict(request.query), dict(request.headers))
        if request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                body = await part.read()  # type: ignore[union-attr]
                name = part.name or ""
                if name == "payload_json":
                    rec.json = json.loads(body)
                else:
                    rec.files.append(Upload(name, part.filename or "", part.headers.get("Content-Type", ""),  # type: ignore[union-attr]
                                            bytes(body)))
        elif request.can_read_body:
            raw = await request.read()
            rec.json = json.loads(raw) if raw else None
        self.requests.append(rec)
        try:
            for method, pattern, handler in self._routes():
                match = re.fullmatch(pattern, path)
                if method == request.method and match:
                    response = await handler(rec, **match.groupdict())
                    rec.status = response.status
                    return response
            rec.status = 404
            return json_response({"message": "404: Not Found", "code": 0}, 404)
        finally:
            await self._changed_now()

    def _routes(self) -> list[tuple[str, str, Callable[..., Awaitable[web.Response]]]]:
        hook = r"/webhooks/(?P<app>\d+)/(?P<token>[^/]+)"
        return [
            ("GET", r"/users/@me", self._me),
            ("GET", r"/oauth2/applications/@me", self._app_info),
            ("GET", r"/gateway(?:/bot)?", self._gateway_info),
            ("PUT", r"/applications/(?P<app>\d+)(?:/guilds/(?P<gid>\d+))?/commands", self._sync),
            ("POST", r"/interactions/(?P<iid>\d+)/(?P<token>[^/]+)/callback", self._callback),
            ("PATCH", hook + r"/messages/(?P<mid>@original|\d+)", self._webhook_edit),
            ("GET", hook + r"/messages/(?P<mid>@original|\d+)", self._webhook_get),
            ("DELETE", hook + r"/messages/(?P<mid>@original|\d+)", self._webhook_delete),
            ("POST", hook, self._followup),
            ("POST", r"/channels/(?P<cid>\d+)/messages", self._channel_post),
            ("PATCH", r"/channels/(?P<cid>\d+)/messages/(?P<mid>\d+)", self._channel_edit),
            ("GET", r"/channels/(?P<cid>\d+)/messages/(?P<mid>\d+)", self._channel_get),
            ("GET", r"/channels/(?P<cid>\d+)", self._channel_info),
        ]

    async def _me(self, rec: Recorded) -> web.Response:
        if rec.headers.get("Authorization") != f"Bot {self.token}":
            return json_response({"message": "401: Unauthorized", "code": 0}, 401)
        return json_response(self.bot_user.user_payload())

    async def outage(self) -> None:
        """Discord goes away: the open gateway connections close and new ones are refused."""
        self.gateway_down = True
        for ws in list(self.sockets):
            await ws.close(code=1000)

    async def _app_info(self, rec: Recorded) -> web.Response:
        return json_response({
            "id": self.app_id, "name": "ltxbot", "description": "", "icon": None, "bot_public": True,
            "bot_require_code_grant": False, "verify_key": "00", "flags": 0, "interactions_endpoint_url": None,
            "owner": {"id": snowflake(), "username": "owner", "discriminator": "0", "avatar": None},
        })

    async def _gateway_info(self, rec: Recorded) -> web.Response:
        return json_response({"url": f"ws://127.0.0.1:{self.port}/gateway/", "shards": 1, "session_start_limit": {
            "total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1}})

    async def _sync(self, rec: Recorded, app: str, gid: str | None) -> web.Response:
        out = []
        for cmd in rec.json or []:
            stored = {**cmd, "id": snowflake(), "application_id": self.app_id, "version": snowflake()}
            if gid:
                stored["guild_id"] = gid
            stored.setdefault("type", 1)
            stored.setdefault("description", "")
            self.commands[cmd["name"]] = stored
            out.append(stored)
        return json_response(out)

    def _limit(self) -> int:
        tier = PREMIUM_LIMITS[self.premium_tier]
        return min(tier, self.upload_limit) if self.upload_limit else tier

    def _too_large(self, rec: Recorded) -> web.Response | None:
        if any(len(f.data) > self._limit() for f in rec.files):
            return json_response({"message": "Request entity too large", "code": 40005}, 413)
        return None

    def _store_message(self, rec: Recorded, channel_id: str, *, interaction: dict[str, Any] | None = None,
                       flags: int = 0) -> dict[str, Any]:
        body = rec.json or {}
        message = self.message_payload(self.bot_user, body.get("content") or "", [], mentions=[])
        message["channel_id"] = channel_id
        message["embeds"] = body.get("embeds") or []
        message["components"] = body.get("components") or []
        message["flags"] = flags | body.get("flags", 0)
        message["attachments"] = [self.attachment(f.data, f.filename, f.content_type) for f in rec.files]
        message["allowed_mentions"] = body.get("allowed_mentions")
        if body.get("message_reference"):
            message["message_reference"] = body["message_reference"]
        if interaction is not None:
            message["webhook_id"] = self.app_id
            message["application_id"] = self.app_id
            message["interaction_token"] = interaction["token"]
        self.messages[message["id"]] = message
        rec.message_id = message["id"]
        return message

    async def _callback(self, rec: Recorded, iid: str, token: str) -> web.Response:
        interaction = self.interactions.get(token)
        if interaction is None or interaction["id"] != iid:
            return json_response({"message": "Unknown interaction", "code": 10062}, 404)
        if interaction.get("_answered"):
            return json_response({"message": "Interaction has already been acknowledged.", "code": 40060}, 400)
        interaction["_answered"] = True
        body = rec.json or {}
        kind = body.get("type")
        resource: dict[str, Any] = {"type": kind}
        if kind in (4, 5):
            data = body.get("data") or {}
            original = self._store_message(rec, self.channel_id, interaction=interaction, flags=data.get("flags", 0))
            original.update({"content": data.get("content") or "", "embeds": data.get("embeds") or [],
                             "components": data.get("components") or []})
            interaction["_original"] = original["id"]
            resource["message"] = original
        elif kind == 7 and interaction.get("message"):
            target = self.messages.get(interaction["message"]["id"])
            if target is not None:
                target.update({k: v for k, v in (body.get("data") or {}).items() if k in ("content", "embeds",
                                                                                           "components")})
                resource["message"] = target
        return json_response({"interaction": {"id": iid, "type": interaction["type"]}, "resource": resource})

    def modals(self, interaction: dict[str, Any]) -> list[dict[str, Any]]:
        return [r.json["data"] for r in self.callbacks(interaction) if r.json and r.json.get("type") == 9]

    def _token_message(self, token: str, mid: str) -> dict[str, Any] | None:
        interaction = self.interactions.get(token)
        if interaction is None:
            return None
        if mid == "@original":
            mid = interaction.get("_original", "")
        message = self.messages.get(mid)
        if message is None or message.get("interaction_token") != token:
            return None
        return message

    async def _webhook_edit(self, rec: Recorded, app: str, token: str, mid: str) -> web.Response:
        message = self._token_message(token, mid)
        if message is None:
            return json_response({"message": "Unknown Message", "code": 10008}, 404)
        if (response := self._too_large(rec)) is not None:
            return response
        self._apply_edit(message, rec)
        return json_response(message)

    async def _webhook_get(self, rec: Recorded, app: str, token: str, mid: str) -> web.Response:
        message = self._token_message(token, mid)
        return json_response(message) if message else json_response({"message": "Unknown Message", "code": 10008}, 404)

    async def _webhook_delete(self, rec: Recorded, app: str, token: str, mid: str) -> web.Response:
        message = self._token_message(token, mid)
        if message is not None:
            self.messages.pop(message["id"], None)
        return web.Response(status=204)

    async def _followup(self, rec: Recorded, app: str, token: str) -> web.Response:
        interaction = self.interactions.get(token)
        if interaction is None:
            return json_response({"message": "Unknown Webhook", "code": 10015}, 404)
        if (response := self._too_large(rec)) is not None:
            return response
        message = self._store_message(rec, self.channel_id, interaction=interaction)
        return json_response(message)

    async def _channel_post(self, rec: Recorded, cid: str) -> web.Response:
        if (response := self._too_large(rec)) is not None:
            return response
        nonce = (rec.json or {}).get("nonce")
        if nonce and (rec.json or {}).get("enforce_nonce") and nonce in self.nonces:
            return json_response(self.messages[self.nonces[nonce]])
        message = self._store_message(rec, cid)
        if nonce:
            self.nonces[nonce] = message["id"]
            message["nonce"] = nonce
        return json_response(message)

    async def _channel_edit(self, rec: Recorded, cid: str, mid: str) -> web.Response:
        message = self.messages.get(mid)
        if message is None or message["author"]["id"] != self.app_id or message["flags"] & 64:
            return json_response({"message": "Unknown Message", "code": 10008}, 404)
        self._apply_edit(message, rec)
        return json_response(message)

    async def _channel_get(self, rec: Recorded, cid: str, mid: str) -> web.Response:
        message = self.messages.get(mid)
        if message is None:
            return json_response({"message": "Unknown Message", "code": 10008}, 404)
        return json_response(self._as_seen(message))

    async def _channel_info(self, rec: Recorded, cid: str) -> web.Response:
        return json_response({"id": cid, "type": 0, "name": "clips", "guild_id": self.guild_id, "position": 0,
                              "permission_overwrites": []})

    def _apply_edit(self, message: dict[str, Any], rec: Recorded) -> None:
        body = rec.json or {}
        for key in ("content", "embeds", "components"):
            if key in body:
                message[key] = body[key] or ([] if key != "content" else "")
        if rec.files:  # uploaded with the edit: they replace what the message had
            message["attachments"] = [self.attachment(f.data, f.filename, f.content_type) for f in rec.files]
        elif "attachments" in body:  # the ones listed by id stay, the rest go
            kept = {str(a.get("id")) for a in body["attachments"] or []}
            message["attachments"] = [a for a in message.get("attachments") or [] if a["id"] in kept]
        message["edited_timestamp"] = _iso_now()


def _leaf_options(command: dict[str, Any], sub: str | None) -> list[dict[str, Any]]:
    options = command.get("options") or []
    if sub is None:
        return options
    for option in options:
        if option["name"] == sub:
            return option.get("options") or []
    raise KeyError(sub)


def custom_ids(message: dict[str, Any]) -> list[str]:
    found = []
    for row in message.get("components") or []:
        for comp in row.get("components") or []:
            if "custom_id" in comp:
                found.append(comp["custom_id"])
    return found
