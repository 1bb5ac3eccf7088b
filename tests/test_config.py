import math

import pytest

from paircurate.config import Config, ConfigError, load_config, parse_override


def test_defaults_match_local_yaml():
    # configs/local.yaml documents every key with its default.
    assert load_config().to_dict() == Config().to_dict()


def test_override_types_and_lists():
    config = load_config(overrides=["clip.min_score=0.3", "fetch.allowed_hosts=[127.0.0.1:8080]",
                                    "image.max_aspect_ratio=inf", "fetch.timeout=2"])
    assert config.clip.min_score == 0.3
    assert config.fetch.allowed_hosts == ["127.0.0.1:8080"]
    assert math.isinf(config.image.max_aspect_ratio)
    assert config.fetch.timeout == 2.0 and isinstance(config.fetch.timeout, float)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["fetch.tiemout=3"])
    message = str(info.value)
    assert "fetch.tiemout" in message and "timeout" in message and "connect_timeout" in message


def test_unknown_section_lists_sections():
    with pytest.raises(ConfigError, match="valid sections: input, filter, fetch"):
        load_config(overrides=["fetcher.timeout=3"])


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(overrides=["output.samples_per_shard=many"])
    with pytest.raises(ConfigError, match="expected true or false"):
        load_config(overrides=["clip.enabled=maybe"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="not both"):
        load_config(overrides=["clip.min_score=0.3", "clip.keep_fraction=0.3"])
    with pytest.raises(ConfigError, match="resize_mode"):
        load_config(overrides=["image.resize_mode=stretch"])
    with pytest.raises(ConfigError, match="compression level"):
        load_config(overrides=["image.encode_format=png"])
    assert load_config(overrides=["image.encode_format=png", "image.encode_quality=9"]).image.encode_quality == 9


def test_parse_override_needs_section_and_key():
    with pytest.raises(ConfigError):
        parse_override("timeout=3")
    assert parse_override("a.b=x=y") == {"a": {"b": "x=y"}}


def test_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output:\n  samples_per_shard: 7\n")
    assert load_config(str(path)).output.samples_per_shard == 7
    path.write_text("output: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
