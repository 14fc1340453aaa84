"""Prometheus rules of the Docker stack (docker/prometheus/): promtool checks and unit tests.

``promtool test rules`` runs the unit tests in docker/prometheus/tests/, which feed synthetic
series to the recording rules and alerts. This module runs them, checks that every alert has a
case where it fires and one where it stays quiet, and breaks each alert on purpose (in a copy)
to prove that the unit tests notice: a unit test that cannot fail would prove nothing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "docker" / "prometheus"
RULES_DIR = PROMETHEUS_DIR / "rules"
RULE_FILES = sorted(RULES_DIR.glob("*.yml"))
TEST_FILES = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
ALERTS_FILE = RULES_DIR / "alerts.yml"

LABEL = re.compile(r'(\w+)="([^"]*)"')


def run_promtool(
    promtool: str, *args: str | Path, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    """Run promtool with a timeout; stdout and stderr are captured as text."""
    return subprocess.run(
        [promtool, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def load_yaml(path: Path) -> Any:
    """Parse one YAML file."""
    return yaml.safe_load(path.read_text())


def alert_rules(path: Path = ALERTS_FILE) -> dict[str, dict[str, Any]]:
    """Every alerting rule of a rules file, by alert name."""
    return {
        rule["alert"]: rule
        for group in load_yaml(path)["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


# ---- promtool check / test ---------------------------------------------------------------------
def test_rule_files_exist() -> None:
    """The stack ships recording rules, alerts and their unit tests."""
    assert [p.name for p in RULE_FILES] == ["alerts.yml", "recording.yml"]
    assert TEST_FILES, "no promtool unit tests in docker/prometheus/tests"


def test_promtool_check_rules(promtool: str) -> None:
    """``promtool check rules`` accepts every rules file (syntax, PromQL, templates)."""
    result = run_promtool(promtool, "check", "rules", *RULE_FILES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_FILES)


@pytest.mark.parametrize("test_file", TEST_FILES, ids=lambda p: p.name)
def test_promtool_unit_tests_pass(promtool: str, test_file: Path) -> None:
    """Each promtool unit test file passes against the shipped rules."""
    result = run_promtool(promtool, "test", "rules", test_file)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alerts_have_severity_and_annotations() -> None:
    """Every alert has a severity and a summary and description that show the value or target."""
    alerts = alert_rules()
    assert set(alerts) == {
        "AdpredictP99LatencyAboveSLA",
        "AdpredictTimeoutRatioHigh",
        "AdpredictOnTimeSLOBurnFast",
        "AdpredictOnTimeSLOBurnMedium",
        "AdpredictOnTimeSLOBurnSlow",
        "AdpredictModelLoadFailures",
        "AdpredictNoModelLoaded",
        "AdpredictTargetDown",
    }
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), name
        assert "$value" in annotations["description"], f"{name}: description must show the value"


# ---- coverage: a firing and a quiet case per alert ---------------------------------------------
@dataclass(frozen=True)
class AlertCase:
    """One ``alert_rule_test`` entry with the entities its test group feeds."""

    file: str
    group: str
    eval_time: str
    expected: tuple[dict[str, str], ...]  # exp_labels of each expected alert
    entities: frozenset[tuple[str, str]]  # (label, value) of model/instance in the input series


def alert_cases() -> dict[str, list[AlertCase]]:
    """Every alert_rule_test of every unit test file, by alert name."""
    cases: dict[str, list[AlertCase]] = {}
    for path in TEST_FILES:
        for group in load_yaml(path)["tests"]:
            entities = frozenset(
                (key, value)
                for series in group.get("input_series", [])
                for key, value in LABEL.findall(series["series"])
                if key in ("model", "instance")
            )
            for test in group.get("alert_rule_test", []):
                expected = tuple(
                    {k: str(v) for k, v in alert["exp_labels"].items()}
                    for alert in test.get("exp_alerts") or []
                )
                cases.setdefault(test["alertname"], []).append(
                    AlertCase(path.name, group["name"], str(test["eval_time"]), expected, entities)
                )
    return cases


def is_quiet_case(case: AlertCase) -> bool:
    """True if the case expects no alert for at least one model or instance it was fed."""
    if not case.expected:
        return True
    key = "model" if all("model" in labels for labels in case.expected) else "instance"
    fired = {labels[key] for labels in case.expected}
    return any(k == key and value not in fired for k, value in case.entities)


@pytest.mark.parametrize("alert", sorted(alert_rules()))
def test_every_alert_has_firing_and_quiet_cases(alert: str) -> None:
    """Each alert is unit-tested firing, and quiet for some input it was given."""
    cases = alert_cases().get(alert, [])
    assert any(case.expected for case in cases), f"{alert}: no unit test where it fires"
    assert any(is_quiet_case(case) for case in cases), f"{alert}: no unit test where it stays quiet"


def test_unit_tests_name_only_real_alerts() -> None:
    """A unit test of a misspelt alert would pass vacuously (nothing fires): none is allowed."""
    assert set(alert_cases()) <= set(alert_rules())


# ---- the unit tests notice broken alerts -------------------------------------------------------
Mutation = Callable[[dict[str, Any]], None]


def never_fires(rule: dict[str, Any]) -> None:
    """The alert's condition can never hold."""
    rule["expr"] = "vector(1) < 0"


