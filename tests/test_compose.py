"""Every compose file of the repository is valid: `docker-compose config` checks a file
without a Docker engine (Debian's docker-compose 1.29, installed by scripts/test.sh). The
Grafana of docker-compose.yml is safe by default: no anonymous access, passwords that must
be given, this host alone."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import ROOT


# What a compose file requires from the environment.
REQUIRED = {"GRAFANA_ADMIN_PASSWORD": "a-grafana-admin-password", "GRAFANA_DB_PASSWORD": "a-grafana-db-password"}


def compose_files() -> list[Path]:
    return sorted(
        path
        for pattern in ("*compose*.yml", "*compose*.yaml")
        for path in ROOT.rglob(pattern)
        if not any(part.startswith(".") for part in path.relative_to(ROOT).parts)
    )


def test_the_repository_has_a_compose_file():
    assert ROOT / "docker-compose.yml" in compose_files()


def compose_config(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`docker-compose config` of the file with that environment (and no other GRAFANA_*)."""
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is missing: scripts/test.sh installs it (apt-get install docker-compose)")
    environment = {name: value for name, value in os.environ.items() if not name.startswith("GRAFANA_")}
    return subprocess.run(
        ["docker-compose", "-f", str(path), "config"], cwd=path.parent, env={**environment, **env},
        capture_output=True, text=True,
    )  # fmt: skip


@pytest.mark.parametrize("path", compose_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_compose_file_is_valid(path):
    checked = compose_config(path, REQUIRED)
    assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_grafanas_passwords_must_be_given(missing):
    for value in (None, ""):
        env = {name: given for name, given in REQUIRED.items() if name != missing}
        if value is not None:
            env[missing] = value
        checked = compose_config(ROOT / "docker-compose.yml", env)
        assert checked.returncode != 0
        assert f"set {missing}, the password of Grafana's" in checked.stderr, checked.stderr


def test_grafana_is_safe_by_default():
    services = yaml.safe_load(compose_config(ROOT / "docker-compose.yml", REQUIRED).stdout)["services"]
    grafana = services["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert grafana["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == REQUIRED["GRAFANA_ADMIN_PASSWORD"]
    # The data source's password (grafana/provisioning/datasources/workers.yml), and the same
    # for the server's `grafana-role create --password-env GRAFANA_DB_PASSWORD`.
    assert grafana["GRAFANA_DB_PASSWORD"] == REQUIRED["GRAFANA_DB_PASSWORD"]
    assert services["server"]["environment"]["GRAFANA_DB_PASSWORD"] == REQUIRED["GRAFANA_DB_PASSWORD"]
    assert services["grafana"]["ports"] == ["127.0.0.1:3000:3000/tcp"]  # this host alone
    published = compose_config(ROOT / "docker-compose.yml", {**REQUIRED, "GRAFANA_ADDRESS": "0.0.0.0"}).stdout
    assert yaml.safe_load(published)["services"]["grafana"]["ports"] == ["0.0.0.0:3000:3000/tcp"]


@pytest.mark.parametrize("path", compose_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_the_server_has_a_readiness_healthcheck(path):
    """Each service built from this repository is healthy when its /readyz answers 200."""
    services = yaml.safe_load(path.read_text())["services"]
    built = [name for name, service in services.items() if "build" in service]
    assert built, path
    for name in built:
        probe = " ".join(services[name]["healthcheck"]["test"])
        assert "/readyz" in probe, name
