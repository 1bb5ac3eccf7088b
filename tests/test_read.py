import gzip
import json

import pytest
from apache_beam.testing.util import assert_that

from paircurate.beam_util import test_pipeline
from paircurate.config import InputConfig
from paircurate.transforms.read import (InputError, ReadInput, carried_columns, detect_format,
                                        iter_lines, iter_rows, make_uid, plan_reads, to_record)


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
