import pytest

from treeflow.kafka import KAFKA, TANSU, KafkaSettings, SettingsError, profile_named


def test_arguments_win_over_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("TREEFLOW_BOOTSTRAP_SERVERS", "env:9092")
    monkeypatch.setenv("TREEFLOW_TOPIC_PREFIX", "envprefix")
    monkeypatch.setenv("TREEFLOW_PARTITIONS", "6")
    monkeypatch.setenv("TREEFLOW_BROKER_PROFILE", "tansu")
    from_env = KafkaSettings.resolve()
    assert (from_env.bootstrap_servers, from_env.topic_prefix, from_env.partitions, from_env.profile) == (
        "env:9092", "envprefix", 6, TANSU)
    explicit = KafkaSettings.resolve("arg:9092", topic_prefix="p", partitions=3, profile=KAFKA)
    assert (explicit.bootstrap_servers, explicit.topics.events, explicit.partitions, explicit.profile) == (
        "arg:9092", "p.events", 3, KAFKA)


def test_defaults(monkeypatch) -> None:
    for name in ("TREEFLOW_TOPIC_PREFIX", "TREEFLOW_PARTITIONS", "TREEFLOW_REPLICATION_FACTOR",
                 "TREEFLOW_BROKER_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    settings = KafkaSettings.resolve("h:1")
    assert (settings.topics.commands, settings.topics.events, settings.topics.tasks("gpu")) == (
        "treeflow.commands", "treeflow.events", "treeflow.tasks.gpu")
    assert (settings.partitions, settings.replication_factor, settings.profile) == (12, None, KAFKA)


@pytest.mark.parametrize("name,value,message", [
    ("TREEFLOW_BOOTSTRAP_SERVERS", "", "no Kafka bootstrap servers"),
    ("TREEFLOW_PARTITIONS", "twelve", "TREEFLOW_PARTITIONS='twelve' is not a whole number"),
    ("TREEFLOW_REPLICATION_FACTOR", "0", "must be at least 1"),
])
def test_bad_settings_are_clear_errors(monkeypatch, name: str, value: str, message: str) -> None:
    monkeypatch.setenv("TREEFLOW_BOOTSTRAP_SERVERS", "h:1")
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=message):
        KafkaSettings.resolve()


def test_unknown_profile() -> None:
    with pytest.raises(ValueError, match="unknown broker profile 'redpanda'"):
        profile_named("redpanda")


SECURITY_VARIABLES = ("TREEFLOW_SECURITY_PROTOCOL", "TREEFLOW_SSL_CAFILE", "TREEFLOW_SSL_CERTFILE",
                      "TREEFLOW_SSL_KEYFILE", "TREEFLOW_SSL_PASSWORD", "TREEFLOW_SSL_CHECK_HOSTNAME",
                      "TREEFLOW_SASL_MECHANISM", "TREEFLOW_SASL_USERNAME", "TREEFLOW_SASL_PASSWORD",
                      "TREEFLOW_KAFKA_OPTIONS", "TREEFLOW_CONNECT_TIMEOUT", "TREEFLOW_PARTITIONS")


