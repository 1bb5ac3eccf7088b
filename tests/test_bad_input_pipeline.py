"""Bad rows of every kind mixed with good ones, through the whole pipeline: one ledger row per input row."""
import json

import pytest

from paircurate.demo import encode, synthetic_image
from paircurate.imageserver import Route
from paircurate.run import run_pipeline
from test_pipeline import config_for, read_ledger

HUGE = "x" * 200_000  # over csv's 131,072-character field limit
LATIN = "légende".encode("latin-1")


def good_rows(server, n=4):
    rows = []
    for i in range(n):
        image, caption = synthetic_image(9100 + i)
        server.routes[f"/ok/{i}.jpg"] = Route(encode(image))
        rows.append((server.url(f"/ok/{i}.jpg"), caption))
    return rows


def jsonl_input(tmp_path, server):
    """(path, [(status, error or None, url in the ledger)] in input order)."""
    (u0, c0), (u1, c1), (u2, c2), (u3, c3) = good_rows(server)
    line = lambda **row: json.dumps(row).encode() + b"\n"  # noqa: E731
    lines = [
        (line(url=u0, caption=c0), ("ok", None, u0)),
        (line(url=12345, caption="an integer for a url"), ("invalid_input", "url: not a string (int)", "12345")),
        (line(url=u1 + "?list", caption=["a", "list"]),
         ("invalid_input", "caption: not a string (list)", u1 + "?list")),
        (b'{"url": "' + u1.encode() + b'?s", "caption": "lone \\ud800 surrogate"}\n',
         ("invalid_input", "row: 'caption' holds a lone surrogate", u1 + "?s")),
        (line(url=u1, caption=c1), ("ok", None, u1)),
        (b'{"url": "' + u1.encode() + b'?latin", "caption": "' + LATIN + b'"}\n',
         ("invalid_input", "row: not UTF-8", u1 + "?latin")),
        (line(url="notaurl", caption="a url without a scheme"), ("invalid_input", "url: no scheme", "notaurl")),
        (line(url="file:///etc/passwd", caption="a local file"), ("blocked_address", "scheme", "file:///etc/passwd")),
        (b"{not json\n", ("invalid_input", "row: not valid JSON", None)),
        (line(url=u2, caption=c2), ("ok", None, u2)),
        (line(url=[u3], caption=c3), ("invalid_input", "url: not a string (list)", json.dumps([u3]))),
        (line(url=u3, caption=c3), ("ok", None, u3)),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"".join(text for text, _ in lines))
    return str(path), [want for _, want in lines]


def csv_input(tmp_path, server):
    (u0, c0), (u1, c1), (u2, c2), (u3, c3) = good_rows(server)
    lines = [
        (f"{u0},{c0},a\n".encode(), ("ok", None, u0)),
        (f"{u1}?huge,{HUGE},b\n".encode(),
         ("invalid_input", "row: a field is longer than 131072 characters", None)),
        (f"{u1}?latin,".encode() + LATIN + b",c\n", ("invalid_input", "row: not UTF-8", u1 + "?latin")),
        (f"{u1},{c1},d\n".encode(), ("ok", None, u1)),
        (f"{u1}?extra,a caption,with a comma,e\n".encode(),
         ("invalid_input", "row: expected 3 fields, got 4", u1 + "?extra")),
        (f"{u1}?missing,only two\n".encode(), ("invalid_input", "row: expected 3 fields, got 2", u1 + "?missing")),
        (b"notaurl,a url without a scheme,f\n", ("invalid_input", "url: no scheme", "notaurl")),
        (f'{u1}?quote,"a quote that never closes,g\n'.encode(),
         ("invalid_input", "row: unbalanced quote (line 9)", u1 + "?quote")),
        (f'{u2},"{c2}",h\n'.encode(), ("ok", None, u2)),  # these must not be swallowed
        (f"{u3},{c3},i\n".encode(), ("ok", None, u3)),
    ]
    path = tmp_path / "mixed.csv"
    path.write_bytes(b"url,caption,tag\n" + b"".join(text for text, _ in lines))
    return str(path), [want for _, want in lines]


def parquet_input_of_bad_types(tmp_path, server):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"url": pa.array([7, 8], pa.int64()),
                      "caption": pa.array([["a", "b"], None], pa.list_(pa.string()))})
    path = tmp_path / "types.parquet"
    pq.write_table(table, str(path))
    return str(path), [("invalid_input", "url: not a string (int)", "7"),
                       ("invalid_input", "url: not a string (int)", "8")]


@pytest.mark.parametrize("make", [jsonl_input, csv_input, parquet_input_of_bad_types])
def test_bad_rows_are_marked_and_nothing_is_lost(tmp_path, image_server, make):
    path, wanted = make(tmp_path, image_server)
    stats = run_pipeline(path, str(tmp_path / "out"), config_for(image_server))
    ledger = sorted(read_ledger(str(tmp_path / "out")), key=lambda r: r["position"])
    assert len(ledger) == len(wanted) == stats["rows_in"] == stats["ledger_rows"]
    for row, (status, error, url) in zip(ledger, wanted):
        assert row["status"] == status, (row["position"], row["status"], row["error"], status)
        if error is None:
            assert row["error"] is None
        else:
            assert row["error"].startswith(error), (row["error"], error)
        assert row["url"] == url
    assert stats["by_status"]["ok"] == sum(1 for status, _, _ in wanted if status == "ok")
