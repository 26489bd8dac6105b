"""Checks of compose/docker-compose.yml, the local three-broker Kafka stack.

No Docker engine is needed: the file is parsed with PyYAML and its properties
are asserted directly. The inline ``topics-init`` script is also executed with
bash against a stand-in for ``kafka-topics.sh`` that records its arguments and
answers ``--describe`` like Kafka does, so the topic configs and the
partition-count check are tested by behaviour, not only by text.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from treeflow.kafka import KAFKA, KafkaSettings
from treeflow.kafka.topics import topic_specs

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "compose" / "docker-compose.yml"

KAFKA_IMAGE = "apache/kafka:3.8.1"
BROKERS = ("kafka-1", "kafka-2", "kafka-3")
EXTERNAL_PORTS = {"kafka-1": 19092, "kafka-2": 29092, "kafka-3": 39092}
KAFKA_TOPICS = "/opt/kafka/bin/kafka-topics.sh"
SEVEN_DAYS_MS = "604800000"


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def load_compose(path: Path | None = None) -> dict:
    path = path or COMPOSE_FILE
    with open(path, encoding="utf-8") as fh:
        doc = yaml.safe_load(fh)
    assert isinstance(doc, dict), f"{path} is not a YAML mapping"
    assert isinstance(doc.get("services"), dict), f"{path} has no services mapping"
    return doc


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


def env_of(service: dict) -> dict[str, str]:
    """A service's environment as str -> str, whether written as a map or a list."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        out = {}
        for item in raw:
            key, _, value = str(item).partition("=")
            out[key] = value
        return out
    return {str(k): "" if v is None else str(v) for k, v in raw.items()}


def kafka_services(doc: dict) -> dict[str, dict]:
    """Services that run a Kafka node (they set KAFKA_PROCESS_ROLES)."""
    return {
        name: svc
        for name, svc in doc["services"].items()
        if "KAFKA_PROCESS_ROLES" in env_of(svc)
    }


def parse_listeners(value: str) -> dict[str, tuple[str, int]]:
    """'NAME://host:port,...' -> {NAME: (host, port)}."""
    out = {}
    for item in value.split(","):
        match = re.fullmatch(r"\s*([A-Za-z0-9_]+)://([^:,]*):(\d+)\s*", item)
        assert match, f"malformed listener {item!r} in {value!r}"
        name, host, port = match.groups()
        assert name not in out, f"listener {name} given twice in {value!r}"
        out[name] = (host, int(port))
    return out


def parse_voters(value: str) -> dict[int, tuple[str, int]]:
    """'1@kafka-1:9093,...' -> {1: ('kafka-1', 9093), ...}."""
    out = {}
    for item in value.split(","):
        match = re.fullmatch(r"\s*(\d+)@([^:,]+):(\d+)\s*", item)
        assert match, f"malformed quorum voter {item!r} in {value!r}"
        node, host, port = match.groups()
        out[int(node)] = (host, int(port))
    return out


_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<invalid>))"
)


def interpolate(text: str, variables: dict[str, str], allowed_prefix: str = "") -> str:
    """What docker compose does to a string: ``$$`` -> ``$``, ``${VAR:-default}``.

    Any reference to a variable whose name does not start with
    ``allowed_prefix`` raises: in the topics-init script it would be a shell
    variable someone forgot to write as ``$$NAME``, which compose would
    silently replace with an empty string.
    """

    def replace(match: re.Match) -> str:
        if match.group("escaped") is not None:
            return "$"
        name = match.group("braced") or match.group("bare")
        if name is None:
            raise AssertionError(f"bare '$' at {match.start()} in {text[match.start():match.start() + 20]!r}")
        if not (allowed_prefix and name.startswith(allowed_prefix)):
            raise AssertionError(
                f"unescaped ${name} would be interpolated by compose; write $${name}"
            )
        if name in variables and variables[name] != "":
            return variables[name]
        return match.group("default") or ""

    return _INTERPOLATION.sub(replace, text)


def topics_init_script(doc: dict) -> str:
    """The raw (not yet interpolated) bash script of topics-init."""
    command = doc["services"]["topics-init"].get("command")
    assert isinstance(command, list), "topics-init command should be a list: [bash, -c, script]"
    assert len(command) == 3, command
    assert command[0] in ("bash", "/bin/bash", "sh", "/bin/sh"), command[0]
    assert command[1] == "-c", command[1]
    assert isinstance(command[2], str)
    return command[2]


