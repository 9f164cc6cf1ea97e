"""Static checks of infra/ and conf/infra/: no service, container or Ray cluster is started.

Each file is checked with the tool that will consume it where that tool is installed: Ray's own
autoscaler schema, Prefect's prefect.yaml models, flows and CronSchedule, the project's config
loader, `docker compose config` when a Compose client exists.
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import inspect
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
COMPOSE_FILE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
PREFECT_FILE = INFRA / "prefect" / "prefect.yaml"
KUBERAY_FILE = INFRA / "kuberay" / "raycluster.yaml"
RAY_CLUSTER_FILES = [INFRA / "ray" / "cluster.yaml", INFRA / "ray" / "cluster-aws.yaml"]
OVERLAYS = ROOT / "conf" / "infra"
LOCALHOST = "127.0.0.1"

# `${VAR}`, `${VAR:-default}`, `${VAR:?message}`, ... but not the escaped `$${VAR}`
VAR_REF = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")
BARE_VAR = re.compile(r"(?<!\$)\$[A-Za-z_]")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|KEY", re.I)


# ----------------------------------------------------------------------------- helpers

def load_yaml(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def parse_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        out[key.strip()] = value.strip()
    return out


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def published_ports(service: dict) -> list[tuple[str | None, str, str]]:
    """(host_ip, host_port, container_port) of each published port (short and long syntax)."""
    out = []
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            out.append((p.get("host_ip"), str(p.get("published", "")), str(p["target"])))
            continue
        parts = str(p).split(":")
        if len(parts) == 3:
            out.append((parts[0], parts[1], parts[2].split("/")[0]))
        elif len(parts) == 2:
            out.append((None, parts[0], parts[1].split("/")[0]))
        else:
            out.append((None, "", parts[0]))
    return out


def command_list(service: dict, key: str = "command") -> list[str]:
    cmd = service.get(key) or []
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def host_port(compose: dict, service: str, container_port: str) -> tuple[str | None, str]:
    for ip, hp, cp in published_ports(compose["services"][service]):
        if cp == container_port:
            return ip, hp
    raise AssertionError(f"{service} publishes no port {container_port}")


def mc_buckets() -> set[str]:
    script = (INFRA / "minio" / "init-buckets.sh").read_text()
    found = set()
    for line in script.splitlines():
        if line.strip().startswith("mc mb"):
            found |= {w.split("/", 1)[1] for w in line.split() if w.startswith("local/")}
    return found


@pytest.fixture(scope="module")
def compose() -> dict:
    data = load_yaml(COMPOSE_FILE)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict) and data["services"]
    return data


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return parse_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def prefect_yaml() -> dict:
    return load_yaml(PREFECT_FILE)


# ----------------------------------------------------------------------------- docker compose

def test_compose_services_have_image_or_build(compose):
    services = compose["services"]
    assert {"postgres", "prefect-server", "mlflow", "minio", "minio-init"} <= set(services)
    for name, svc in services.items():
        assert svc.get("image") or svc.get("build"), f"service {name}: neither image nor build"
        build = svc.get("build")
        if build:
            context = INFRA / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
            assert dockerfile.is_file(), f"service {name}: {dockerfile} missing"


def test_compose_images_pinned_as_asked(compose):
    s = compose["services"]
    assert s["prefect-server"]["image"] == "prefecthq/prefect:3.8.8-python3.11"
    assert command_list(s["prefect-server"])[:5] == ["prefect", "server", "start", "--host", "0.0.0.0"]
    assert s["minio-init"]["image"].startswith("minio/mc:")
    assert s["minio"]["image"].startswith("minio/minio:RELEASE.")  # not :latest
    assert s["postgres"]["image"].startswith("postgres:")


def test_every_published_port_is_bound_to_localhost(compose):
    seen = 0
    for name, svc in compose["services"].items():
        for ip, hp, cp in published_ports(svc):
            seen += 1
            assert ip == LOCALHOST, f"service {name}: port {hp}:{cp} is bound to {ip or 'all interfaces'}"
    assert seen >= 4  # prefect 4200, mlflow 5000, minio 9000 + 9001
    assert not compose["services"]["postgres"].get("ports"), "postgres should not be published"


def test_no_literal_secrets_in_compose(compose):
    for name, svc in compose["services"].items():
        for key, value in env_of(svc).items():
            if SECRET_NAME.search(key):
                m = VAR_REF.fullmatch(value)
                assert m, f"service {name}: {key} is a literal value, use ${{VAR:?...}}"
                assert m.group(2) in ("?", ":?"), f"service {name}: {key} has a default ({value!r})"
            # credentials inside URLs (postgresql://user:pass@host) must be references too
            for url in re.findall(r"[a-z][a-z0-9+.-]*://\S+", value):
                userinfo = url.split("://", 1)[1].split("@", 1)
                if len(userinfo) == 2 and ":" in userinfo[0]:
                    password = userinfo[0].split(":", 1)[1]
                    assert VAR_REF.fullmatch(password), f"service {name}: {key} has a literal password in {url!r}"
        for word in command_list(svc) + command_list(svc, "entrypoint"):
            assert not re.search(r"://[^/\s:@]+:[^@\s$]+@", word), f"service {name}: credentials in command {word!r}"


def strings_in(node) -> list[str]:
    """Every key and value of parsed YAML as text (what compose interpolates; comments are not)."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in strings_in(k) + strings_in(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings_in(v)]
    return [] if node is None else [str(node)]


