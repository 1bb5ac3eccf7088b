import apache_beam as beam
from apache_beam.testing.util import assert_that

from paircurate.transforms.beam_util import test_pipeline
from paircurate.transforms.schema import new_record
from paircurate.transforms.validate import CaptionFilter, FilterConfig, ValidateAndFilter, ValidateInput, keep_first

validate = ValidateInput().apply


def prefilter_caption(record, config, has_captions=True):
    return CaptionFilter(config, has_captions).apply(record)


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


def test_non_string_url_or_caption_is_invalid_and_fits_the_ledger():
    """A bad type must not break the ledger's string columns: the value is kept as its JSON text."""
    import pyarrow as pa

    from paircurate.transforms.schema import ledger_row, ledger_schema

    cases = [(rec(42), "url: not a string (int)", "42", "a fine caption"),
             (rec(["http://h/a", "http://h/b"]), "url: not a string (list)", '["http://h/a", "http://h/b"]',
              "a fine caption"),
             (rec("http://h", caption=["a", 1]), "caption: not a string (list)", "http://h", '["a", 1]'),
             (rec(None, caption={"k": 2}), "url: missing", None, '{"k": 2}'),
             (rec(b"http://h", caption=7), "url: not a string (bytes)", "b'http://h'", "7")]
    rows = []
    for record, error, url, caption in cases:
        out = validate(record)
        assert (out["status"], out["error"], out["url"], out["caption"]) == \
            ("invalid_input", error, url, caption)
        rows.append(ledger_row(out, []))
    assert pa.Table.from_pylist(rows, schema=ledger_schema()).num_rows == len(cases)


def test_url_without_scheme_is_invalid_input():
    for url in ("notaurl", "www.example.com/a.jpg", "//example.com/a.jpg", "/a/b.jpg"):
        out = validate(rec(url))
        assert (out["status"], out["error"]) == ("invalid_input", "url: no scheme"), url
    # Schemes other than http(s) are left to the fetch stage, which blocks them (blocked_address).
    for url in ("file:///etc/passwd", "ftp://h/a.jpg", "javascript:alert(1)", "http://h/a.jpg"):
        assert validate(rec(url))["status"] == "ok", url
