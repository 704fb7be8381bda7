"""Run the real ``ltxbot`` command line against the loopback fake Discord.

Usage: ``python tests/support/fake_bot.py http://127.0.0.1:PORT run --config CONFIG``. Only the
two hosts discord.py hard-codes are redirected (see ``tests/support/fake_discord.py``);
everything else is the production code path.
"""

from __future__ import annotations

import sys

import yarl
from discord.gateway import DiscordWebSocket
from discord.http import Route

from bot.cli import main

if __name__ == "__main__":
    base = sys.argv[1]
    Route.BASE = f"{base}/api/v10"
    DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(base.replace("http://", "ws://", 1) + "/gateway/")
    sys.exit(main(sys.argv[2:]))