def test_compose_variables_are_in_env_example(compose, env_example):
    text = "\n".join(strings_in(compose))
    assert not BARE_VAR.search(text), "use ${VAR} (or $$ for the container's shell), not $VAR"
    refs = VAR_REF.findall(text)
    assert refs
    required = {var for var, op, _ in refs if op in ("", "?", ":?")}
    missing = required - set(env_example)
    assert not missing, f"infra/.env.example lacks {sorted(missing)}"
    unused = set(env_example) - {var for var, _, _ in refs}
    assert not unused, f"infra/.env.example sets variables the compose file never uses: {sorted(unused)}"


def test_env_example_holds_placeholders_only(env_example):
    text = ENV_EXAMPLE.read_text()
    assert "openssl rand" in text
    secrets = {k: v for k, v in env_example.items() if re.search(r"PASSWORD|SECRET", k)}
    assert len(secrets) >= 6
    for key, value in secrets.items():
        assert value == "change-me", f"{key}: .env.example must hold a placeholder, not a value"
    assert ".env" in (INFRA / ".gitignore").read_text().split()


def test_healthchecks_and_dependencies(compose):
    services = compose["services"]
    for name in ("postgres", "minio", "mlflow", "prefect-server"):
        hc = services[name].get("healthcheck") or {}
        assert hc.get("test") and not hc.get("disable"), f"{name}: no healthcheck"
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        for target, spec in deps.items():
            assert target in services, f"{name} depends on unknown service {target}"
            cond = spec.get("condition", "service_started")
            assert cond in ("service_started", "service_healthy", "service_completed_successfully")
            if cond == "service_healthy":
                assert services[target].get("healthcheck"), f"{name} waits for {target} health, it has no check"
            if cond == "service_completed_successfully":
                assert services[target].get("restart", "no") == "no", f"{target} is one-shot: restart must be 'no'"
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["mlflow"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"


def test_named_volumes_are_declared(compose):
    declared = set(compose.get("volumes") or {})
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes") or []:
            source = vol["source"] if isinstance(vol, dict) else str(vol).split(":", 1)[0]
            if source.startswith((".", "/", "~")):
                assert (INFRA / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
    assert {"postgres-data", "minio-data"} <= declared


def test_mlflow_server_postgres_s3_and_image(compose):
    svc = compose["services"]["mlflow"]
    cmd, env = command_list(svc), env_of(svc)
    assert cmd[:2] == ["mlflow", "server"]
    assert "--serve-artifacts" in cmd
    dest = cmd[cmd.index("--artifacts-destination") + 1]
    assert dest == "s3://mlflow/"
    backend = cmd[cmd.index("--backend-store-uri") + 1] if "--backend-store-uri" in cmd else env["MLFLOW_BACKEND_STORE_URI"]
    assert backend.startswith("postgresql://")
    assert urlsplit(VAR_REF.sub("secret", backend)).path == "/mlflow"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)
    assert "0.0.0.0" in cmd and "5000" in cmd
    # the image: official MLflow 3.x, the same release as the project's client, plus the drivers
    dockerfile = (INFRA / "mlflow" / "Dockerfile").read_text()
    assert re.search(r"^FROM ghcr\.io/mlflow/mlflow:\$\{MLFLOW_VERSION\}", dockerfile, re.M)
    default = re.search(r"^ARG MLFLOW_VERSION=(v3\.\d+\.\d+)$", dockerfile, re.M).group(1)
    assert svc["build"]["args"]["MLFLOW_VERSION"] == default
    assert default == "v" + importlib.metadata.version("mlflow")
    assert "psycopg2-binary" in dockerfile and "boto3" in dockerfile


def test_buckets_policies_and_databases(compose):
    assert {"mlflow", "dvc"} <= mc_buckets()
    script = (INFRA / "minio" / "init-buckets.sh").read_text()
    for policy_file in re.findall(r"/init/(policy-\w+\.json)", script):
        policy = json.loads((INFRA / "minio" / policy_file).read_text())
        resources = {r for st in policy["Statement"] for r in st["Resource"]}
        bucket = policy_file.removeprefix("policy-").removesuffix(".json")
        assert resources == {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}, policy_file
    assert "MINIO_ROOT_PASSWORD" not in re.sub(r"MC_HOST_local=.*", "", script), "root password on a command line"
    init_sql = (INFRA / "postgres" / "init-databases.sh")
    assert init_sql.stat().st_mode & stat.S_IXUSR
    text = init_sql.read_text()
    for db in ("prefect", "mlflow"):
        assert f"CREATE DATABASE {db} OWNER {db}" in text
    penv = env_of(compose["services"]["prefect-server"])
    assert penv["PREFECT_SERVER_DATABASE_NAME"] == penv["PREFECT_SERVER_DATABASE_USER"] == "prefect"
    assert penv["PREFECT_SERVER_DATABASE_DRIVER"] == "postgresql+asyncpg"
    assert penv["PREFECT_SERVER_DATABASE_HOST"] == "postgres"


def _compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        try:
            ok = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=20).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_docker_compose_config(tmp_path, env_example):
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no Docker Compose client (docker compose / docker-compose) on this machine")
    env_file = tmp_path / "env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env_example.items()))
    clean_env = {k: v for k, v in os.environ.items() if k not in env_example}
    ok = subprocess.run([*cli, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "config", "-q"],
                        capture_output=True, text=True, env=clean_env, timeout=60)
    assert ok.returncode == 0, ok.stderr
    empty = tmp_path / "empty"
    empty.write_text("")
    refused = subprocess.run([*cli, "--env-file", str(empty), "-f", str(COMPOSE_FILE), "config", "-q"],
                             capture_output=True, text=True, env=clean_env, timeout=60)
    assert refused.returncode != 0 and "infra/.env" in refused.stderr