def no_for(rule: dict[str, Any]) -> None:
    """The alert fires at once instead of after its ``for`` duration."""
    assert "for" in rule
    rule.pop("for")


def replace_in_expr(old: str, new: str) -> Mutation:
    """A mutation that replaces ``old`` (which must occur) in the alert's expression."""

    def mutate(rule: dict[str, Any]) -> None:
        assert old in rule["expr"], f"{old!r} not in {rule['expr']!r}"
        rule["expr"] = rule["expr"].replace(old, new)

    mutate.__doc__ = f"{old!r} -> {new!r}"
    return mutate


# (alert, what breaks, mutation): each must make some unit test fail.
MUTATIONS: list[tuple[str, str, Mutation]] = [
    *((alert, "never fires", never_fires) for alert in sorted(alert_rules())),
    ("AdpredictP99LatencyAboveSLA", "no 5m pending", no_for),
    (
        "AdpredictP99LatencyAboveSLA",
        "fixed 50ms SLA",
        replace_in_expr("adpredict:sla_seconds", "(0 * adpredict:sla_seconds + 0.05)"),
    ),
    ("AdpredictTimeoutRatioHigh", "no 5m pending", no_for),
    ("AdpredictTimeoutRatioHigh", "0.1% threshold", replace_in_expr("0.0001", "0.001")),
    ("AdpredictOnTimeSLOBurnFast", "long window only", replace_in_expr("and on", "or on")),
    ("AdpredictOnTimeSLOBurnMedium", "long window only", replace_in_expr("and on", "or on")),
    ("AdpredictOnTimeSLOBurnSlow", "long window only", replace_in_expr("and on", "or on")),
    ("AdpredictOnTimeSLOBurnFast", "factor 6", replace_in_expr("14.4 *", "6 *")),
    ("AdpredictModelLoadFailures", "1h memory", replace_in_expr("15m", "1h")),
    (
        "AdpredictModelLoadFailures",
        "misses a new series",
        replace_in_expr(" unless adpredict_model_load_failures_total offset 15m", " < 0"),
    ),
    ("AdpredictNoModelLoaded", "no 2m pending", no_for),
    ("AdpredictNoModelLoaded", "ignores a missing gauge", replace_in_expr("== 1", "== 2")),
    ("AdpredictTargetDown", "no 1m pending", no_for),
]


@pytest.mark.parametrize(
    ("alert", "mutation"),
    [(alert, mutate) for alert, _, mutate in MUTATIONS],
    ids=[f"{alert}-{what}" for alert, what, _ in MUTATIONS],
)
def test_unit_tests_catch_a_broken_alert(
    promtool: str, tmp_path: Path, alert: str, mutation: Mutation
) -> None:
    """With one alert broken (in a copy of docker/prometheus), some unit test fails."""
    copy = tmp_path / "prometheus"
    shutil.copytree(PROMETHEUS_DIR, copy)
    rules = load_yaml(copy / "rules" / "alerts.yml")
    (rule,) = (r for g in rules["groups"] for r in g["rules"] if r.get("alert") == alert)
    mutation(rule)
    (copy / "rules" / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    checked = run_promtool(promtool, "check", "rules", copy / "rules" / "alerts.yml")
    assert checked.returncode == 0, (
        f"the mutant itself is invalid: {checked.stdout}{checked.stderr}"
    )
    # Only the files that test this alert (the 1-day burn test is the slow one).
    files = sorted({copy / "tests" / case.file for case in alert_cases()[alert]})
    result = run_promtool(promtool, "test", "rules", *files)
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"unit tests still pass with {alert} broken:\n{output}"
    # The failure is a wrong expectation about this alert, not an error loading the rules.
    assert f"alertname: {alert}," in output, output
