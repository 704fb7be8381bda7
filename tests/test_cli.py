from __future__ import annotations

import argparse
import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from bot.cli import _parser
from tests.conftest import ROOT, clean_env
from tests.support.fake_discord import FakeDiscord


def ltxbot(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", *args], cwd=cwd, env=env or clean_env(), capture_output=True, text=True,
        timeout=120,
    )


def test_run_without_token_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    result = ltxbot("run", cwd=tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert any("DISCORD_TOKEN" in line and "intent" in line for line in lines)
    assert (tmp_path / "config.yaml").is_file()  # created from the example


def test_config_check_passes_on_the_example(tmp_path: Path) -> None:
    result = ltxbot("config", "check", str(ROOT / "config.example.yaml"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_config_check_names_a_bad_key(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("limits:\n  cooldown_seconds: -3\n")
    result = ltxbot("config", "check", "bad.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "limits.cooldown_seconds" in result.stderr and "Traceback" not in result.stderr


def test_db_upgrade_creates_the_schema_in_a_new_data_dir(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("data_dir: fresh\n")
    result = ltxbot("db", "upgrade", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(tmp_path / "fresh" / "ltxbot.db") as db:
        tables = {row[0] for row in db.execute("select name from sqlite_master where type='table'")}
    assert {"jobs", "settings"} <= tables
    listing = ltxbot("jobs", cwd=tmp_path)
    assert listing.returncode == 0 and "No jobs yet" in listing.stdout
    queued = subprocess.run(
        [sys.executable, "-c", "import asyncio\nfrom bot.db.store import JobStore, NewJob\n"
         "async def main():\n    store = JobStore.from_url('sqlite+aiosqlite:///fresh/ltxbot.db')\n"
         "    for _ in range(2):\n        await store.create(NewJob('u', 'waves', {}, 'x.png', '0' * 64))\n"
         "    await store.close()\nasyncio.run(main())"],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60,
    )
    assert queued.returncode == 0, queued.stderr
    detail = ltxbot("job", "2", "--json", cwd=tmp_path)
    assert '"status": "queued"' in detail.stdout and '"queue_position": 2' in detail.stdout


async def test_token_is_not_printed_when_discord_rejects_it(tmp_path: Path) -> None:
    """A real login of ``ltxbot run`` against the loopback fake, which answers 401 to any other token."""
    secret = "not-a-real-token-SECRET123"
    (tmp_path / "config.yaml").write_text("data_dir: d\nlog_level: DEBUG\n")  # DEBUG: the most it ever logs
    fake = FakeDiscord()
    await fake.start()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "tests" / "support" / "fake_bot.py"), fake.url, "run", cwd=tmp_path,
            env=clean_env() | {"DISCORD_TOKEN": secret, "PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        await fake.stop()
    assert [r.status for r in fake.find("GET", r"^/users/@me$")] == [401]  # Discord really said no
    assert proc.returncode == 2 and b"Discord rejected the token" in err, err[-2000:]
    assert secret.encode() not in out + err
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_make_run_builds_the_ltxv_venv_only_when_the_config_enables_it(tmp_path: Path) -> None:
    assert ltxbot("config", "needs-ltxv-venv", cwd=tmp_path).returncode == 1  # no config.yaml: the example's off
    (tmp_path / "config.yaml").write_text("ltxv:\n  enabled: false\n")
    assert ltxbot("config", "needs-ltxv-venv", cwd=tmp_path).returncode == 1
    (tmp_path / "config.yaml").write_text("ltxv:\n  enabled: true\n")
    assert ltxbot("config", "needs-ltxv-venv", cwd=tmp_path).returncode == 0
    # An owner who points ltxv.python at their own interpreter builds it themselves.
    (tmp_path / "config.yaml").write_text("ltxv:\n  enabled: true\n  python: /opt/ltxv/bin/python\n")
    assert ltxbot("config", "needs-ltxv-venv", cwd=tmp_path).returncode == 1
    assert "needs-ltxv-venv" in (ROOT / "Makefile").read_text()


def test_make_install_builds_the_venv_and_runs_nothing(tmp_path: Path) -> None:
    """A worker host has no Discord token: its install step must not start the bot."""
    planned = subprocess.run(["make", "-n", "install", f"VENV={tmp_path / 'venv'}"], cwd=ROOT, env=clean_env(),
                             capture_output=True, text=True, timeout=60)
    assert planned.returncode == 0, planned.stderr
    assert "pip install" in planned.stdout and "needs-ltxv-venv" in planned.stdout
    assert "ltxbot run" not in planned.stdout


# The smallest valid arguments of each subcommand (parsing only; nothing runs).
SUBCOMMAND_ARGS: dict[str, list[str]] = {
    "run": [], "db": ["upgrade"], "jobs": [], "job": ["1"], "config": ["check"], "intake": ["photo.png"],
    "animate": ["photo.png", "waves roll in"], "models": ["tiny", "models"], "finalize": ["1"],
    "worker": [], "workers": [], "drain": ["gpu0"],
}


def test_the_config_test_covers_every_subcommand() -> None:
    actions = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(actions[0].choices) == set(SUBCOMMAND_ARGS)


@pytest.mark.parametrize("command", sorted(SUBCOMMAND_ARGS))
def test_config_is_accepted_before_and_after_the_subcommand(command: str) -> None:
    rest = SUBCOMMAND_ARGS[command]
    assert _parser().parse_args([command, *rest, "--config", "after.yaml"]).config == Path("after.yaml")
    assert _parser().parse_args(["--config", "before.yaml", command, *rest]).config == Path("before.yaml")
    assert _parser().parse_args([command, *rest]).config is None


def test_config_after_the_subcommand_is_the_file_used(tmp_path: Path) -> None:
    (tmp_path / "other.yaml").write_text("data_dir: elsewhere\n")
    result = ltxbot("db", "upgrade", "--config", "other.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "elsewhere" / "ltxbot.db").is_file() and not (tmp_path / "data").exists()
    assert "No jobs yet" in ltxbot("jobs", "--config", "other.yaml", cwd=tmp_path).stdout


def test_a_database_url_is_shown_without_its_password() -> None:
    from bot.cli import _shown_url

    shown = _shown_url("postgresql+asyncpg://ltxbot:s3cret@db.local:5432/ltxbot")
    assert "s3cret" not in shown and "db.local" in shown
