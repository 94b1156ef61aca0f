"""Every compose file of the repository is valid: `docker-compose config` checks a file
without a Docker engine (Debian's docker-compose 1.29, installed by scripts/test.sh)."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import ROOT


def compose_files() -> list[Path]:
    return sorted(
        path
        for pattern in ("*compose*.yml", "*compose*.yaml")
        for path in ROOT.rglob(pattern)
        if not any(part.startswith(".") for part in path.relative_to(ROOT).parts)
    )


def test_the_repository_has_a_compose_file():
    assert ROOT / "docker-compose.yml" in compose_files()


@pytest.mark.parametrize("path", compose_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_compose_file_is_valid(path):
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is missing: scripts/test.sh installs it (apt-get install docker-compose)")
    checked = subprocess.run(
        ["docker-compose", "-f", str(path), "config", "--quiet"], cwd=path.parent, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize("path", compose_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_the_server_has_a_readiness_healthcheck(path):
    """Each service built from this repository is healthy when its /readyz answers 200."""
    services = yaml.safe_load(path.read_text())["services"]
    built = [name for name, service in services.items() if "build" in service]
    assert built, path
    for name in built:
        probe = " ".join(services[name]["healthcheck"]["test"])
        assert "/readyz" in probe, name
