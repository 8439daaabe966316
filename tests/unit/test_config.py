import pytest

from orchestrator.config import ConfigError, load_config


def test_yaml_file_then_flags_on_top(tmp_path):
    f = tmp_path / "tidal.yaml"
    f.write_text("instances: 4\ndispatch_policy: least-load\nengine:\n  model: tiny-llama\n  kv_cache_gib: 0.5\n"
                 "migration:\n  max_stages: 2\n")
    cfg = load_config(f, {"instances": 3, "kv_cache_gib": None, "port": 6000})
    assert cfg.instances == 3 and cfg.port == 6000          # flags win
    assert cfg.dispatch_policy == "least-load"               # the file fills what flags leave out
    assert cfg.engine.model == "tiny-llama" and cfg.engine.kv_cache_gib == 0.5
    assert cfg.migration.max_stages == 2
    assert cfg.rebalance.request_cooldown_s == 10.0 and cfg.rebalance.max_waiting_offers == 4   # policy defaults


def test_toml_file(tmp_path):
    f = tmp_path / "tidal.toml"
    f.write_text('instances = 2\n[engine]\nmodel = "tiny-llama"\nblock_size = 32\n')
    cfg = load_config(f, {})
    assert cfg.engine.block_size == 32 and cfg.instances == 2


@pytest.mark.parametrize("text, words", [
    ("instances: 0\n", "instances"),
    ("dispatch_policy: fastest\n", "dispatch_policy"),
    ("engine:\n  block_size: -1\n", "block_size"),
    ("no_such_setting: 1\n", "no_such_setting"),
    ("migrate_request_cooldown_s: -1\n", "migrate_request_cooldown_s"),
    ("migrate_waiting_offers: -1\n", "migrate_waiting_offers"),
    ("rebalance:\n  request_cooldown_s: -1\n", "rebalance.request_cooldown_s"),
    ("rebalance:\n  max_waiting_offers: -1\n", "rebalance.max_waiting_offers"),
    ("rebalance:\n  choose: random\n", "shortest, longest"),
    ("pd:\n  queue_high: 0\n", "pd.queue_high"),
    ("- a list\n", "mapping"),
    ("instances: [unclosed\n", "not valid YAML"),
])
def test_bad_settings_name_what_to_fix(tmp_path, text, words):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=words.replace("[", r"\[")):
        load_config(f, {})


def test_sections_for_the_policies_and_where_old_settings_went(tmp_path):
    f = tmp_path / "tidal.yaml"
    f.write_text("rebalance:\n  auto: false\n  interval_s: 0.2\n  source_freeness: 4\npd:\n  cooldown_s: 3\n")
    cfg = load_config(f, {"pd_adaptive": True})
    assert (cfg.rebalance.auto, cfg.rebalance.interval_s, cfg.rebalance.source_freeness) == (False, 0.2, 4.0)
    assert cfg.pd.adaptive and cfg.pd.cooldown_s == 3.0
    f.write_text("auto_migrate: false\npd_cooldown_s: 3\n")
    with pytest.raises(ConfigError, match="auto_migrate is now rebalance.auto; pd_cooldown_s is now pd.cooldown_s"):
        load_config(f, {})


def test_deadlines_come_from_the_settings():
    cfg = load_config(None, {"call_timeout_s": 7.0})
    d = cfg.deadlines
    assert d.call_s == 7.0 and d.migration_s == cfg.migration.deadline_s() < d.handoff_s
    assert d.command_s(d.migration_s) > d.migration_s      # the frontend waits longer than the scheduler's move


def test_missing_file_is_a_clear_error():
    with pytest.raises(ConfigError, match="no such file"):
        load_config("/nonexistent/tidal.yaml", {})
