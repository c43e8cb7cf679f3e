"""Settings: errors name the environment variable; docs/configuration.md matches the model."""

from __future__ import annotations

from pathlib import Path

import pytest

from eventflow.cli import main
from eventflow.configdocs import render
from eventflow.errors import ConfigError
from eventflow.settings import load_settings

REPO = Path(__file__).resolve().parents[2]


def test_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTFLOW_CONSUMER__BATCH_SIZE", "lots")
    with pytest.raises(ConfigError, match="EVENTFLOW_CONSUMER__BATCH_SIZE"):
        load_settings()


def test_out_of_range_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTFLOW_STREAMS__MAX_DELIVERIES", "0")
    with pytest.raises(ConfigError, match="EVENTFLOW_STREAMS__MAX_DELIVERIES"):
        load_settings()


def test_env_values_reach_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTFLOW_CONSUMER__CONCURRENCY", "7")
    monkeypatch.setenv("EVENTFLOW_NDVI__DATA_ROOTS", '["/srv/a", "/srv/b"]')
    s = load_settings()
    assert s.consumer.concurrency == 7
    assert [str(p) for p in s.ndvi.data_roots] == ["/srv/a", "/srv/b"]


def test_configuration_doc_is_generated_from_the_model() -> None:
    doc = (REPO / "docs/configuration.md").read_text()
    assert doc == render(), "docs/configuration.md is stale: run `eventflow config-docs --output docs/configuration.md`"


def test_cli_reports_bad_setting_and_exits_2(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("EVENTFLOW_REDIS__SOCKET_TIMEOUT_S", "-1")
    assert main(["consumer"]) == 2
    assert "EVENTFLOW_REDIS__SOCKET_TIMEOUT_S" in capsys.readouterr().err


def test_cli_rejects_bad_argument(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["up", "--consumers", "0"])
    assert info.value.code == 2
    assert "--consumers" in capsys.readouterr().err


def test_reclaim_threshold_must_exceed_the_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTFLOW_REAPER__MIN_IDLE_MS", "20000")
    monkeypatch.setenv("EVENTFLOW_CONSUMER__LEASE_TTL_MS", "30000")
    with pytest.raises(ConfigError, match="EVENTFLOW_REAPER__MIN_IDLE_MS"):
        load_settings()