# A stand-in for kafka-topics.sh: records each call, keeps created topics and
# their partition counts in a directory, honours --if-not-exists, and prints
# --describe output in Kafka's format.
STUB_KAFKA_TOPICS = r'''
import json, os, sys
args = sys.argv[1:]
state = os.environ["STUB_STATE"]
with open(os.path.join(state, "calls.jsonl"), "a") as fh:
    fh.write(json.dumps(args) + "\n")
def opt(name):
    return args[args.index(name) + 1] if name in args else None
topic = opt("--topic")
path = os.path.join(state, "topic-" + topic) if topic else None
if "--create" in args:
    if os.path.exists(path):
        if "--if-not-exists" not in args:
            print("Error: Topic '%s' already exists." % topic, file=sys.stderr)
            sys.exit(1)
    else:
        with open(path, "w") as fh:
            fh.write(opt("--partitions"))
        print("Created topic %s." % topic)
elif "--describe" in args:
    if not os.path.exists(path):
        print("Error: Topic '%s' does not exist as expected" % topic, file=sys.stderr)
        sys.exit(1)
    n = int(open(path).read())
    print("Topic: %s\tTopicId: x3dGZ7pSRUWn8b0QvXkC1g\tPartitionCount: %d\tReplicationFactor: 3\tConfigs: min.insync.replicas=2" % (topic, n))
    for p in range(n):
        print("\tTopic: %s\tPartition: %d\tLeader: 1\tReplicas: 1,2,3\tIsr: 1,2,3" % (topic, p))
'''


class TopicsInitRun:
    def __init__(self, proc: subprocess.CompletedProcess, calls: list[list[str]]):
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.calls = calls

    def creates(self) -> dict[str, dict]:
        """{topic: {"partitions", "replication_factor", "configs", "args"}} per --create call."""
        out = {}
        for args in self.calls:
            if "--create" not in args:
                continue
            topic = args[args.index("--topic") + 1]
            configs = {}
            for i, arg in enumerate(args):
                if arg == "--config":
                    key, _, value = args[i + 1].partition("=")
                    configs[key] = value
            out[topic] = {
                "partitions": args[args.index("--partitions") + 1] if "--partitions" in args else None,
                "replication_factor": args[args.index("--replication-factor") + 1]
                if "--replication-factor" in args
                else None,
                "configs": configs,
                "args": args,
            }
        return out


def run_topics_init(
    doc: dict,
    tmp_path: Path,
    compose_env: dict[str, str] | None = None,
    existing_topics: dict[str, int] | None = None,
) -> TopicsInitRun:
    """Run topics-init's script as the container would, against the stub."""
    if shutil.which("bash") is None:
        pytest.skip("bash is needed to run the topics-init script")
    compose_env = compose_env or {}
    service = doc["services"]["topics-init"]

    state = tmp_path / "state"
    state.mkdir()
    for topic, partitions in (existing_topics or {}).items():
        (state / f"topic-{topic}").write_text(str(partitions))
    stub = tmp_path / "kafka-topics.sh"
    stub.write_text(f"#!{sys.executable}\n{STUB_KAFKA_TOPICS}")
    stub.chmod(0o755)

    script = interpolate(topics_init_script(doc), compose_env, allowed_prefix="TREEFLOW_")
    assert KAFKA_TOPICS in script
    script = script.replace(KAFKA_TOPICS, str(stub))
    # The container sees the service's environment after compose interpolation.
    container_env = {
        key: interpolate(value, compose_env, allowed_prefix="TREEFLOW_")
        for key, value in env_of(service).items()
    }
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "STUB_STATE": str(state), **container_env}
    proc = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    calls_file = state / "calls.jsonl"
    calls = (
        [json.loads(line) for line in calls_file.read_text().splitlines()]
        if calls_file.exists()
        else []
    )
    return TopicsInitRun(proc, calls)


# --------------------------------------------------------------------------
# brokers
# --------------------------------------------------------------------------