@pytest.fixture
def clean_env(monkeypatch):
    for name in SECURITY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_security_settings_from_the_environment(clean_env, tmp_path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-")
    clean_env.setenv("TREEFLOW_SASL_MECHANISM", "scram-sha-512")
    clean_env.setenv("TREEFLOW_SASL_USERNAME", "svc")
    clean_env.setenv("TREEFLOW_SASL_PASSWORD", "pw")
    clean_env.setenv("TREEFLOW_SSL_CAFILE", str(ca))
    clean_env.setenv("TREEFLOW_SSL_CHECK_HOSTNAME", "false")
    clean_env.setenv("TREEFLOW_KAFKA_OPTIONS", '{"request_timeout_ms": 60000, "max_poll_records": 5}')
    settings = KafkaSettings.resolve("h:1")
    assert (settings.security_protocol, settings.sasl_mechanism, settings.sasl_username, settings.ssl_cafile,
            settings.ssl_check_hostname) == ("SASL_SSL", "SCRAM-SHA-512", "svc", str(ca), False)
    assert "pw" not in repr(settings)  # passwords stay out of logs
    assert not settings.partitions_explicit
    assert KafkaSettings.resolve("h:1", partitions=6).partitions_explicit


def test_pass_through_options_go_to_the_clients_that_take_them(clean_env) -> None:
    from treeflow.kafka.clients import client_id, connection_options

    settings = KafkaSettings("h:1", client_options={"request_timeout_ms": 60000, "max_poll_records": 5})
    producer = connection_options(settings, "producer", "client")
    consumer = connection_options(settings, "consumer", "client")
    assert producer["request_timeout_ms"] == consumer["request_timeout_ms"] == 60000
    assert "max_poll_records" not in producer and consumer["max_poll_records"] == 5
    assert producer["client_id"] == client_id("client") and client_id("worker").startswith("treeflow-worker-")
    with pytest.raises(SettingsError, match="unknown Kafka client options.*'no_such_option'"):
        connection_options(KafkaSettings("h:1", client_options={"no_such_option": 1}), "producer", "x")


@pytest.mark.parametrize("arguments,message", [
    ({"security_protocol": "TLS"}, "security protocol 'TLS' is not one of"),
    ({"security_protocol": "SASL_SSL"}, "SASL_SSL needs a SASL mechanism"),
    ({"sasl_mechanism": "PLAIN", "sasl_username": "u"}, "needs a user name and a password"),
    ({"sasl_mechanism": "GSSAPI", "sasl_username": "u", "sasl_password": "p"}, "needs a SASL mechanism, one of"),
    ({"security_protocol": "PLAINTEXT", "sasl_mechanism": "PLAIN"}, "security protocol is PLAINTEXT"),
    ({"ssl_cafile": "/no/such/ca.pem"}, "does not exist"),
    ({"security_protocol": "SSL", "ssl_keyfile": "k.pem"}, "a client key needs its certificate"),
    ({"client_options": {"group_id": "x"}}, "set by treeflow itself"),
])
def test_contradictory_security_settings_are_clear_errors(clean_env, arguments, message) -> None:
    with pytest.raises(SettingsError, match=message) as raised:
        KafkaSettings.resolve("h:1", **arguments)
    assert raised.value.exit_code == 3


def test_bad_pass_through_json(clean_env) -> None:
    clean_env.setenv("TREEFLOW_KAFKA_OPTIONS", "[1, 2]")
    with pytest.raises(SettingsError, match="must be a JSON object"):
        KafkaSettings.resolve("h:1")


def test_the_fetch_wait_comes_from_the_profile_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from treeflow.kafka.profile import FETCH_WAIT_ENV, KAFKA, TANSU
    from treeflow.kafka.settings import SettingsError

    monkeypatch.delenv(FETCH_WAIT_ENV, raising=False)
    assert (KAFKA.fetch_wait_ms(), TANSU.fetch_wait_ms()) == (100, 2)
    assert TANSU.consumer_options()["fetch_max_wait_ms"] == 2
    monkeypatch.setenv(FETCH_WAIT_ENV, "100")
    assert TANSU.consumer_options()["fetch_max_wait_ms"] == 100
    monkeypatch.setenv(FETCH_WAIT_ENV, "soon")
    with pytest.raises(SettingsError, match=FETCH_WAIT_ENV):
        TANSU.fetch_wait_ms()


def test_the_tansu_fetch_wait_doubles_when_a_fetch_falls_short_and_comes_back_while_records_flow() -> None:
    from treeflow.kafka.fetch_wait import next_wait

    wait, waits = 2, []
    for _ in range(10):  # a deep partition: every fetch answers nothing while its end is further on
        wait = next_wait(wait, 2, 500, got_records=False, starved=True)
        waits.append(wait)
    assert waits == [4, 8, 16, 32, 64, 128, 256, 500, 500, 500]
    assert next_wait(64, 2, 500, got_records=False, starved=False) == 64  # caught up: nothing to reach
    for _ in range(60):
        wait = next_wait(wait, 2, 500, got_records=True, starved=False)
    assert wait == 2
