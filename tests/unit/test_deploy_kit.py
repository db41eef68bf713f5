"""deploy/ checked against the code, since Docker, systemd and Kubernetes do not run here:
every file parses; every `fleetmind ...` command line in units, compose, manifests and the
READMEs is one the real argument parser accepts; each config a command names is shipped
and loads through the real config loaders; ports, mounted paths and names agree across
files; and every metric the Grafana dashboard queries is one the metrics modules define."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleetmind.cli.main import build_parser
from fleetmind.client.metrics import SiteMetrics
from fleetmind.client.model import base_model_hash
from fleetmind.client.site_config import SiteConfig
from fleetmind.server.config import ServerConfig, parse_config, split_listen
from fleetmind.server.metrics import ServerMetrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose"
TOY_MODEL = ROOT / "sim" / "toy_model"


# ---- reading the kit ---------------------------------------------------------------------


def load_yaml(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit: section -> key -> values (systemd allows a key more than once)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"{path}:{number}: not a key=value line: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE / "compose.yaml")[0]


def manifests() -> list[dict[str, Any]]:
    return [doc for path in sorted((DEPLOY / "k8s").glob("*.yaml")) for doc in load_yaml(path)]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in manifests() if doc["kind"] == kind]


def containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    return deployment["spec"]["template"]["spec"]["containers"]


def shell_commands(text: str) -> list[list[str]]:
    """`fleetmind ...` invocations in shell text (in command position: at a line's start,
    after ; & | ( do then or `--`, or as .../bin/fleetmind): continuations joined, each cut
    at the first ; & | > or ), shell variables replaced by a word."""
    joined = re.sub(r"\\\n\s*", " ", text)
    found = []
    for match in re.finditer(r"(?:(?:^|[;&|(]|\bdo\b|\bthen\b|\s--)\s*|/bin/)"
                             r"fleetmind (?P<rest>[^;&|>)\n]*)", joined, flags=re.M):
        words = shlex.split(match["rest"], comments=True)
        found.append(["fleetmind", *(re.sub(r"\$\{?\w+\}?", "site-0", w) for w in words)])
    return found


def code_blocks(markdown: str) -> str:
    return "\n".join(re.findall(r"```(?:bash|sh)?\n(.*?)```", markdown, flags=re.S))


def readme_deploy_section() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## Deploy\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, "README.md has no '## Deploy' section"
    return match[1]


def all_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every fleetmind command the kit and the READMEs run."""
    found: list[tuple[str, list[str]]] = []
    for path in sorted((DEPLOY / "systemd").glob("*.service")):
        for line in unit(path)["Service"]["ExecStart"]:
            argv = shlex.split(line.replace("%i", "site-0"))
            found.append((path.name, [Path(argv[0]).name, *argv[1:]]))
    for name, service in compose()["services"].items():
        if "fleetmind" in service.get("image", ""):
            found.append((f"compose {name}", list(service["command"])))
    for deployment in of_kind("Deployment"):
        for container in containers(deployment):
            found.append((f"k8s {container['name']}",
                          [*container.get("command", []), *container.get("args", [])]))
    for where, text in (("deploy/README.md", (DEPLOY / "README.md").read_text()),
                        ("README.md Deploy", readme_deploy_section())):
        found += [(where, argv) for argv in shell_commands(code_blocks(text))]
    return found


def parse(argv: list[str]) -> argparse.Namespace:
    assert argv[0] == "fleetmind", argv
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return build_parser().parse_args(argv[1:])
    except SystemExit:
        raise AssertionError(f"`{shlex.join(argv)}` is refused: {errors.getvalue()}") from None


def family_samples(registry) -> set[str]:
    """Every sample name a registry's families expose, whether or not it has a value yet."""
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",),
                "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("_sum", "_count", "_created", ""), "info": ("_info",)}
    return {family.name + suffix for family in registry.collect()
            for suffix in suffixes.get(family.type, ("",))}


METRICS = family_samples(ServerMetrics().registry) | family_samples(SiteMetrics().registry)