def test_exactly_three_kafka_nodes_on_the_pinned_image(compose):
    nodes = kafka_services(compose)
    assert sorted(nodes) == list(BROKERS)
    for name, svc in nodes.items():
        assert svc.get("image") == KAFKA_IMAGE, name


def test_node_ids_are_distinct_and_cluster_id_is_shared(compose):
    nodes = kafka_services(compose)
    node_ids = {name: int(env_of(svc)["KAFKA_NODE_ID"]) for name, svc in nodes.items()}
    assert len(set(node_ids.values())) == 3, node_ids

    cluster_ids = {env_of(svc).get("CLUSTER_ID") for svc in nodes.values()}
    assert len(cluster_ids) == 1, cluster_ids
    (cluster_id,) = cluster_ids
    assert cluster_id, "CLUSTER_ID must be set"
    # KRaft cluster ids are base64url-encoded 16-byte UUIDs (22 characters).
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", cluster_id), cluster_id
    assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_every_node_is_broker_and_controller(compose):
    for name, svc in kafka_services(compose).items():
        roles = {r.strip() for r in env_of(svc)["KAFKA_PROCESS_ROLES"].split(",")}
        assert roles == {"broker", "controller"}, name


def test_controller_quorum_names_all_three_nodes(compose):
    nodes = kafka_services(compose)
    voters_values = {env_of(svc)["KAFKA_CONTROLLER_QUORUM_VOTERS"] for svc in nodes.values()}
    assert len(voters_values) == 1, f"nodes disagree on the quorum: {voters_values}"
    voters = parse_voters(voters_values.pop())
    assert len(voters) == 3

    for name, svc in nodes.items():
        env = env_of(svc)
        assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER", name
        node_id = int(env["KAFKA_NODE_ID"])
        assert node_id in voters, f"{name} (node {node_id}) is not a quorum voter"
        host, port = voters[node_id]
        assert host == name, f"voter {node_id} points at {host}, not {name}"
        listeners = parse_listeners(env["KAFKA_LISTENERS"])
        assert listeners["CONTROLLER"][1] == port, name


def test_listeners_internal_controller_external(compose):
    for name, svc in kafka_services(compose).items():
        env = env_of(svc)
        listeners = parse_listeners(env["KAFKA_LISTENERS"])
        assert set(listeners) == {"INTERNAL", "CONTROLLER", "EXTERNAL"}, name
        assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] == "INTERNAL", name

        protocol_map = dict(
            item.split(":", 1) for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
        )
        assert set(listeners) <= set(protocol_map), name

        advertised = parse_listeners(env["KAFKA_ADVERTISED_LISTENERS"])
        assert "CONTROLLER" not in advertised, name
        # Inside the compose network the broker is reached by its service name.
        assert advertised["INTERNAL"] == (name, listeners["INTERNAL"][1]), name
        assert svc.get("hostname", name) == name


def test_external_listeners_are_published_on_localhost(compose):
    for name, svc in kafka_services(compose).items():
        env = env_of(svc)
        expected_port = EXTERNAL_PORTS[name]
        advertised = parse_listeners(env["KAFKA_ADVERTISED_LISTENERS"])
        assert advertised["EXTERNAL"] == ("127.0.0.1", expected_port), name

        container_port = parse_listeners(env["KAFKA_LISTENERS"])["EXTERNAL"][1]
        published = set()
        for port in svc.get("ports") or []:
            if isinstance(port, dict):
                published.add((str(port.get("host_ip")), int(port["published"]), int(port["target"])))
            else:
                host_ip, host_port, target = str(port).split(":")
                published.add((host_ip, int(host_port), int(target.split("/")[0])))
        assert ("127.0.0.1", expected_port, container_port) in published, (name, published)


def test_replication_defaults_and_no_auto_topic_creation(compose):
    for name, svc in kafka_services(compose).items():
        env = env_of(svc)
        assert env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "3", name
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == "2", name
        assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "3", name
        assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "3", name
        assert env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == "2", name
        assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"].lower() == "false", name


