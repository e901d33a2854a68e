"""The deployment files: Dockerfile, .dockerignore, docker-compose.yml and its GPU override.

No Docker daemon is needed: the Python docker-compose 1.29.2 resolves and validates the compose files (`config`),
hadolint lints the Dockerfile, and the rest are checks on the files' text. Both tools live in `.venv-compose`
(`make compose`); the tests that need them skip when it is missing, except under `make test` / CI
(LORAX_REQUIRE_COMPOSE=1), where a missing venv is a failure.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "docker-compose.yml"
GPU = ROOT / "docker-compose.gpu.yml"
PASSWORD = "0123abcd"
RAY_TOKEN = "feedc0de" * 8
PROXY_CALLBACK = "lorax_lite.cluster.routing.proxy_middlewares"
LORAX_SERVICES = ("ray-head", "ray-worker", "admin")


def compose_tool(name: str) -> Path:
    """`name` (docker-compose or hadolint) from the compose venv; skipped (or failed) when missing."""
    path = Path(os.environ.get("LORAX_COMPOSE_BIN", ROOT / ".venv-compose" / "bin")) / name
    if not path.exists():
        message = f"{path} is missing: run `make compose`"
        if os.environ.get("LORAX_REQUIRE_COMPOSE") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_compose(tmp_path: Path, *args: str, password: str | None = PASSWORD,
                ray_token: str | None = RAY_TOKEN) -> subprocess.CompletedProcess[str]:
    """`docker-compose --env-file <empty> ARGS` in the repository, with only PATH, HOME, REDIS_PASSWORD and
    RAY_AUTH_TOKEN set, so neither a local .env nor the caller's LORAX_*/COMPOSE_* variables change the result."""
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    if password is not None:
        env["REDIS_PASSWORD"] = password
    if ray_token is not None:
        env["RAY_AUTH_TOKEN"] = ray_token
    return subprocess.run([str(compose_tool("docker-compose")), "--env-file", str(env_file), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def compose_config(tmp_path: Path, *files: Path, profile: str | None = None) -> dict:
    profile_args = ("--profile", profile) if profile else ()
    file_args = [arg for path in files for arg in ("-f", str(path))]
    result = run_compose(tmp_path, *profile_args, *file_args, "config")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


@pytest.fixture(scope="module")
def cpu_config(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return compose_config(tmp_path_factory.mktemp("compose"), BASE)


@pytest.fixture(scope="module")
def gpu_config(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return compose_config(tmp_path_factory.mktemp("compose"), BASE, GPU)


def test_redis_requires_a_password_and_keeps_its_data(cpu_config: dict) -> None:
    redis = cpu_config["services"]["redis"]
    command = " ".join(redis["command"])
    assert '--requirepass "$$REDIS_PASSWORD"' in command
    assert "--protected-mode yes" in command and "--appendonly yes" in command
    assert redis["environment"]["REDIS_PASSWORD"] == PASSWORD
    assert "redis-data:/data:rw" in redis["volumes"]
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    assert "ports" not in redis  # reachable from the compose network only


def test_ray_head_serves_replicas_on_the_shared_registry_and_store(cpu_config: dict) -> None:
    head = cpu_config["services"]["ray-head"]
    command = head["command"][-1]
    assert "ray start --head --port=6380" in command
    assert "exec lorax-lite serve --ray-address auto --num-replicas" in command
    assert "--host 0.0.0.0 --port 8000" in command
    assert head["environment"]["LORAX_REGISTRY"] == f"redis://:{PASSWORD}@redis:6379/0"
    assert head["environment"]["LORAX_REPLICAS"] == "2"
    assert head["depends_on"]["redis"]["condition"] == "service_healthy"
    assert {"published": 8000, "target": 8000} in head["ports"]
    assert head["shm_size"] == "2gb" and head["init"] is True


@pytest.mark.parametrize("service", LORAX_SERVICES)
def test_every_lorax_container_shares_registry_store_and_model(cpu_config: dict, service: str) -> None:
    config = cpu_config["services"][service]
    assert "adapter-store:/data/store:rw" in config["volumes"]
    assert "models:/models:rw" in config["volumes"]
    assert config["environment"]["LORAX_STORE"] == "/data/store"
    assert config["environment"]["LORAX_REGISTRY"].startswith("redis://")
    assert config["image"] == "lorax-lite:cpu"
    assert set(cpu_config["volumes"]) == {"redis-data", "adapter-store", "models"}


@pytest.mark.parametrize("service", ["ray-head", "ray-worker"])
def test_ray_nodes_share_an_auth_token(cpu_config: dict, service: str) -> None:
    environment = cpu_config["services"][service]["environment"]
    assert environment["RAY_AUTH_MODE"] == "token" and environment["RAY_AUTH_TOKEN"] == RAY_TOKEN
    assert "RAY_AUTH_TOKEN" not in cpu_config["services"]["admin"]["environment"]  # the CLI needs no Ray


def test_ray_worker_scales_and_admin_is_a_profile(cpu_config: dict) -> None:
    worker, admin = cpu_config["services"]["ray-worker"], cpu_config["services"]["admin"]
    assert worker["command"][:3] == ["ray", "start", "--address=ray-head:6380"] and "--block" in worker["command"]
    assert "container_name" not in worker and "ports" not in worker  # `--scale ray-worker=N` needs both absent
    assert worker["profiles"] == ["workers"]
    assert admin["profiles"] == ["admin"]
    assert admin["entrypoint"] == ["lorax-lite"]


def test_cpu_variant_reserves_no_gpu_and_builds_cpu_torch(cpu_config: dict) -> None:
    for name, service in cpu_config["services"].items():
        assert devices(service) == [], name
    assert cpu_config["services"]["ray-head"]["build"]["args"]["TORCH_VARIANT"] == "cpu"
    assert cpu_config["services"]["ray-head"]["environment"]["LORAX_REPLICA_GPUS"] == "0"


def test_gpu_variant_reserves_gpus_for_ray_nodes_only(gpu_config: dict) -> None:
    services = gpu_config["services"]
    for name in ("ray-head", "ray-worker"):
        assert devices(services[name]) == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}], name
        assert services[name]["build"]["args"]["TORCH_VARIANT"] == "cu128"
        assert services[name]["image"] == "lorax-lite:gpu"
    assert devices(services["admin"]) == [] and devices(services["redis"]) == []
    assert float(services["ray-head"]["environment"]["LORAX_REPLICA_GPUS"]) > 0
    assert services["ray-head"]["environment"]["LORAX_REGISTRY"] == f"redis://:{PASSWORD}@redis:6379/0"


def test_admin_profile_resolves(tmp_path: Path) -> None:
    config = compose_config(tmp_path, BASE, profile="admin")
    assert config["services"]["admin"]["depends_on"]["redis"]["condition"] == "service_healthy"


@pytest.mark.parametrize("files", [(BASE,), (BASE, GPU)], ids=["cpu", "gpu"])
def test_compose_refuses_to_start_without_a_redis_password(tmp_path: Path, files: tuple[Path, ...]) -> None:
    result = run_compose(tmp_path, *[arg for path in files for arg in ("-f", str(path))], "config", password=None)
    assert result.returncode != 0
    assert "set REDIS_PASSWORD" in result.stderr
    result = run_compose(tmp_path, *[arg for path in files for arg in ("-f", str(path))], "config", ray_token=None)
    assert result.returncode != 0 and "set RAY_AUTH_TOKEN" in result.stderr


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([str(compose_tool("hadolint")), "--no-color", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_with_the_proxy_callback() -> None:
    instructions = dockerfile_instructions()
    users = [args for op, args in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    env = " ".join(args for op, args in instructions if op == "ENV")
    assert f"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH={PROXY_CALLBACK}" in env
    assert not re.search(r"(PASSWORD|SECRET|TOKEN|API_KEY)=", env)  # no secrets baked in


def test_dockerfile_is_multi_stage_pinned_and_selects_torch() -> None:
    instructions = dockerfile_instructions()
    froms = [args for op, args in instructions if op == "FROM"]
    assert len(froms) == 2 and froms[0].endswith("AS builder") and froms[1].endswith("AS runtime")
    base = next(args for op, args in instructions if op == "ARG" and args.startswith("PYTHON_IMAGE="))
    assert re.fullmatch(r"PYTHON_IMAGE=python:\d+\.\d+\.\d+-slim-\w+", base)  # a full version tag, never latest
    args = {args.split("=", 1)[0]: args.split("=", 1)[-1] for op, args in instructions if op == "ARG"}
    assert args["TORCH_VARIANT"] == "cpu" and args["FETCH_MODEL"] == "1"
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in args["TORCH_INDEX_URL"]
    runs = " ".join(args for op, args in instructions if op == "RUN")
    assert "rm -rf /var/lib/apt/lists/*" in runs
    healthcheck = next(args for op, args in instructions if op == "HEALTHCHECK")
    assert "http://127.0.0.1:8000/health" in healthcheck
    assert "8000" in next(args for op, args in instructions if op == "EXPOSE").split()


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".env", ".git", ".venv*", "models/", "data/"} <= ignored
    assert not ignored & {"lorax_lite", "lorax_lite/", "adapters", "adapters/", "pyproject.toml", "README.md"}


def test_proxy_callback_names_a_real_function() -> None:
    module_name, _, attribute = PROXY_CALLBACK.rpartition(".")
    if importlib.util.find_spec("lorax_lite.cluster") is None:
        pytest.skip("lorax_lite.cluster is not in this checkout yet")
    assert callable(getattr(importlib.import_module(module_name), attribute))
