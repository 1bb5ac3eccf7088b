import gzip
import json

import pytest
from apache_beam.testing.util import assert_that

from paircurate.transforms.beam_util import test_pipeline
from paircurate.transforms.read import (
    InputConfig,
    InputError,
    ReadInput,
    carried_columns,
    detect_format,
    iter_lines,
    iter_rows,
    make_uid,
    plan_reads,
    to_record,
)


def read_all(pattern, config=None):
    config = config or InputConfig()
    tasks = plan_reads(pattern, config)
    carried = [f.name for f in carried_columns(tasks, config)]
    text = bool(tasks) and tasks[0].fmt == "jsonl"
    return [to_record(t, pos, row, config, carried, text) for t in tasks for pos, row in iter_rows(t)]


def test_detect_format():
    assert detect_format("a/b.parquet") == ("parquet", False)
    assert detect_format("a/b.tsv.gz") == ("tsv", True)
    assert detect_format("x.data", "csv") == ("csv", False)
    with pytest.raises(InputError, match="input.format"):
        detect_format("x.data")


def test_every_format_reads_the_same_rows(tmp_path, parquet_input):
    rows = [{"url": f"http://h/{i}.jpg", "caption": f"caption number {i}", "lang": "en"} for i in range(7)]
    parquet_input(rows, "in.parquet")
    (tmp_path / "in.csv").write_text("url,caption,lang\n" + "".join(
        f'{r["url"]},"{r["caption"]}",en\n' for r in rows))
    (tmp_path / "in.tsv").write_text("url\tcaption\tlang\n" + "".join(
        f'{r["url"]}\t{r["caption"]}\ten\n' for r in rows))
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(tmp_path / "in2.jsonl.gz", "wt") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("in.parquet", "in.csv", "in.tsv", "in.jsonl", "in2.jsonl.gz"):
        records = read_all(str(tmp_path / name))
        assert [(r["url"], r["caption"], r["extra"]["lang"]) for r in records] == \
            [(r["url"], r["caption"], "en") for r in rows], name
        assert len({r["uid"] for r in records}) == len(rows)


def test_txt_has_urls_only(tmp_path):
    (tmp_path / "urls.txt").write_text("http://a/1.jpg\n\nhttp://a/2.jpg\n")
    records = read_all(str(tmp_path / "urls.txt"))
    assert [(r["url"], r["caption"]) for r in records] == [("http://a/1.jpg", None), ("http://a/2.jpg", None)]


def test_byte_ranges_cover_every_line_once(tmp_path):
    lines = [f"http://host/{i}/{'x' * (i % 13)}.jpg\n" for i in range(500)]
    path = tmp_path / "big.txt"
    path.write_text("".join(lines))
    config = InputConfig(split_bytes=97)  # ranges end mid-line almost always
    tasks = plan_reads(str(path), config)
    assert len(tasks) > 50
    offsets = [off for t in tasks for off, _ in iter_lines(t)]
    assert offsets == sorted(set(offsets))
    got = [line.decode() for t in tasks for _, line in iter_lines(t)]
    assert got == lines


def test_parquet_row_groups_give_global_positions(tmp_path, parquet_input):
    rows = [{"url": f"http://h/{i}", "caption": "a long caption", "n": i} for i in range(25)]
    path = parquet_input(rows, row_group_size=4)
    tasks = plan_reads(path, InputConfig())
    assert len(tasks) == 7
    records = read_all(path)
    assert [r["position"] for r in records] == list(range(25))
    assert [r["extra"]["n"] for r in records] == list(range(25))


def test_folder_and_glob(tmp_path, parquet_input):
    (tmp_path / "d").mkdir()
    parquet_input([{"url": "http://a", "caption": "first file"}], "d/a.parquet")
    parquet_input([{"url": "http://b", "caption": "second file"}], "d/b.parquet")
    assert len(read_all(str(tmp_path / "d"))) == 2
    assert len(read_all(str(tmp_path / "d" / "*.parquet"))) == 2
    with pytest.raises(InputError, match="no input files"):
        plan_reads(str(tmp_path / "nothing*.parquet"), InputConfig())


def test_uid_is_stable_and_content_bound():
    assert make_uid("a", 1, "u", "c") == make_uid("a", 1, "u", "c")
    assert len({make_uid("a", 1, "u", "c"), make_uid("a", 2, "u", "c"),
                make_uid("b", 1, "u", "c"), make_uid("a", 1, "u", "d")}) == 4