def test_each_broker_has_a_healthcheck_on_its_internal_listener(compose):
    for name, svc in kafka_services(compose).items():
        health = svc.get("healthcheck") or {}
        test = health.get("test")
        assert test, f"{name} has no healthcheck"
        text = " ".join(test) if isinstance(test, list) else str(test)
        assert "kafka-broker-api-versions.sh" in text or "kafka-topics.sh" in text, name
        internal_port = parse_listeners(env_of(svc)["KAFKA_LISTENERS"])["INTERNAL"][1]
        assert f"{name}:{internal_port}" in text or f"localhost:{internal_port}" in text, name


def test_each_broker_keeps_its_data_on_its_own_named_volume(compose):
    declared = set((compose.get("volumes") or {}).keys())
    used = []
    for name, svc in kafka_services(compose).items():
        log_dirs = env_of(svc)["KAFKA_LOG_DIRS"]
        mounts = {}
        for volume in svc.get("volumes") or []:
            if isinstance(volume, dict):
                mounts[volume["target"]] = volume["source"]
            else:
                source, target = str(volume).split(":")[:2]
                mounts[target] = source
        assert log_dirs in mounts, f"{name}: {log_dirs} is not on a volume"
        source = mounts[log_dirs]
        assert source in declared, f"{name}: {source} is not a named volume"
        used.append(source)
    assert len(set(used)) == 3, used


# --------------------------------------------------------------------------
# topics-init
# --------------------------------------------------------------------------


def test_topics_init_waits_for_all_brokers_to_be_healthy(compose):
    svc = compose["services"]["topics-init"]
    assert svc.get("image") == KAFKA_IMAGE
    depends = svc.get("depends_on")
    assert isinstance(depends, dict), "depends_on needs the long form to state a condition"
    assert set(depends) == set(BROKERS)
    for broker in BROKERS:
        assert depends[broker].get("condition") == "service_healthy", broker
    assert str(svc.get("restart", "no")) == "no"


def test_topics_init_settings_come_from_treeflow_env_with_defaults(compose):
    env = env_of(compose["services"]["topics-init"])
    assert interpolate(env["TREEFLOW_TOPIC_PREFIX"], {}, "TREEFLOW_") == "treeflow"
    assert interpolate(env["TREEFLOW_PARTITIONS"], {}, "TREEFLOW_") == "12"
    assert interpolate(env["TREEFLOW_PARTITIONS"], {"TREEFLOW_PARTITIONS": "5"}, "TREEFLOW_") == "5"


def test_topics_init_script_escapes_its_shell_variables(compose):
    # interpolate() raises on any $NAME compose would swallow.
    script = interpolate(topics_init_script(compose), {}, allowed_prefix="TREEFLOW_")
    assert "set -e" in script


def test_topics_init_uses_create_if_not_exists(compose):
    script = interpolate(topics_init_script(compose), {}, allowed_prefix="TREEFLOW_")
    statements = script.replace("\\\n", " ").splitlines()
    creates = [s for s in statements if KAFKA_TOPICS in s and "--create" in s]
    assert len(creates) == 5, creates
    for statement in creates:
        assert "--if-not-exists" in shlex.split(statement), statement


def test_topics_init_creates_what_ensure_topics_creates(compose, tmp_path):
    """The compose script and `treeflow topics create` must not drift apart."""
    run = run_topics_init(compose, tmp_path)
    assert run.returncode == 0, run.stderr
    creates = run.creates()
    settings = KafkaSettings("unused:9092", topic_prefix="treeflow", partitions=12, profile=KAFKA)
    specs = {spec.name: spec for spec in topic_specs(settings, 3, ["default"])}
    assert set(creates) == set(specs)
    for topic, spec in creates.items():
        assert spec["partitions"] == "12", topic
        assert spec["replication_factor"] == "3", topic
        assert "--if-not-exists" in spec["args"], topic
        assert spec["configs"] == specs[topic].configs, topic

    # The event log is the source of truth: never deleted, never compacted.
    events = creates["treeflow.events"]["configs"]
    assert events.get("retention.ms") == "-1"
    assert events.get("retention.bytes") == "-1"
    assert events.get("cleanup.policy") == "delete"
    assert creates["treeflow.commands"]["configs"].get("retention.ms") == SEVEN_DAYS_MS


