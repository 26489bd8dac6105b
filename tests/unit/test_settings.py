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