def test_custom_columns_and_clashing_names(tmp_path, parquet_input):
    path = parquet_input([{"URL": "http://h/1", "TEXT": "a caption here", "status": "x", "width": 5}])
    config = InputConfig(url_col="URL", caption_col="TEXT")
    tasks = plan_reads(path, config)
    names = [f.name for f in carried_columns(tasks, config)]
    assert names == ["input_status", "input_width"]
    (record,) = read_all(path, config)
    assert record["url"] == "http://h/1" and record["caption"] == "a caption here"
    assert record["extra"] == {"input_status": "x", "input_width": 5}
    assert record["status"] == "ok"


def test_jsonl_non_string_values_carried_as_json(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"url": "http://h", "caption": "cap tion", "meta": {"k": [1]}}) + "\n"
                                      + "not json\n")
    records = read_all(str(tmp_path / "a.jsonl"))
    assert records[0]["extra"]["meta"] == '{"k": [1]}'
    assert records[1]["extra"]["__invalid__"] == "not valid JSON"


def test_beam_read_spreads_tasks(tmp_path, parquet_input):
    rows = [{"url": f"http://h/{i}", "caption": "caption text"} for i in range(30)]
    path = parquet_input(rows, row_group_size=5)
    config = InputConfig()
    tasks = plan_reads(path, config)
    carried = carried_columns(tasks, config)

    def check(records):
        assert sorted(r["position"] for r in records) == list(range(30))
    with test_pipeline() as p:
        assert_that(p | ReadInput(tasks, config, carried), check)


def test_files_must_share_format_and_columns(tmp_path, parquet_input):
    (tmp_path / "d").mkdir()
    parquet_input([{"url": "http://a", "caption": "first file", "lang": "en"}], "d/a.parquet")
    parquet_input([{"url": "http://b", "caption": "second file"}], "d/b.parquet")
    with pytest.raises(InputError, match="share their columns"):
        plan_reads(str(tmp_path / "d"), InputConfig())
    (tmp_path / "e").mkdir()
    parquet_input([{"url": "http://a", "caption": "first file"}], "e/a.parquet")
    (tmp_path / "e" / "b.csv").write_text("url,caption\nhttp://b,second file\n")
    with pytest.raises(InputError, match="share one format"):
        plan_reads(str(tmp_path / "e"), InputConfig())


