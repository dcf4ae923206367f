"""Config loading: every shipped config loads; bad configs are rejected with precise paths."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from router.config import api_key_index, hash_api_key, load_config
from router.errors import ConfigError
from router.runtime import KNOWN_ADAPTERS, KNOWN_POLICIES

ROOT = Path(__file__).resolve().parents[2]
KW = {"known_adapters": KNOWN_ADAPTERS, "known_policies": KNOWN_POLICIES}

GOOD = """
channels:
  - {name: a, adapter: sandbox, base_url: "http://127.0.0.1:1", currencies: [USD]}
merchants:
  - {id: m1, api_keys: [{key: "${M1_KEY}"}]}
"""


class AnyEnv(dict[str, str]):
    """An environment in which every variable is set (examples take secrets from the environment)."""

    def __contains__(self, key: object) -> bool:
        return True

    def __getitem__(self, key: str) -> str:
        return "http://127.0.0.1:9" if key.endswith("URL") else "test-value-0123456789abcdef"


@pytest.mark.parametrize("path", sorted([ROOT / "config/demo.yaml", *(ROOT / "config/examples").glob("*.yaml")]))
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path.read_text(), env=AnyEnv(), **KW)
    assert cfg.channels and cfg.merchants


def test_env_interpolation_and_hashed_keys() -> None:
    cfg = load_config(GOOD, env={"M1_KEY": "sk_live_0123456789abcdef"}, **KW)
    assert api_key_index(cfg) == {hash_api_key("sk_live_0123456789abcdef"): "m1"}


def test_missing_env_var_is_reported() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(GOOD, env={}, **KW)
    assert e.value.problems == [("$.merchants[0].api_keys[0].key (${M1_KEY})", "environment variable is not set")]


def test_env_values_stay_strings_and_comments_are_not_interpolated() -> None:
    text = GOOD.replace("merchants:", "# ${NOT_SET_ANYWHERE} in a comment\nmerchants:")
    cfg = load_config(text, env={"M1_KEY": "1234567890123456789"}, **KW)
    assert api_key_index(cfg) == {hash_api_key("1234567890123456789"): "m1"}


@pytest.mark.parametrize(
    ("patch", "path"),
    [
        (("adapter: sandbox", "adapter: nope"), "$.channels[0].adapter"),
        (("currencies: [USD]", "currencies: [XYZ]"), "$.channels[0].currencies[0]"),
        (("currencies: [USD]", "currencies: USD"), "$.channels[0].currencies"),
        (("name: a,", "name: A B,"), "$.channels[0].name"),
        (('base_url: "http://127.0.0.1:1"', "base_url: ftp://x"), "$.channels[0].base_url"),
        (("currencies: [USD]", "currencies: [USD], colour: red"), "$.channels[0]"),
        (("id: m1", "id: 'bad id'"), "$.merchants[0].id"),
    ],
)
def test_bad_config_names_the_path(patch: tuple[str, str], path: str) -> None:
    text = GOOD.replace(*patch)
    assert text != GOOD
    with pytest.raises(ConfigError) as e:
        load_config(text, env={"M1_KEY": "sk_live_0123456789abcdef"}, **KW)
    assert any(p == path or p.startswith(path) for p, _ in e.value.problems), e.value.problems


def test_routing_must_name_known_channels_policies_and_merchants() -> None:
    text = GOOD + """
routing:
  default: [{policy: priority, order: [a, ghost]}, {policy: fastest}]
  merchants:
    nobody: [{policy: currency}]
"""
    with pytest.raises(ConfigError) as e:
        load_config(text, env={"M1_KEY": "sk_live_0123456789abcdef"}, **KW)
    paths = {p for p, _ in e.value.problems}
    assert paths == {"$.routing.default[0].order[1]", "$.routing.default[1].policy", "$.routing.merchants.nobody"}


def test_duplicates_are_rejected() -> None:
    text = """
channels:
  - {name: a, adapter: sandbox, base_url: "http://x"}
  - {name: a, adapter: sandbox, base_url: "http://y"}