def test_gen_env_writes_random_secrets(tmp_path, env_example):
    if not (shutil.which("sh") and shutil.which("openssl")):
        pytest.skip("needs sh and openssl")
    out = tmp_path / "generated.env"
    run = subprocess.run(["sh", str(INFRA / "gen-env.sh"), str(out)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    generated = parse_env_file(out)
    assert set(generated) == set(env_example)
    secrets = [v for k, v in generated.items() if env_example[k] == "change-me"]
    assert len(secrets) >= 6 and len(set(secrets)) == len(secrets)
    assert all(re.fullmatch(r"[0-9a-f]{32}", v) for v in secrets)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    again = subprocess.run(["sh", str(INFRA / "gen-env.sh"), str(out)], capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and parse_env_file(out) == generated  # never overwrites


# ----------------------------------------------------------------------------- Ray cluster launcher

@pytest.mark.parametrize("path", RAY_CLUSTER_FILES, ids=lambda p: p.name)
def test_ray_cluster_config_validates_against_ray_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_yaml(path)
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does before validating
    validate_config(prepared)

    import jsonschema

    broken = copy.deepcopy(prepared)
    broken["no_such_field"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)


@pytest.mark.parametrize("path", RAY_CLUSTER_FILES, ids=lambda p: p.name)
def test_ray_cluster_installs_project_and_gpu_workers(path):
    c = load_yaml(path)
    assert c["cluster_name"] == "qwen3-embedding"
    assert "." in c["file_mounts"].values(), "the project folder is not synced to the nodes"
    project_mount = next(k for k, v in c["file_mounts"].items() if v == ".")
    assert any("pip install -e" in cmd and project_mount in cmd for cmd in c["setup_commands"])
    assert {".venv", "infra/.env"} <= set(c["rsync_exclude"])
    head = " ".join(c["head_start_ray_commands"])
    worker = " ".join(c["worker_start_ray_commands"])
    assert "--head" in head and "--num-gpus=0" in head and "--ray-client-server-port=10001" in head
    assert "--num-gpus" in worker
    assert "dashboard-host=0.0.0.0" not in head
    assert "shared storage" in path.read_text().lower()
    if c["provider"]["type"] != "local":
        types = c["available_node_types"]
        assert types[c["head_node_type"]]["resources"].get("GPU", 0) == 0
        gpu_types = [n for n, t in types.items() if n != c["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
        assert gpu_types, "no GPU worker node type"
    else:
        assert c["provider"]["head_ip"] and c["provider"]["worker_ips"]


# ----------------------------------------------------------------------------- KubeRay

def test_kuberay_raycluster_manifest():
    docs = [d for d in yaml.safe_load_all(KUBERAY_FILE.read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    rc, pvc = by_kind["RayCluster"], by_kind["PersistentVolumeClaim"]
    assert rc["apiVersion"] == "ray.io/v1" and pvc["apiVersion"] == "v1"
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    spec = rc["spec"]
    assert spec["rayVersion"] == importlib.metadata.version("ray")
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # KubeRay wants strings
    groups = spec["workerGroupSpecs"]
    assert groups

    def mounts_shared(pod_spec: dict) -> set[str]:
        claims = {v["name"] for v in pod_spec["volumes"]
                  if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]}
        assert claims, "the shared PVC is not a volume of the pod"
        return {m["mountPath"] for c in pod_spec["containers"] for m in c.get("volumeMounts", [])
                if m["name"] in claims}

    head_pod = head["template"]["spec"]
    head_mounts = mounts_shared(head_pod)
    assert {"/app/runs", "/app/datasets", "/app/data"} <= head_mounts
    assert any(p["containerPort"] == 10001 for c in head_pod["containers"] for p in c.get("ports", []))
    image = head_pod["containers"][0]["image"]
    gpu_groups = 0
    for g in groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        pod = g["template"]["spec"]
        assert mounts_shared(pod) == head_mounts, "workers must see the shared folders at the same paths"
        for c in pod["containers"]:
            assert c["image"] == image
            gpus = [int(c["resources"].get(part, {}).get("nvidia.com/gpu", 0)) for part in ("requests", "limits")]
            if gpus[1] >= 1:
                assert gpus[0] == gpus[1]
                gpu_groups += 1
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    ray_image = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\S+)$", dockerfile, re.M).group(1)
    assert ray_image.startswith(spec["rayVersion"] + "-py311")
    assert "pip install" in dockerfile and "-e /app" in dockerfile


# ----------------------------------------------------------------------------- Prefect deployments

def _flow(entrypoint: str):
    import prefect.flows

    path, _, func = entrypoint.partition(":")
    assert path.endswith(".py") and func, f"entrypoint {entrypoint!r} is not path.py:function"
    assert (ROOT / path).is_file(), f"entrypoint file {path} missing"
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    obj = getattr(module, func)
    assert isinstance(obj, prefect.flows.Flow), f"{entrypoint} is not a Prefect flow"
    return obj


def test_prefect_yaml_matches_prefects_model(prefect_yaml):
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(prefect_yaml)
    assert {d.name for d in model.deployments} == {"pipeline", "retrain-weekly"}
    assert {d.entrypoint for d in model.deployments} == {"flows/pipeline.py:pipeline", "flows/retrain.py:retrain"}


def test_prefect_deployments_resolve_to_flows_with_valid_parameters(prefect_yaml):
    from tasks.config import load_config

    workdirs = [step["prefect.deployments.steps.set_working_directory"]["directory"]
                for step in prefect_yaml["pull"] if "prefect.deployments.steps.set_working_directory" in step]
    assert workdirs
    for dep in prefect_yaml["deployments"]:
        flow = _flow(dep["entrypoint"])
        params = dep.get("parameters") or {}
        assert {"preset", "project_dir"} <= set(params)
        inspect.signature(flow.fn).bind_partial(**params)  # no unknown parameter
        flow.validate_parameters(params)  # and the types fit (what enforce_parameter_schema checks)
        assert params["project_dir"] == workdirs[-1], "project_dir differs from the pull step's directory"
        cfg = load_config(params["preset"], params.get("overrides") or [], files=[
            ROOT / f for f in params.get("config_files") or []])
        assert cfg.preset == params["preset"]

    bad = {"preset": "smol", "no_such_parameter": 1}
    with pytest.raises(TypeError):
        inspect.signature(_flow("flows/pipeline.py:pipeline").fn).bind_partial(**bad)


def test_prefect_schedule_is_a_valid_cron(prefect_yaml):
    from prefect.client.schemas.schedules import CronSchedule

    crons = {}
    for dep in prefect_yaml["deployments"]:
        for sched in dep.get("schedules") or []:
            crons[dep["name"]] = CronSchedule(cron=sched["cron"], timezone=sched.get("timezone"))
    assert set(crons) == {"retrain-weekly"}
    assert crons["retrain-weekly"].cron == "0 3 * * 0"
    assert next(d for d in prefect_yaml["deployments"] if d["name"] == "retrain-weekly")["entrypoint"] == \
        "flows/retrain.py:retrain"
    with pytest.raises(ValueError):
        CronSchedule(cron="61 3 * * 0")


def test_work_pool_name_matches_everywhere(prefect_yaml):
    pools = {dep["work_pool"]["name"] for dep in prefect_yaml["deployments"]}
    assert len(pools) == 1
    pool = pools.pop()
    for doc in (INFRA / "README.md", PREFECT_FILE):
        text = doc.read_text()
        created = re.findall(r"prefect work-pool create (\S+) --type (\S+)", text)
        started = re.findall(r"prefect worker start --pool (\S+)", text)
        assert created and started, f"{doc.name}: work pool commands missing"
        assert {name for name, _ in created} == {pool} and set(started) == {pool}, doc.name
        assert {kind for _, kind in created} == {"process"}
        assert "prefect deploy --all" in text


# ----------------------------------------------------------------------------- conf/infra overlays

EXPECTED_OVERLAYS = {
    "local-compose.yaml": {"ray_address": None, "mlflow_tracking_uri": "http://127.0.0.1:5000",
                           "prefect_api_url": "http://127.0.0.1:4200/api", "dvc_remote": "minio",
                           "mlflow_experiment": "qwen3-embedding"},
    "ray-cluster.yaml": {"ray_address": "auto", "mlflow_tracking_uri": None},
    "kuberay.yaml": {"ray_address": "auto", "dvc_remote": "minio"},
}


def test_overlays_present():
    assert {p.name for p in OVERLAYS.glob("*.yaml")} == set(EXPECTED_OVERLAYS)


@pytest.mark.parametrize("name", sorted(EXPECTED_OVERLAYS))
def test_overlay_loads_through_project_config(name):
    from tasks.config import load_config

    path = OVERLAYS / name
    assert set(load_yaml(path)) == {"infra"}, "an infra overlay sets infra.* only"
    infra = load_config("micro", files=[path]).infra
    for key, value in EXPECTED_OVERLAYS[name].items():
        assert getattr(infra, key) == value, f"{name}: infra.{key}"


def test_overlays_compose_in_either_order():
    from tasks.config import load_config

    a, b = OVERLAYS / "ray-cluster.yaml", OVERLAYS / "local-compose.yaml"
    for files in ([a, b], [b, a]):
        infra = load_config("micro", files=files).infra
        assert infra.ray_address == "auto" and infra.mlflow_tracking_uri == "http://127.0.0.1:5000"


def test_local_compose_overlay_matches_the_compose_stack(compose):
    from tasks.config import load_config

    infra = load_config("micro", files=[OVERLAYS / "local-compose.yaml"]).infra
    mlflow = urlsplit(infra.mlflow_tracking_uri)
    assert (mlflow.hostname, str(mlflow.port)) == host_port(compose, "mlflow", "5000")
    prefect = urlsplit(infra.prefect_api_url)
    assert (prefect.hostname, str(prefect.port)) == host_port(compose, "prefect-server", "4200")
    assert prefect.path == "/api"
    # the DVC remote the overlay names is the one the README adds, on a bucket the stack creates,
    # at the S3 port the stack publishes
    readme = (INFRA / "README.md").read_text()
    remote, bucket = re.search(r"dvc remote add (\S+) s3://([^/\s]+)/", readme).groups()
    assert remote == infra.dvc_remote and bucket in mc_buckets()
    endpoint = urlsplit(re.search(rf"dvc remote modify {remote} endpointurl (\S+)", readme).group(1))
    assert (endpoint.hostname, str(endpoint.port)) == host_port(compose, "minio", "9000")
    assert f"export PREFECT_API_URL={infra.prefect_api_url}" in readme
    assert "--local" in readme and "secret_access_key" in readme