def toy_adapter() -> dict[str, Any]:
    """What an aggregator config's [adapter] must say for the committed toy model."""
    config = json.loads((TOY_MODEL / "config.json").read_text())
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    modules = [{"name": f"model.layers.{layer}.mlp.{name}", "in_features": a,
                "out_features": b}
               for layer in range(config["num_hidden_layers"])
               for name, (a, b) in (("gate_proj", (hidden, inner)), ("up_proj", (hidden, inner)),
                                    ("down_proj", (inner, hidden)))]
    # The hash a site checks a version against before activating it.
    return {"base_model_sha256": base_model_hash(TOY_MODEL), "modules": modules}


# ---- where each command's config comes from ---------------------------------------------


def shipped_configs() -> list[tuple[str, str, dict[str, Any], dict[str, str]]]:
    """(where, "server" | "client", parsed config, mounts) for every `run --config` command:
    the config file it names, found through the systemd layout (/etc/fleetmind is
    deploy/config), the compose volumes or the Kubernetes ConfigMap; `mounts` maps each
    container path the process sees to what provides it there."""
    found = []
    for path in sorted((DEPLOY / "systemd").glob("*.service")):
        service = unit(path)["Service"]
        argv = shlex.split(service["ExecStart"][0].replace("%i", "site-0"))
        config = Path(parse([Path(argv[0]).name, *argv[1:]]).config)
        shipped = DEPLOY / "config" / config.relative_to("/etc/fleetmind")
        assert shipped.is_file(), f"{path.name} runs {config}; ship it as {shipped}"
        state = "/var/lib/" + service["StateDirectory"][0].replace("%i", "site-0")
        found.append((path.name, argv[1], tomllib.loads(shipped.read_text()),
                      {state: "StateDirectory", "/etc/fleetmind": "deploy/config + certs",
                       "/opt/fleetmind": "the install"}))
    for name, service in compose()["services"].items():
        if "fleetmind" not in service.get("image", ""):
            continue
        mounts = {}
        for volume in service["volumes"]:
            source, target = volume.split(":")[:2]
            mounts[target] = source
        config = str(parse(service["command"]).config)
        assert config in mounts, f"compose {name}: --config {config} is not mounted"
        shipped = COMPOSE / mounts[config]
        assert shipped.is_file(), f"compose {name} mounts {mounts[config]}: not shipped"
        found.append((f"compose {name}", service["command"][1],
                      tomllib.loads(shipped.read_text()), mounts))
    maps = {doc["metadata"]["name"]: doc["data"] for doc in of_kind("ConfigMap")}
    for deployment in of_kind("Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in containers(deployment):
            argv = [*container.get("command", []), *container.get("args", [])]
            config = str(parse(argv).config)
            mounts = {}
            for mount in container["volumeMounts"]:
                volume = volumes[mount["name"]]
                kind = next(k for k in volume if k != "name")
                mounts[mount["mountPath"]] = f"{kind}:{mount['name']}"
                if mount["mountPath"] == config:
                    assert kind == "configMap", f"k8s {container['name']}: config from {kind}"
                    text = maps[volume["configMap"]["name"]][mount["subPath"]]
            assert config in mounts, f"k8s {container['name']}: --config {config} not mounted"
            found.append((f"k8s {container['name']}", argv[1], tomllib.loads(text), mounts))
    return found


def covered(path: str, mounts: dict[str, str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def site_config(raw: dict[str, Any], tmp_path: Path) -> SiteConfig:
    """The real loader on a shipped site config; the files it must find at load time (the
    base model, the aggregator's key) are stood in for, the rest is taken as written."""
    key = tmp_path / "aggregator.pub"
    key.write_text("ab" * 32 + "\n")  # the form `fleetmind server key` prints
    return SiteConfig.from_mapping({**raw, "model_dir": str(TOY_MODEL),
                                    "aggregator_key": str(key)}, tmp_path)


# ---- the tests ---------------------------------------------------------------------------


def test_every_file_in_deploy_parses() -> None:
    seen = set()
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        relative = path.relative_to(DEPLOY)
        if relative.parts[0] in ("certs",) or "data" in relative.parts:
            continue  # generated by the README's commands, never shipped
        suffix = path.suffix
        if suffix in (".yaml", ".yml"):
            assert load_yaml(path), f"{relative} is empty"
        elif suffix == ".json":
            json.loads(path.read_text())
        elif suffix == ".toml":
            tomllib.loads(path.read_text())
        elif suffix == ".service":
            assert unit(path)["Service"]["ExecStart"], relative
        elif path.name in ("Dockerfile", "Dockerfile.dockerignore", "README.md"):
            pass  # checked below
        else:
            raise AssertionError(f"deploy/{relative}: no check knows this kind of file")
        seen.add(relative.parts[0])
    assert {"config", "systemd", "compose", "k8s", "prometheus", "grafana"} <= seen


def test_every_fleetmind_command_is_accepted_by_the_real_parser() -> None:
    commands = all_commands()
    kinds = {argv[1:3] and tuple(argv[1:3]) for _, argv in commands}
    # The kit runs both sides, and the READMEs make every certificate and the key.
    assert {("server", "run"), ("client", "run"), ("server", "certs"), ("server", "key"),
            ("client", "ingest")} <= kinds
    for where, argv in commands:
        if argv[1:] == ["--help"]:
            continue
        try:
            parse(argv)
        except AssertionError as error:
            raise AssertionError(f"{where}: {error}") from None


def test_the_parser_check_catches_a_bad_flag() -> None:
    with pytest.raises(AssertionError, match="--no-such-flag"):
        parse(["fleetmind", "server", "run", "--no-such-flag"])


def test_every_config_a_command_runs_loads_and_its_paths_are_provided(tmp_path) -> None:
    configs = shipped_configs()
    assert {where.split()[0] for where, *_ in configs} >= {"compose", "k8s"}
    assert sum(side == "server" for _, side, _, _ in configs) == 3  # systemd, compose, k8s
    for where, side, raw, mounts in configs:
        if side == "server":
            config = parse_config(raw, tmp_path)
            assert config.tls is not None and not config.insecure, where
            paths = [str(config.data_dir), str(config.tls.certificate),
                     str(config.tls.private_key), str(config.tls.ca_certificate)]
            # The adapter is the model the shipped sites run: the committed toy model.
            adapter = {k: raw["adapter"][k] for k in ("base_model_sha256", "modules")}
            assert adapter == toy_adapter(), f"{where}: [adapter] is not sim/toy_model's"
        else:
            config = site_config(raw, tmp_path)
            assert config.tls is not None and not config.insecure, where
            assert config.identity_key.parent == config.data_dir, where
            paths = [raw["data_dir"], raw["identity_key"], raw["model_dir"],
                     raw["aggregator_key"], *raw["tls"].values()]
        for path in paths:
            assert covered(str(path), mounts), f"{where}: nothing provides {path}"
        assert config.metrics_listen is not None, f"{where}: no metrics endpoint"


def test_compose_mounts_only_shipped_or_generated_files() -> None:
    """A mount's source is in the repository, or made by a command of deploy/README.md."""
    shell = code_blocks((DEPLOY / "README.md").read_text())
    made = {Path(folder) for line in re.findall(r"^mkdir -p (.*)$", shell, flags=re.M)
            for folder in shlex.split(line)}
    for argv in shell_commands(shell):
        args = parse(argv)
        if getattr(args, "kind", None) == "ca":
            made |= {args.out / "ca.crt", args.out / "ca.key"}
        elif getattr(args, "kind", None) == "server":
            made |= {args.out / f"{args.name}.crt", args.out / f"{args.name}.key"}
        elif getattr(args, "kind", None) == "site":
            made |= {args.out / f"{args.site_name}.crt", args.out / f"{args.site_name}.key"}
        elif args.action == "key" and args.out:
            made |= {args.out, args.data}
    made = {(ROOT / p).resolve() for p in made}
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith("."):
                assert source in compose().get("volumes", {}), f"{name}: volume {source}"
                continue
            path = (COMPOSE / source).resolve()
            assert path.exists() or path in made, \
                f"compose {name} mounts {source}: not shipped, and no README command makes it"
        build = service.get("build")
        if build:
            context = (COMPOSE / build["context"]).resolve()
            assert (context / "pyproject.toml").is_file() and \
                (context / build["dockerfile"]).is_file(), name
            assert build["args"]["EXTRA"] in tomllib.loads(
                (context / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_ports_and_names_agree_across_the_kit(tmp_path) -> None:
    servers = [(w, parse_config(raw, tmp_path)) for w, side, raw, _ in shipped_configs()
               if side == "server"]
    sites = [(w, raw) for w, side, raw, _ in shipped_configs() if side == "client"]
    grpc_ports = {split_listen(c.listen)[1] for _, c in servers}
    metrics_ports = {split_listen(c.metrics_listen)[1] for _, c in servers}
    site_metrics_ports = {split_listen(raw["metrics_listen"])[1] for _, raw in sites}
    assert grpc_ports == {7443} and metrics_ports == {9464} and site_metrics_ports == {9465}
    (grpc_port,), (metrics_port,) = grpc_ports, metrics_ports

    # Sites dial the aggregator's port, by its compose service or Kubernetes Service name.
    services = compose()["services"]
    k8s_services = {s["metadata"]["name"]: s for s in of_kind("Service")}
    for where, raw in sites:
        host, port = raw["aggregator"].rsplit(":", 1)
        assert int(port) in grpc_ports, where
        if where.startswith("compose"):
            assert host in services, where
            assert services[where.split()[1]]["depends_on"]["aggregator"]
        elif where.startswith("k8s"):
            assert host in k8s_services, where
            assert k8s_services[host]["spec"]["ports"][0]["port"] in grpc_ports

    # compose: the published port and the healthcheck's metrics URL.
    aggregator = services["aggregator"]
    assert {int(p.split(":")[-1]) for p in aggregator["ports"]} == grpc_ports
    assert f":{metrics_port}/metrics" in " ".join(aggregator["healthcheck"]["test"])

    # Kubernetes: named container ports, the Service's target, the scrape annotations.
    for deployment in of_kind("Deployment"):
        template = deployment["spec"]["template"]
        ports = {p["name"]: p["containerPort"] for c in containers(deployment)
                 for p in c.get("ports", [])}
        annotation = int(template["metadata"]["annotations"]["prometheus.io/port"])
        assert ports["metrics"] == annotation
        if "aggregator" in deployment["metadata"]["name"]:
            assert (ports["grpc"], ports["metrics"]) == (grpc_port, metrics_port)
            service = k8s_services[deployment["metadata"]["name"]]
            assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
            assert service["spec"]["ports"][0]["targetPort"] in ports
        else:
            assert ports["metrics"] in site_metrics_ports
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= template["metadata"]["labels"].items()

    # Prometheus scrapes exactly the compose fleet's metrics ports, each site by its name.
    jobs = {job["job_name"]: job for job in
            load_yaml(DEPLOY / "prometheus" / "prometheus.yml")[0]["scrape_configs"]}
    aggregator_targets = [t for g in jobs["fleetmind-aggregator"]["static_configs"]
                          for t in g["targets"]]
    assert aggregator_targets == [f"aggregator:{metrics_port}"]
    compose_sites = {raw["name"] for where, raw in sites if where.startswith("compose")}
    for group in jobs["fleetmind-sites"]["static_configs"]:
        (target,) = group["targets"]
        host, port = target.rsplit(":", 1)
        assert host == group["labels"]["site"] and host in services
        assert int(port) in site_metrics_ports
    assert {g["labels"]["site"] for g in jobs["fleetmind-sites"]["static_configs"]} \
        == compose_sites == {"site-0", "site-1", "site-2"}


def test_the_images_are_built_from_the_whole_package() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    copied = {Path(line.split()[1]) for line in dockerfile.splitlines()
              if line.startswith("COPY ")}
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies {source}: not in the repo"
    # fleetmind/ links each package folder under the namespace; the image needs both.
    folders = {Path(os.readlink(link)).relative_to("..")
               for link in (ROOT / "fleetmind").iterdir() if link.is_symlink()}
    assert folders and folders | {Path("fleetmind")} <= copied, \
        f"the image misses package folders {(folders | {Path('fleetmind')}) - copied}"
    exposed = {int(p) for line in dockerfile.splitlines() if line.startswith("EXPOSE ")
               for p in line.split()[1:]}
    assert {7443, 9464, 9465} <= exposed
    images = {service["image"] for service in compose()["services"].values()
              if "fleetmind" in service.get("image", "")}
    k8s_images = {c["image"] for d in of_kind("Deployment") for c in containers(d)}
    k8s_images |= {c["image"] for d in of_kind("Deployment")
                   for c in d["spec"]["template"]["spec"].get("initContainers", [])}
    assert k8s_images <= images == {"fleetmind-aggregator:0.1.0", "fleetmind-site:0.1.0"}


def test_the_dashboard_queries_only_metrics_that_exist() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "fleetmind.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"]
             for target in panel.get("targets", [])]
    used = {name for expr in exprs for name in re.findall(r"\bfleetmind_[a-z0-9_]+", expr)}
    assert used, "the dashboard queries nothing"
    assert not used - METRICS, f"the dashboard queries undefined metrics {used - METRICS}"
    # It covers what the issue asks to watch: rounds, cohorts, dropouts, bytes, latencies,
    # epsilon, version, watchers, refusals; sessions, consolidations, tokens, last activation.
    for wanted in ("rounds_total", "cohort_sites", "dropouts_total", "received_bytes_total",
                   "sent_bytes_total", "phase_duration_seconds", "epsilon_spent",
                   "latest_version", "watchers", "sessions_stored", "consolidations_total",
                   "distilled_tokens_total", "last_activation_timestamp_seconds",
                   "refusals_total"):
        assert any(wanted in name for name in used), f"no panel shows {wanted}"
    # Jobs it selects on are the scrape config's; its datasource is the provisioned one.
    jobs = {job["job_name"] for job in
            load_yaml(DEPLOY / "prometheus" / "prometheus.yml")[0]["scrape_configs"]}
    for expr in exprs:
        for selector in re.findall(r'job=~?"([^"]+)"', expr):
            assert set(selector.split("|")) <= jobs, expr
    (datasource,) = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources"
                              / "prometheus.yaml")[0]["datasources"]
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    assert uids == {datasource["uid"]}
    # Grafana finds the dashboard where compose mounts it and provisioning looks.
    (provider,) = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards"
                            / "fleetmind.yaml")[0]["providers"]
    grafana = compose()["services"]["grafana"]
    targets = {v.split(":")[1] for v in grafana["volumes"]}
    assert f"{provider['options']['path']}/fleetmind.json" in targets


def test_the_metric_check_catches_an_unknown_name() -> None:
    assert "fleetmind_aggregator_rounds_total" in METRICS
    assert "fleetmind_aggregator_phase_duration_seconds_bucket" in METRICS
    assert "fleetmind_aggregator_rounds" not in METRICS  # a counter is read as _total


def test_the_systemd_units_run_the_installed_program_as_a_service_user() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for path in sorted((DEPLOY / "systemd").glob("*.service")):
        service = unit(path)["Service"]
        # The README's install makes this program.
        assert shlex.split(service["ExecStart"][0])[0] == "/opt/fleetmind/venv/bin/fleetmind"
        assert "python3 -m venv /opt/fleetmind/venv" in readme
        assert service["User"] == ["fleetmind"], path.name
        assert "Install" in unit(path)
    site = unit(DEPLOY / "systemd" / "fleetmind-site@.service")["Service"]
    assert "%i" in site["ExecStart"][0] and "%i" in site["StateDirectory"][0]


def test_the_readme_has_a_deploy_section_from_certificates_to_a_fleet() -> None:
    section = readme_deploy_section()
    commands = [tuple(argv[1:3]) for argv in shell_commands(code_blocks(section))]
    assert ("server", "certs") in commands and ("server", "key") in commands
    assert "deploy/README.md" in section
    assert "docker compose" in section


def test_server_config_defaults_keep_metrics_off(tmp_path) -> None:
    # Deploy files turn metrics on explicitly; nothing else opens an HTTP port by surprise.
    assert ServerConfig(data_dir=tmp_path, insecure=True).metrics_listen is None


@pytest.mark.parametrize("table, steps", [("", 24), ("[distill]\nsteps = 5\n", 5)])
def test_a_site_distils_each_unit_with_the_per_unit_settings(tmp_path, table, steps) -> None:
    """A site clips each unit's delta: SGD unless its config says otherwise, and a partial
    [distill] table changes only the fields it names."""
    (tmp_path / "agg.pub").write_text("11" * 32)  # any 32-byte key, as 64 hex digits
    path = tmp_path / "site.toml"
    path.write_text(f'name = "s"\ndata_dir = "{tmp_path}"\nmodel_dir = "{TOY_MODEL}"\n'
                    f'aggregator = "127.0.0.1:7443"\nidentity_key = "{tmp_path}/id.pem"\n'
                    f'aggregator_key = "{tmp_path}/agg.pub"\ninsecure = true\n{table}')
    distill = SiteConfig.load(path).distill
    assert (distill.optimizer, distill.lr, distill.steps) == ("sgd", 1.0, steps)