def test_topics_init_honours_prefix_and_one_partition_count(compose, tmp_path):
    run = run_topics_init(
        compose,
        tmp_path,
        compose_env={"TREEFLOW_TOPIC_PREFIX": "acme", "TREEFLOW_PARTITIONS": "7"},
    )
    assert run.returncode == 0, run.stderr
    creates = run.creates()
    assert set(creates) == {"acme.commands", "acme.events", "acme.replies", "acme.snapshots",
                            "acme.tasks.default"}
    # commands and events must be driven by the same partition setting.
    assert creates["acme.commands"]["partitions"] == "7"
    assert creates["acme.events"]["partitions"] == "7"
    assert creates["acme.tasks.default"]["partitions"] == "7"


def test_topics_init_checks_partition_counts_with_describe(compose, tmp_path):
    run = run_topics_init(compose, tmp_path)
    assert run.returncode == 0, run.stderr
    described = {args[args.index("--topic") + 1] for args in run.calls if "--describe" in args}
    assert {"treeflow.commands", "treeflow.events"} <= described


def test_topics_init_fails_when_commands_and_events_partitions_differ(compose, tmp_path):
    # events already exists with another partition count: --if-not-exists
    # leaves it alone, and the check must catch the mismatch.
    run = run_topics_init(compose, tmp_path, existing_topics={"treeflow.events": 6})
    assert run.returncode != 0
    message = run.stderr + run.stdout
    assert "treeflow.commands" in message and "treeflow.events" in message
    assert "12" in message and "6" in message
    assert "mismatch" in message.lower()


def test_topics_init_accepts_existing_topics_with_equal_counts(compose, tmp_path):
    run = run_topics_init(
        compose,
        tmp_path,
        existing_topics={"treeflow.commands": 12, "treeflow.events": 12, "treeflow.tasks.default": 12},
    )
    assert run.returncode == 0, run.stderr


def test_topics_init_rejects_a_non_numeric_partition_count(compose, tmp_path):
    run = run_topics_init(compose, tmp_path, compose_env={"TREEFLOW_PARTITIONS": "twelve"})
    assert run.returncode != 0
    assert not [args for args in run.calls if "--create" in args]


# --------------------------------------------------------------------------
# the treeflow services, PostgreSQL and Prometheus
# --------------------------------------------------------------------------

TREEFLOW_SERVICES = ("processor", "worker", "gateway", "visibility")
PROMETHEUS_FILE = COMPOSE_FILE.parent / "prometheus.yml"
DOCKERFILE = COMPOSE_FILE.parent / "Dockerfile"
#: Where each HTTP service serves /metrics and /readyz inside its container.
HTTP_PORTS = {"processor": 9100, "worker": 9100, "gateway": 8000}
PUBLISHED = {"processor": 9100, "worker": 9101, "gateway": 8000, "postgres": 5432, "prometheus": 9090}


def published_ports(service: dict) -> set[tuple[str, int, int]]:
    out = set()
    for port in service.get("ports") or []:
        host_ip, host_port, target = str(port).split(":")
        out.add((host_ip, int(host_port), int(target)))
    return out


def healthcheck_text(service: dict) -> str:
    test = (service.get("healthcheck") or {}).get("test")
    assert test, "no healthcheck"
    return " ".join(test) if isinstance(test, list) else str(test)


def test_the_whole_stack_is_there(compose):
    assert {*BROKERS, "topics-init", *TREEFLOW_SERVICES, "postgres", "prometheus"} == set(compose["services"])
    assert {"postgres-data", "prometheus-data"} <= set(compose["volumes"])


def test_treeflow_services_share_the_image_kafka_and_topic_settings(compose):
    topics_env = env_of(compose["services"]["topics-init"])
    for name in TREEFLOW_SERVICES:
        svc = compose["services"][name]
        assert svc["image"] == "treeflow:local", name
        assert svc["build"] == {"context": "..", "dockerfile": "compose/Dockerfile"}, name
        env = env_of(svc)
        # Inside the network the brokers are reached on their INTERNAL listeners, all three of them.
        internal = {f"{broker}:{parse_listeners(env_of(compose['services'][broker])['KAFKA_LISTENERS'])['INTERNAL'][1]}"
                    for broker in BROKERS}
        assert set(env["TREEFLOW_BOOTSTRAP_SERVERS"].split(",")) == internal, name
        # The same topics as topics-init created, with the same partition count.
        assert env["TREEFLOW_TOPIC_PREFIX"] == topics_env["TREEFLOW_TOPIC_PREFIX"], name
        assert env["TREEFLOW_PARTITIONS"] == topics_env["TREEFLOW_PARTITIONS"], name
        assert env["TREEFLOW_BROKER_PROFILE"] == "kafka" and env["TREEFLOW_REPLICATION_FACTOR"] == "3", name
        assert svc["depends_on"]["topics-init"] == {"condition": "service_completed_successfully"}, name
        assert svc["command"][0] == "treeflow", name


