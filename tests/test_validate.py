import apache_beam as beam
from apache_beam.testing.util import assert_that

from paircurate.beam_util import test_pipeline
from paircurate.config import FilterConfig
from paircurate.schema import new_record
from paircurate.transforms.validate import ValidateAndFilter, keep_first, prefilter_caption, validate


def rec(url, caption="a fine caption", position=0, source="in.parquet", extra=None):
    return new_record(f"uid{source}{position}", url, caption, source, position, extra or {})


def test_validate_statuses():
    assert validate(rec(" http://h/x.jpg "))["url"] == "http://h/x.jpg"
    assert validate(rec(None))["error"] == "url: missing"
    assert validate(rec("  "))["error"] == "url: empty"
    assert validate(rec(42))["status"] == "invalid_input"
    assert validate(rec("http://h", caption=3.5))["error"] == "caption: not a string (float)"
    assert validate(rec("http://h", extra={"__invalid__": "not valid JSON"}))["error"] == "row: not valid JSON"


def test_validate_leaves_marked_records_alone():
    record = rec(None)
    record["status"] = "fetch_failed"
    assert validate(record)["status"] == "fetch_failed"


def test_caption_prefilter():
    config = FilterConfig(min_caption_length=5, max_caption_length=20)
    assert prefilter_caption(rec("u", "abcd"), config)["status"] == "caption_filtered"
    assert prefilter_caption(rec("u", "  abcd  "), config)["error"] == "too_short: 4 < 5"
    assert prefilter_caption(rec("u", "abcde"), config)["status"] == "ok"
    assert prefilter_caption(rec("u", None), config)["status"] == "caption_filtered"
    assert prefilter_caption(rec("u", "x" * 21), config)["error"].startswith("too_long")
    # URL-only inputs have no captions to filter.
    assert prefilter_caption(rec("u", None), config, has_captions=False)["status"] == "ok"


def test_keep_first_is_order_independent():
    a, b, c = rec("u", position=5), rec("u", position=2), rec("u", position=9)
    out = list(keep_first([a, b, c]))
    kept = [r for r in out if r["status"] == "ok"]
    assert [r["position"] for r in kept] == [2]
    assert {r["duplicate_of"] for r in out if r["status"] == "duplicate_input"} == {b["uid"]}


def test_beam_validate_and_dedup_counts():
    records = [rec("http://h/1", position=0), rec("http://h/1", position=1),
               rec("http://h/1", "another caption", position=2), rec("", position=3),
               rec("http://h/2", "tiny", position=4)]

    def check(out):
        statuses = sorted((r["position"], r["status"]) for r in out)
        assert statuses == [(0, "ok"), (1, "duplicate_input"), (2, "ok"),
                            (3, "invalid_input"), (4, "caption_filtered")]
    with test_pipeline() as p:
        assert_that(p | beam.Create(records) | ValidateAndFilter(FilterConfig()), check)
