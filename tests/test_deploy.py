"""The deployment files in deploy/: what a container or a unit needs to start on a fresh host."""

from __future__ import annotations

from typing import Any

import yaml

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"


def _ltxbot_services() -> dict[str, dict[str, Any]]:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return {name: spec for name, spec in compose["services"].items() if name != "db"}


def _target(volume: str) -> str:
    """Where a ``SOURCE:TARGET[:MODE]`` mount lands (the source may hold ``${VAR:-default}``)."""
    return volume.removesuffix(":ro").removesuffix(":rw").rsplit(":", 1)[1]


def test_compose_builds_its_own_venv_and_mounts_config_and_models() -> None:
    """A host-built .venv names host paths in its scripts and links: the containers build theirs."""
    services = _ltxbot_services()
    assert {"frontend", "worker-gpu0"} <= set(services)
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "make install" in dockerfile
    assert ".venv" in (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for name, spec in services.items():
        assert spec["build"]["dockerfile"] == "deploy/Dockerfile", name
        mounts = [_target(str(volume)) for volume in spec["volumes"]]
        assert "/ltxbot" not in mounts and not any(m.startswith("/ltxbot/.venv") for m in mounts), name
        assert {"/ltxbot/config.yaml", "/models"} <= set(mounts), name


def test_the_worker_unit_starts_after_a_local_postgresql_without_wanting_one() -> None:
    unit = (DEPLOY / "ltxbot-worker@.service").read_text()
    after = next(line for line in unit.splitlines() if line.startswith("After="))
    wants = next(line for line in unit.splitlines() if line.startswith("Wants="))
    assert "postgresql.service" in after and "postgresql.service" not in wants


def test_the_front_end_unit_says_what_its_environment_file_holds() -> None:
    unit = (DEPLOY / "ltxbot-frontend.service").read_text()
    assert "# DISCORD_TOKEN=" in unit and "EnvironmentFile=" in unit