merchants:
  - {id: m1, api_keys: [{key: sk_test_aaaaaaaaaaaaaaaa}]}
  - {id: m1, api_keys: [{key: sk_test_aaaaaaaaaaaaaaaa}]}
"""
    with pytest.raises(ConfigError) as e:
        load_config(text, env={}, **KW)
    paths = {p for p, _ in e.value.problems}
    assert {"$.channels[1].name", "$.merchants[1].id", "$.merchants[1].api_keys[0]"} <= paths


def test_config_check_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(GOOD.replace("${M1_KEY}", "sk_test_aaaaaaaaaaaaaaaa"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("adapter: sandbox", "adapter: nope"))
    run = [sys.executable, "-m", "router.cli", "config", "check"]
    ok = subprocess.run([*run, str(good)], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and "ok" in ok.stdout
    ko = subprocess.run([*run, str(bad)], capture_output=True, text=True, cwd=ROOT, env={"M1_KEY": "x" * 20, "PATH": ""})
    assert ko.returncode == 2 and "$.channels[0].adapter: unknown adapter 'nope'" in ko.stderr


def test_tls_verification_can_be_off_only_for_loopback() -> None:
    local = GOOD.replace('currencies: [USD]}', 'currencies: [USD], tls_verify: false}')
    load_config(local, env={"M1_KEY": "sk_live_0123456789abcdef"}, **KW)
    remote = local.replace("http://127.0.0.1:1", "https://psp.example.com")
    with pytest.raises(ConfigError) as e:
        load_config(remote, env={"M1_KEY": "sk_live_0123456789abcdef"}, **KW)
    assert [p for p, _ in e.value.problems] == ["$.channels[0].tls_verify"]


def test_success_statistics_are_tuned_from_config_and_a_reload_keeps_what_was_learned() -> None:
    from policies.success_rate import SuccessStats
    from router.runtime import Runtime

    env = {"M1_KEY": "sk_live_0123456789abcdef"}
    cfg = load_config(GOOD + "routing: {stats: {fast_half_life_events: 50, change_detection: true, mixture_half_lives: []}}\n", env=env, **KW)
    rt = Runtime(cfg)
    stats = rt.env.state["success_stats"]
    assert isinstance(stats, SuccessStats)
    assert (stats.config.fast_half_life_events, stats.config.change_detection) == (50, True)
    assert stats.config.mixture_half_lives == ()
    for i in range(30):
        stats.record("a", "", i % 3 != 0, now=float(i))
    learned = stats.counts("a", "")
    reloaded = Runtime(load_config(GOOD + "routing: {stats: {fast_half_life_events: 80}}\n", env=env, **KW), previous=rt)
    assert reloaded.env.state["success_stats"] is stats  # the same statistics, read with the new settings
    assert stats.config.fast_half_life_events == 80 and stats.config.change_detection is False
    assert len(stats.config.mixture_half_lives) == 4  # the defaults again
    assert stats.counts("a", "") == learned
    with pytest.raises(ConfigError) as e:
        load_config(GOOD + "routing: {stats: {half_life: 3}}\n", env=env, **KW)
    assert any(p.startswith("$.routing.stats") for p, _ in e.value.problems), e.value.problems


def test_statistics_are_kept_under_the_dimensions_the_chains_read_and_a_reload_widens_them() -> None:
    from router.runtime import Runtime

    env = {"M1_KEY": "sk_live_0123456789abcdef"}
    rt = Runtime(load_config(GOOD + "routing: {default: [{policy: success_rate}]}\n", env=env, **KW))
    stats = rt.env.state["success_stats"]
    assert stats.dimensions == ("none",)
    merchant = (
        "routing:\n  default: [{policy: cost, dimension: country}]\n"
        "  merchants: {m1: [{policy: success_rate, dimension: currency}]}\n"
    )
    Runtime(load_config(GOOD + merchant, env=env, **KW), previous=rt)
    assert stats.dimensions == ("none", "currency", "country")
