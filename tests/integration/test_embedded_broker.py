import pytest

from treeflow.kafka import BrokerError, EmbeddedBroker
from treeflow.kafka.embedded import answers_api_versions

pytestmark = pytest.mark.integration


def test_starts_on_loopback_answers_and_stops(tmp_path) -> None:
    broker = EmbeddedBroker(log_path=tmp_path / "broker.log")
    with broker:
        assert broker.bootstrap_servers.startswith("127.0.0.1:")
        assert broker.running
        assert answers_api_versions("127.0.0.1", broker.port)
        assert broker.environment() == {"TREEFLOW_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
                                        "TREEFLOW_BROKER_PROFILE": "tansu"}
    assert not broker.running
    assert not answers_api_versions("127.0.0.1", broker.port)
    assert (tmp_path / "broker.log").exists()


def test_a_missing_binary_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("CALF_TANSU_BIN", "/nonexistent/tansu")
    with pytest.raises(BrokerError, match="binary is missing.*does not point at an executable"):
        EmbeddedBroker().start()


def test_a_taken_port_is_a_clear_error(tmp_path) -> None:
    with EmbeddedBroker(log_path=tmp_path / "first.log") as first:
        second = EmbeddedBroker(port=first.port, log_path=tmp_path / "second.log")
        with pytest.raises(BrokerError, match=f"127.0.0.1:{first.port} is already in use"):
            second.start()
        assert not second.running
        assert first.running


def test_a_broker_that_exits_reports_its_log(tmp_path, monkeypatch) -> None:
    fake = tmp_path / "tansu"
    fake.write_text("#!/bin/sh\necho 'error: no storage engine for you' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CALF_TANSU_BIN", str(fake))
    with pytest.raises(BrokerError, match=r"(?s)exited with code 3.*broker\.log.*no storage engine for you"):
        EmbeddedBroker(log_path=tmp_path / "broker.log").start()
