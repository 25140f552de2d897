"""The alert rules made to fire: `promtool test rules` on synthetic series (tests/deploy/alerts_test.yml).

The scrape test (test_deploy_files.py) only sees every rule stay quiet on a healthy server; here each
alert fires on series that meet its condition, not before its `for:`, and not on near misses.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.deploy.test_deploy_files import RULES, run, tool

RULE_TESTS = Path(__file__).parent / "alerts_test.yml"


def test_every_alert_fires_on_its_condition_and_stays_quiet_on_a_healthy_server():
    r = run(tool("promtool"), "test", "rules", str(RULE_TESTS))
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_the_rule_tests_cover_every_alert_both_ways():
    spec = yaml.safe_load(RULE_TESTS.read_text())
    assert [(RULE_TESTS.parent / f).resolve() for f in spec["rule_files"]] == [RULES.resolve()]
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    cases = [case for test in spec["tests"] for case in test["alert_rule_test"]]
    fired = {case["alertname"] for case in cases if case["exp_alerts"]}
    quiet = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert fired == alerts, f"never made to fire: {sorted(alerts - fired)}"
    assert quiet == alerts, f"never shown quiet: {sorted(alerts - quiet)}"
