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


# --- ranges and choices ------------------------------------------------------

@pytest.mark.parametrize("override", [
    "image.image_size=0", "image.image_size=-5", "fetch.timeout=-1", "fetch.timeout=0",
    "fetch.connect_timeout=-2", "fetch.url_deadline=0", "fetch.timeout=.nan", "fetch.timeout=inf",
    "fetch.max_bytes=0", "fetch.retries=-1", "fetch.max_redirects=-1", "fetch.backoff_base=-0.5",
    "fetch.retry_after_max=-1", "fetch.per_host_concurrency=0", "fetch.threads=0",
    "input.split_bytes=0", "filter.min_caption_length=-1", "image.encode_quality=101",
    "image.max_aspect_ratio=0.5", "image.max_image_pixels=0", "image.threads=-1",
    "dedup.hash_size=1", "dedup.min_information=-1", "dedup.partitions=0", "dedup.cluster_rounds=0",
    "clip.batch_size=0", "clip.min_score=2", "clip.keep_fraction=0", "clip.keep_fraction=1.5",
    "output.samples_per_shard=0", "runner.direct_num_workers=-1",
])
def test_out_of_range_values_are_refused_naming_the_key(override):
    key, value = override.split("=", 1)
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    message = str(info.value)
    assert message.startswith(key + "=") and "must be" in message and "out of range" in message


def test_range_message_states_the_allowed_range():
    with pytest.raises(ConfigError, match=r"image.image_size=0 is out of range: must be at least 1 and at most 65535"):
        load_config(overrides=["image.image_size=0"])
    with pytest.raises(ConfigError, match=r"fetch.timeout=-1.0 is out of range: must be greater than 0$"):
        load_config(overrides=["fetch.timeout=-1"])
    with pytest.raises(ConfigError, match=r"fetch.max_bytes=0 is out of range: must be at least 1"):
        load_config(overrides=["fetch.max_bytes=0"])
    with pytest.raises(ConfigError,
                       match=r"fetch.timeout=inf is out of range: must be greater than 0, a finite number"):
        load_config(overrides=["fetch.timeout=inf"])


@pytest.mark.parametrize("override,key", [
    ("input.format=xlsx", "input.format"), ("image.resize_mode=stretch", "image.resize_mode"),
    ("image.encode_format=gif", "image.encode_format"), ("dedup.hash=md5", "dedup.hash"),
    ("clip.precision=fp8", "clip.precision"), ("clip.device=cdua", "clip.device"),
    ("clip.device=cuda:x", "clip.device"), ("runner.direct_running_mode=fast", "runner.direct_running_mode"),
])
def test_values_outside_their_choices_are_refused(override, key):
    with pytest.raises(ConfigError, match="must be") as info:
        load_config(overrides=[override])
    assert str(info.value).startswith(key)


@pytest.mark.parametrize("overrides,match", [
    (["filter.min_caption_length=20", "filter.max_caption_length=10"], "min_caption_length"),
    (["dedup.max_distance=65"], "dedup.max_distance"),
    (["dedup.blocks=3", "dedup.max_distance=6"], "dedup.blocks"),
    (["dedup.hash_size=16"], "at most 8"),
])
def test_cross_key_checks(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=overrides)


def test_limits_at_their_edges_are_accepted():
    config = load_config(overrides=[
        "image.image_size=1", "fetch.retries=0", "fetch.max_redirects=0", "fetch.max_bytes=1",
        "fetch.url_deadline=0.5", "clip.keep_fraction=1", "clip.device=cuda:1", "image.max_aspect_ratio=1",
        "dedup.hash_size=16", "dedup.near=false", "runner.direct_num_workers=0", "dedup.blocks=7"])
    assert config.fetch.url_deadline == 0.5 and config.clip.device == "cuda:1"
    assert load_config(overrides=["clip.min_score=-1"]).clip.min_score == -1.0


def test_every_numeric_key_has_a_declared_range():
    import dataclasses
    import typing

    from paircurate.config import CHOICES, RANGES

    numeric = set()

    def collect(cls, prefix):
        hints = typing.get_type_hints(cls)
        for key in dataclasses.fields(cls):
            hint = hints[key.name]
            if dataclasses.is_dataclass(hint):  # a nested section (dedup.semantic)
                collect(hint, f"{prefix}{key.name}.")
                continue
            args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
            if args[0] in (int, float):
                numeric.add(f"{prefix}{key.name}")

    collect(Config, "")
    assert "dedup.semantic.min_cosine" in numeric
    assert numeric == set(RANGES)
    assert {"input.format", "image.resize_mode", "image.encode_format", "dedup.hash"} <= set(CHOICES)


def test_nested_section_from_yaml_and_overrides():
    config = load_config(overrides=["dedup.semantic.enabled=true", "dedup.semantic.min_cosine=0.9"])
    assert config.dedup.semantic.enabled and config.dedup.semantic.min_cosine == 0.9
    assert config.dedup.semantic.bands == 30  # the rest of the nested section keeps its defaults
    with pytest.raises(ConfigError, match=r"unknown key 'dedup.semantic.min_cos'"):
        load_config(overrides=["dedup.semantic.min_cos=0.9"])
    with pytest.raises(ConfigError, match=r"dedup.semantic.min_cosine=1.5 is out of range"):
        load_config(overrides=["dedup.semantic.min_cosine=1.5"])
    with pytest.raises(ConfigError, match="multiple of 8"):
        load_config(overrides=["dedup.semantic.bits=12"])
    with pytest.raises(ConfigError, match="needs the CLIP stage"):
        load_config(overrides=["dedup.semantic.enabled=true", "clip.enabled=false"])
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(overrides=["dedup.semantic=3"])


@pytest.mark.parametrize("name", ["local", "dataflow", "spark", "nightly"])
def test_shipped_configs_load(name):
    load_config(name)