@pytest.mark.parametrize("name", ["processor", "worker", "gateway"])
def test_treeflow_commands_parse_with_the_real_cli(compose, name):
    from treeflow.cli import main

    command = compose["services"][name]["command"]
    subcommand = main.commands[command[1]]
    context = subcommand.make_context(command[1], list(command[2:]))  # raises on an unknown flag
    port = context.params.get("metrics_port") or context.params.get("port")
    assert port == HTTP_PORTS[name]
    if name == "gateway":
        assert context.params["host"] == "0.0.0.0"


def test_the_worker_runs_the_example_module(compose):
    import importlib.util

    command = compose["services"]["worker"]["command"]
    module = command[command.index("--module") + 1]
    assert module == "treeflow.examples.child_workflows"
    assert importlib.util.find_spec(module) is not None


def test_visibility_writes_to_the_compose_postgres(compose):
    from urllib.parse import urlparse

    svc = compose["services"]["visibility"]
    command = svc["command"]
    assert command[:2] == ["treeflow", "visibility"]
    url = urlparse(command[command.index("--database") + 1])
    pg = env_of(compose["services"]["postgres"])
    assert url.scheme in ("postgresql", "postgres")
    assert (url.hostname, url.port or 5432) == ("postgres", 5432)
    assert (url.username, url.password, url.path.lstrip("/")) == (
        pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"])
    assert svc["depends_on"]["postgres"] == {"condition": "service_healthy"}


def test_services_publish_their_ports_on_localhost_only(compose):
    for name, host_port in PUBLISHED.items():
        ports = published_ports(compose["services"][name])
        target = HTTP_PORTS.get(name, host_port)
        assert ("127.0.0.1", host_port, target) in ports, (name, ports)
    host_ports = [port for svc in compose["services"].values() for _, port, _ in published_ports(svc)]
    assert len(host_ports) == len(set(host_ports)), "two services publish the same host port"


def test_health_checks_ask_readyz_on_the_served_port(compose):
    for name, port in HTTP_PORTS.items():
        text = healthcheck_text(compose["services"][name])
        assert f"http://127.0.0.1:{port}/readyz" in text, name
        # urlopen raises on a 503, so the check fails while the service is not ready.
        assert "urllib.request.urlopen" in text, name
    assert "pg_isready" in healthcheck_text(compose["services"]["postgres"])
    assert "/-/ready" in healthcheck_text(compose["services"]["prometheus"])


def test_prometheus_scrapes_every_metrics_endpoint(compose):
    svc = compose["services"]["prometheus"]
    assert f"./{PROMETHEUS_FILE.name}:/etc/prometheus/prometheus.yml:ro" in svc["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in svc["command"]
    config = yaml.safe_load(PROMETHEUS_FILE.read_text())
    targets = set()
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            targets.update(static["targets"])
        for dns in job.get("dns_sd_configs", []):
            assert dns["type"] == "A"
            targets.update(f"{name}:{dns['port']}" for name in dns["names"])
        assert job.get("metrics_path", "/metrics") == "/metrics"
    assert {f"{name}:{port}" for name, port in HTTP_PORTS.items()} <= targets


def test_the_image_installs_the_extras_the_services_need():
    text = DOCKERFILE.read_text()
    extras = re.search(r"ARG TREEFLOW_EXTRAS=(\S+)", text).group(1).split(",")
    assert {"processor", "serve"} <= set(extras)
    assert 'pip install --no-cache-dir "/src[${TREEFLOW_EXTRAS}]"' in text
    for folder in ("engine", "schemas", "consumers"):
        assert f"COPY {folder} ./{folder}" in text