def test_jsonl_keys_beyond_the_sample_are_kept(tmp_path, monkeypatch):
    import paircurate.transforms.read as read

    monkeypatch.setattr(read, "JSONL_SAMPLE", 2)
    lines = [{"url": f"http://h/{i}", "caption": "caption text", "a": i} for i in range(3)]
    lines.append({"url": "http://h/9", "caption": "caption text", "late": [1, 2]})
    (tmp_path / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    tasks = plan_reads(str(tmp_path / "x.jsonl"), InputConfig())
    names = [f.name for f in carried_columns(tasks, InputConfig())]
    assert names == ["a", read.JSONL_OVERFLOW]
    records = read_all(str(tmp_path / "x.jsonl"))
    assert records[3]["extra"][read.JSONL_OVERFLOW] == '{"late": [1, 2]}'
    assert records[0]["extra"]["a"] == "0" and read.JSONL_OVERFLOW not in records[0]["extra"]


# --- Bad rows: each becomes one invalid record, the rest of the file is read --------------

def problems(records):
    """(url, problem) per record; the problem is what validate reports as "row: ..."."""
    return [(r["url"], r["extra"].get("__invalid__")) for r in records]


def encodable(record):
    """The record survives Beam's coders and the ledger: every string is valid UTF-8."""
    json.dumps(record, ensure_ascii=False, default=str).encode("utf-8")
    return True


def test_jsonl_lone_surrogate_marks_the_row(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        '{"url": "http://h/1", "caption": "bad \\ud800 caption"}\n'
        '{"url": "http://h/2", "caption": "a good caption", "tags": ["x\\udfff"]}\n'
        '{"url": "http://h/3", "caption": "a good caption"}\n')
    records = read_all(str(tmp_path / "a.jsonl"))
    assert [r["url"] for r in records] == ["http://h/1", "http://h/2", "http://h/3"]
    assert records[0]["caption"] == "bad \\ud800 caption"  # shown escaped, not lost
    assert "lone surrogate" in records[0]["extra"]["__invalid__"]
    assert "caption" in records[0]["extra"]["__invalid__"]
    assert "tags" in records[1]["extra"]["__invalid__"]
    assert "__invalid__" not in records[2]["extra"]
    assert all(encodable(r) for r in records)


def test_non_utf8_lines_mark_the_row_in_every_text_format(tmp_path):
    latin = "café".encode("latin-1")
    (tmp_path / "a.csv").write_bytes(b"url,caption\nhttp://h/1,good caption\nhttp://h/2," + latin
                                     + b"\nhttp://h/3,good caption\n")
    (tmp_path / "a.tsv").write_bytes(b"url\tcaption\nhttp://h/1\tgood caption\nhttp://h/2\t" + latin
                                     + b"\nhttp://h/3\tgood caption\n")
    (tmp_path / "a.jsonl").write_bytes(b'{"url": "http://h/1", "caption": "good caption"}\n'
                                       b'{"url": "http://h/2", "caption": "' + latin + b'"}\n'
                                       b'{"url": "http://h/3", "caption": "good caption"}\n')
    (tmp_path / "a.txt").write_bytes(b"http://h/1\nhttp://h/2/" + latin + b"\nhttp://h/3\n")
    for name in ("a.csv", "a.tsv", "a.jsonl", "a.txt"):
        records = read_all(str(tmp_path / name))
        assert [p for _, p in problems(records)] == [None, "not UTF-8", None], name
        assert records[0]["url"] == "http://h/1" and records[2]["url"] == "http://h/3", name
        assert all(encodable(r) for r in records), name
    (bad,) = [r for r in read_all(str(tmp_path / "a.csv")) if r["extra"].get("__invalid__")]
    assert bad["url"] == "http://h/2" and bad["caption"] == "caf\\xe9"  # the bytes stay visible


def test_field_over_the_csv_limit_marks_the_row(tmp_path):
    huge = "x" * 200_000
    (tmp_path / "a.csv").write_text(f"url,caption\nhttp://h/1,good caption\nhttp://h/2,{huge}\n"
                                    f'http://h/3,"{huge}"\nhttp://h/4,good caption\n')
    (tmp_path / "a.tsv").write_text(f"url\tcaption\nhttp://h/1\tgood caption\nhttp://h/2\t{huge}\n"
                                    f"http://h/4\tgood caption\n")
    csv_rows = problems(read_all(str(tmp_path / "a.csv")))
    assert [u for u, p in csv_rows if p is None] == ["http://h/1", "http://h/4"]
    assert [p for _, p in csv_rows if p] == ["a field is longer than 131072 characters"] * 2
    tsv_rows = problems(read_all(str(tmp_path / "a.tsv")))
    assert [u for u, p in tsv_rows if p is None] == ["http://h/1", "http://h/4"]
    assert [p for _, p in tsv_rows if p] == ["a field is longer than 131072 characters"]


def test_csv_rows_with_extra_or_missing_fields_are_marked(tmp_path):
    (tmp_path / "a.csv").write_text("url,caption,lang\nhttp://h/1,good caption,en\n"
                                    "http://h/2,a caption, with a comma,en\nhttp://h/3,short\n"
                                    "http://h/4,good caption,en\n")
    assert problems(read_all(str(tmp_path / "a.csv"))) == [
        ("http://h/1", None), ("http://h/2", "expected 3 fields, got 4"),
        ("http://h/3", "expected 3 fields, got 2"), ("http://h/4", None)]


def test_csv_unbalanced_quote_loses_no_row(tmp_path):
    good = [f"http://h/{i},caption {i}\n" for i in range(5)]
    # A stray quote opens a field that never closes: before, it swallowed every following row.
    (tmp_path / "eof.csv").write_text("url,caption\n" + good[0] + 'http://h/bad,"unclosed caption\n'
                                      + "".join(good[1:]))
    records = read_all(str(tmp_path / "eof.csv"))
    assert [r["url"] for r in records if not r["extra"].get("__invalid__")] == \
        [f"http://h/{i}" for i in range(5)]
    assert [r["extra"].get("__invalid__") for r in records] == \
        [None, "unbalanced quote (line 3)", None, None, None, None]
    # Two stray quotes: the one after the first closes nothing, so strict CSV rejects the span.
    (tmp_path / "pair.csv").write_text("url,caption\n" + good[0] + 'http://h/bad,"open\n'
                                       + good[1] + 'http://h/bad2,x"y" z\n' + good[2])
    assert problems(read_all(str(tmp_path / "pair.csv"))) == [
        ("http://h/0", None), ("http://h/bad", "unbalanced quote (line 3)"), ("http://h/1", None),
        ("http://h/bad2", None), ("http://h/2", None)]
    # The last line opens a quote: csv hands back its record at the end of the file.
    (tmp_path / "last.csv").write_text("url,caption\n" + good[0] + 'http://h/bad,"open at the end\n')
    assert problems(read_all(str(tmp_path / "last.csv"))) == [
        ("http://h/0", None), ("http://h/bad", "unbalanced quote (line 3)")]
    # A quoted caption that legitimately spans lines is one row.
    (tmp_path / "multi.csv").write_text('url,caption\nhttp://h/1,"two\nlines"\n' + good[2])
    assert [(r["url"], r["caption"]) for r in read_all(str(tmp_path / "multi.csv"))] == \
        [("http://h/1", "two\nlines"), ("http://h/2", "caption 2")]


def test_parquet_columns_must_share_types(tmp_path, parquet_input):
    (tmp_path / "d").mkdir()
    parquet_input([{"url": "http://a", "caption": "first file", "n": 1}], "d/a.parquet")
    parquet_input([{"url": "http://b", "caption": "second file", "n": "one"}], "d/b.parquet")
    with pytest.raises(InputError) as info:
        plan_reads(str(tmp_path / "d"), InputConfig())
    message = str(info.value)
    assert "'n'" in message and "a.parquet" in message and "b.parquet" in message
    assert "int64" in message and "string" in message


@pytest.mark.parametrize("content", [b"", b"not a parquet file at all" * 10, b"PAR1garbagePAR1"])
def test_unreadable_parquet_is_one_input_error(tmp_path, content):
    path = tmp_path / "bad.parquet"
    path.write_bytes(content)
    with pytest.raises(InputError, match="bad.parquet"):
        plan_reads(str(path), InputConfig())


@pytest.mark.parametrize("name", ["a.csv.gz", "a.tsv.gz", "a.jsonl.gz", "a.txt.gz"])
def test_corrupt_gzip_is_found_when_planning(tmp_path, name):
    (tmp_path / name).write_bytes(b"this is not gzip data\n" * 20)
    with pytest.raises(InputError, match=name.replace(".", r"\.")):
        plan_reads(str(tmp_path / name), InputConfig())


def test_gzip_truncated_mid_file_is_found_when_planning(tmp_path):
    import os

    text = "".join(json.dumps({"url": f"http://h/{i}", "caption": os.urandom(30).hex()}) + "\n"
                   for i in range(20000))
    data = gzip.compress(text.encode())
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "d" / "fine.jsonl.gz").write_bytes(data)
    with pytest.raises(InputError, match=r"cut\.jsonl\.gz.*truncated"):
        plan_reads(str(tmp_path / "d"), InputConfig())
    # Damaged after planning (or missed by it): reading names the file and where it broke off.
    task = plan_reads(str(tmp_path / "d" / "fine.jsonl.gz"), InputConfig())[0]
    (tmp_path / "d" / "fine.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"fine\.jsonl\.gz cannot be read past row \d+"):
        list(iter_rows(task))


@pytest.mark.parametrize("fmt,sep", [("csv", ","), ("tsv", "\t")])
def test_non_utf8_header_is_one_input_error(tmp_path, fmt, sep):
    (tmp_path / f"a.{fmt}").write_bytes(sep.join(["url", "caption", "légende"]).encode("latin-1")
                                       + b"\nhttp://h/1" + sep.encode() + b"good caption"
                                       + sep.encode() + b"x\n")
    with pytest.raises(InputError, match=rf"a\.{fmt}.*UTF-8"):
        plan_reads(str(tmp_path / f"a.{fmt}"), InputConfig())


def test_parquet_strings_that_are_not_utf8_mark_their_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    urls = pa.array([b"http://h/\xff", b"http://h/ok", None], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"url": urls, "caption": ["one caption", "two caption", "three"]}),
                   str(tmp_path / "a.parquet"))
    assert problems(read_all(str(tmp_path / "a.parquet"))) == [
        ("http://h/\\xff", "not UTF-8"), ("http://h/ok", None), (None, None)]


def test_jsonl_surrogate_in_a_key_is_named(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"url": "http://h/1", "caption": "a caption", "k\\ud801": 1}\n')
    (record,) = read_all(str(tmp_path / "a.jsonl"))
    assert record["extra"]["__invalid__"].startswith("'k\\\\ud801' holds a lone surrogate")
    assert encodable(record)


def test_bare_cr_line_ends_are_refused_not_read_as_one_header(tmp_path):
    (tmp_path / "mac.csv").write_bytes(b"url,caption\rhttp://h/1,a caption\rhttp://h/2,a caption\r")
    with pytest.raises(InputError, match=r"mac\.csv.*bare CR"):
        plan_reads(str(tmp_path / "mac.csv"), InputConfig())
