"""The run report and `paircurate inspect`: figures equal the ledger's, the page renders offline."""
import collections
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from html.parser import HTMLParser

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import ImageOps

from paircurate import report
from paircurate.cli import cli
from paircurate.config import load_config
from paircurate.demo import encode, synthetic_image
from paircurate.imageserver import ImageServer, Route
from paircurate.run import run_pipeline
from paircurate.transforms.schema import STATUS_ORDER, error_class

CHROMIUM = "/usr/bin/chromium"
N_GOOD = 12
HOSTILE_CAPTION = 'a <b>bold</b> & "quoted" <script>alert(1)</script> caption'


# --------------------------------------------------------------------------- pure functions

def test_funnel_counts_down_in_pipeline_order():
    by_status = {"ok": 5, "invalid_input": 2, "fetch_failed": 3, "clip_filtered": 1, "duplicate_near": 0}
    steps = report.funnel(by_status)
    assert [s["status"] for s in steps] == [s for s in STATUS_ORDER if s != "ok"]
    removed = {s["status"]: s["removed"] for s in steps}
    remaining = {s["status"]: s["remaining"] for s in steps}
    assert removed["invalid_input"] == 2 and removed["fetch_failed"] == 3 and removed["decode_failed"] == 0
    assert remaining["invalid_input"] == 9 and remaining["caption_filtered"] == 9
    assert remaining["fetch_failed"] == 6 and remaining["clip_filtered"] == 5
    assert steps[-1]["remaining"] == by_status["ok"]
    assert {s["stage"] for s in steps} >= {"fetch", "CLIP filter", "validate"}
    # a status from a newer version still counts, after the known ones
    steps = report.funnel({"ok": 1, "some_new_status": 2})
    assert steps[-1]["status"] == "some_new_status" and steps[-1]["remaining"] == 1


def test_error_classes_match_schema_error_class():
    errors = ["http_404", "timeout: read after 30 s", " dns : no such host", "not_image: text/html; x: y",
              "corrupt: line one\nline two: more", None, ""]
    got = report.error_classes(pa.array(errors, pa.string())).to_pylist()
    assert got[:5] == [error_class(e) for e in errors[:5]]
    assert got[5] is None


def test_clip_threshold_from_config():
    assert report.clip_threshold({"min_score": 0.28, "keep_fraction": None}, 0.4)[0] == 0.28
    value, label = report.clip_threshold({"min_score": None, "keep_fraction": 0.3}, 0.1234)
    assert value == 0.1234 and "keep_fraction" in label and "0.1234" in label
    assert report.clip_threshold({"min_score": None, "keep_fraction": None}, 0.1)[0] is None


def test_cluster_sizes_and_largest_clusters():
    dups = {"a": 1, "b": 3, "c": 1, "d": 2}
    assert report.cluster_size_counts(dups) == {2: 2, 3: 1, 4: 1}
    assert report.largest_clusters(dups, 3) == ["b", "d", "a"]


def test_duplicate_signal_reads_the_ledger_error():
    assert report.duplicate_signal("duplicate_exact", "exact") == "exact"
    assert report.duplicate_signal("duplicate_near", "near: exact copy of abc") == "exact"
    assert report.duplicate_signal("duplicate_near", "near: smooth distance=2 verify=0.10") == "smooth"
    assert report.duplicate_signal("duplicate_near", "near: flip distance=0 verify=0.05") == "flip"
    assert report.duplicate_signal("duplicate_near", "near: phash distance=4 verify=0.31") == "phash"
    assert report.duplicate_signal("duplicate_near", "near: distance=4") == "phash"  # older ledgers
    assert report.duplicate_signal("duplicate_semantic", "semantic: cosine 0.973 to abc") == "semantic"
    assert "duplicate_semantic" in report.summaries.DUPLICATE_STATUSES


def test_format_table_aligns_and_truncates():
    rows = [{"uid": "u1", "caption": "x" * 100, "clip_score": 0.5},
            {"uid": "u22", "caption": "two\nlines", "clip_score": None}]
    text = report.format_table(rows, ["uid", "caption", "clip_score"], max_width=10)
    lines = text.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines[:3]}) == 1
    assert "x" * 9 + "\u2026" in lines[2] and "x" * 10 not in text
    assert "two lines" in lines[3]
    assert lines[2].endswith("0.5000")  # numbers right-aligned under their header
    assert lines[0].endswith("clip_score")


# --------------------------------------------------------------------------- a finished run

def build_rows(server):
    rows = []
    for i in range(N_GOOD):
        image, caption = synthetic_image(9100 + i)
        body = encode(image)
        server.routes[f"/good/{i}.jpg"] = Route(body)
        if i == 6:  # a row without duplicates: shown in the kept grid or the CLIP-dropped table
            caption = HOSTILE_CAPTION
        rows.append({"url": server.url(f"/good/{i}.jpg"), "caption": caption})
    good0 = server.routes["/good/0.jpg"].body
    image2, caption2 = synthetic_image(9102)
    server.routes["/mirror/a.jpg"] = Route(good0)
    server.routes["/mirror/b.jpg"] = Route(good0)
    server.routes["/mirror/c.jpg"] = Route(server.routes["/good/1.jpg"].body)
    server.routes["/copy/2.jpg"] = Route(encode(image2.resize((image2.width // 2, image2.height // 2)), quality=70))
    image4, caption4 = synthetic_image(9104)
    server.routes["/flip/4.jpg"] = Route(encode(ImageOps.mirror(image4), quality=80))
    server.routes["/page.html"] = Route(b"<html>hi</html>", "text/html")
    server.routes["/corrupt.jpg"] = Route(good0[:30] + b"\x00" * 100)
    server.routes["/optout.jpg"] = Route(good0, headers=[("X-Robots-Tag", "noai")])
    rows += [
        {"url": server.url("/mirror/a.jpg"), "caption": "the same picture again"},
        {"url": server.url("/mirror/b.jpg"), "caption": "and once more"},
        {"url": server.url("/mirror/c.jpg"), "caption": "another mirror"},
        {"url": server.url("/copy/2.jpg"), "caption": caption2 + " (small copy)"},
        {"url": server.url("/flip/4.jpg"), "caption": caption4 + " (mirrored)"},
        dict(rows[3]),
        {"url": server.url("/missing/1.jpg"), "caption": "a missing picture"},
        {"url": server.url("/missing/2.jpg"), "caption": "another missing picture"},
        {"url": server.url("/page.html"), "caption": "a page, not a picture"},
        {"url": server.url("/corrupt.jpg"), "caption": "a corrupt picture"},
        {"url": server.url("/good/5.jpg"), "caption": "tiny"},
        {"url": "", "caption": "no url at all"},
        {"url": "http://169.254.169.254/latest/meta-data/", "caption": "metadata service"},
        {"url": server.url("/optout.jpg"), "caption": "an opted out picture"},
    ]
    return rows


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run with every kind of outcome, CLIP (tiny random model, keep half) and dedup on."""
    base = tmp_path_factory.mktemp("report")
    with ImageServer() as server:
        rows = build_rows(server)
        path = str(base / "input.parquet")
        pq.write_table(pa.Table.from_pylist(rows), path)
        config = load_config(overrides=[
            f"fetch.allowed_hosts=[{server.host_port}]", "fetch.timeout=5", "fetch.retries=0",
            "output.samples_per_shard=4", "clip.model_config=paircurate-tiny", "clip.pretrained=none",
            "clip.device=cpu", "clip.keep_fraction=0.5", "clip.batch_size=8"])
        out = str(base / "out")
        stats = run_pipeline(path, out, config)
    return out, stats


def read_ledger(out):
    files = sorted(glob.glob(os.path.join(out, "metadata", "*.parquet")))
    return [row for f in files for row in pq.read_table(f).to_pylist()]


class _Elements(HTMLParser):
    """Every start tag with its attributes, plus the text of the page."""

    def __init__(self):
        super().__init__()
        self.elements = []

        self.text = ""

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text += data

    def with_attr(self, name):
        return [attrs for _, attrs in self.elements if name in attrs]

    def by_id(self, ident):
        (found,) = [attrs for _, attrs in self.elements if attrs.get("id") == ident]
        return found


def parse(page):
    parser = _Elements()
    parser.feed(page)
    return parser


def test_run_writes_report_and_stats_funnel(finished):
    out, stats = finished
    assert os.path.exists(os.path.join(out, "report.html"))
    assert not glob.glob(os.path.join(out, "*.incomplete"))
    on_disk = json.load(open(os.path.join(out, "stats.json")))
    assert on_disk["funnel"] == report.funnel(on_disk["by_status"]) == stats["funnel"]
    assert on_disk["funnel"][-1]["remaining"] == on_disk["kept"]
    # Shuffle volume: the steps add up, image bytes never enter (a run with CLIP, dedup and shards).
    steps = on_disk["shuffle_bytes_by_step"]
    assert on_disk["shuffle_bytes"] == sum(steps.values()) > 0
    assert on_disk["shuffle_bytes_per_row"] == pytest.approx(on_disk["shuffle_bytes"] / on_disk["rows_in"], abs=0.1)
    assert {"GroupPairs", "GroupShards", "JoinDecisionsRecord", "GroupByPartition"} <= set(steps)
    assert steps["GroupShards"] < on_disk["shard_bytes"]  # the shards' image bytes did not cross it
    page = parse(open(os.path.join(out, "report.html"), encoding="utf-8").read())
    assert int(page.by_id("shuffle-bytes")["data-value"]) == on_disk["shuffle_bytes"]
    # Rows/s over time, from the progress the workers reported; the final sums match the ledger.
    assert page.by_id("timeline") is not None and page.with_attr("data-rate")
    assert on_disk["progress"]["counts"]["read/rows"] == on_disk["rows_in"]
    # Verification figures: pairs verified and rejected, the nearest rejected ones nearest first.
    dedup = on_disk["dedup"]
    assert dedup["verified_pairs"] >= 1 and dedup["rejected_pairs"] is not None
    nearest = [p["verify"] for p in dedup["nearest_rejected"]]
    assert nearest == sorted(nearest) and all(v > 1.0 for v in nearest)
    assert len(nearest) == min(dedup["rejected_pairs"], 20)
    shown = [float(a["data-verify"]) for a in page.with_attr("data-verify")]
    assert shown == pytest.approx(nearest[:10], abs=1e-3)


def test_report_figures_equal_the_ledger(finished):
    out, _ = finished
    ledger = read_ledger(out)
    page = parse(open(os.path.join(out, "report.html"), encoding="utf-8").read())
    by_status = collections.Counter(r["status"] for r in ledger)
    # the run exercised what the report shows
    for status in ("ok", "clip_filtered", "duplicate_exact", "duplicate_near", "fetch_failed", "duplicate_input"):
        assert by_status[status] > 0, status

    assert int(page.by_id("rows-in")["data-value"]) == len(ledger)
    assert int(page.by_id("kept")["data-value"]) == by_status["ok"]
    remaining = len(ledger)
    steps = [a for a in page.with_attr("data-funnel") if a["data-funnel"] == "step"]
    assert [a["data-status"] for a in steps] == [s for s in STATUS_ORDER if s != "ok"]
    for attrs in steps:
        remaining -= by_status[attrs["data-status"]]
        assert int(attrs["data-removed"]) == by_status[attrs["data-status"]]
        assert int(attrs["data-remaining"]) == remaining
    (kept_row,) = [a for a in page.with_attr("data-funnel") if a["data-funnel"] == "kept"]
    assert int(kept_row["data-remaining"]) == by_status["ok"] == remaining

    errors = collections.Counter((r["status"], error_class(r["error"])) for r in ledger if r["error"])
    shown = {(a["data-error-status"], a["data-error-class"]): int(a["data-count"])
             for a in page.with_attr("data-error-class")}
    assert shown == dict(errors)
    fetch_failed = sum(n for (s, _), n in errors.items() if s == "fetch_failed")
    assert int(page.by_id("fetch-failed-rows")["data-value"]) == fetch_failed

    scored = [r for r in ledger if r["clip_score"] is not None]
    assert int(page.by_id("clip-scored")["data-value"]) == len(scored)
    assert int(page.by_id("clip-filtered")["data-value"]) == by_status["clip_filtered"]
    lowest_kept = min(r["clip_score"] for r in ledger if r["status"] == "ok")
    assert float(page.by_id("clip-threshold")["data-value"]) == pytest.approx(lowest_kept)
    assert all(r["clip_score"] < lowest_kept for r in ledger if r["status"] == "clip_filtered")
    # the dropped table holds the highest-scoring dropped rows, best first
    dropped = sorted((r for r in ledger if r["status"] == "clip_filtered"), key=lambda r: -r["clip_score"])
    table_uids = [a["data-uid"] for tag, a in page.elements if tag == "tr" and "data-uid" in a]
    top = min(len(dropped), report.CLIP_DROPPED_SAMPLES)
    assert table_uids[:top] == [r["uid"] for r in dropped[:top]]

    reps = collections.Counter(r["duplicate_of"] for r in ledger
                               if r["status"] in ("duplicate_exact", "duplicate_near"))
    assert int(page.by_id("dup-rows")["data-value"]) == sum(reps.values())
    assert int(page.by_id("dup-clusters")["data-value"]) == len(reps)
    sizes = {int(a["data-cluster-size"]): int(a["data-clusters"]) for a in page.with_attr("data-cluster-size")}
    assert sizes == dict(collections.Counter(n + 1 for n in reps.values()))
    ok_uids = {r["uid"] for r in ledger if r["status"] == "ok"}
    clusters = page.with_attr("data-representative")
    assert clusters and all(int(a["data-duplicates"]) == reps[a["data-representative"]] for a in clusters)

    # Which signal found each duplicate, as the ledger's errors say; the mirrored copy is a flip.
    signals = collections.Counter(report.duplicate_signal(r["status"], r["error"]) for r in ledger
                                  if r["status"] in ("duplicate_exact", "duplicate_near"))
    shown_signals = {a["data-signal"]: int(a["data-value"]) for a in page.with_attr("data-signal")}
    assert shown_signals == {name: signals.get(name, 0) for name in report.DUPLICATE_SIGNALS}
    assert signals["exact"] >= 2 and signals["flip"] >= 1
    pair = [r for r in ledger if r["url"].endswith(("/flip/4.jpg", "/good/4.jpg"))]
    statuses = sorted(r["status"] for r in pair)
    assert statuses == ["duplicate_near", "ok"]  # either may be the representative (uid order)
    assert next(r for r in pair if r["status"] == "duplicate_near")["error"].startswith("near: flip")

    grid = [a["data-key"] for a in page.with_attr("data-tile") if a["data-tile"] == "kept"]
    assert len(grid) == len(set(grid)) == min(by_status["ok"], report.KEPT_SAMPLES)
    assert set(grid) <= ok_uids
    shown_reps = [a["data-key"] for a in page.with_attr("data-tile") if a["data-tile"] == "cluster"]
    assert shown_reps and set(shown_reps) == {a["data-representative"] for a in clusters} & ok_uids


def test_report_is_self_contained_and_escapes_captions(finished):
    out, _ = finished
    text = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    page = parse(text)
    assert "<script" not in text.lower()
    assert "Content-Security-Policy" in text and "default-src 'none'" in text
    for tag, attrs in page.elements:
        for name in ("src", "href"):
            value = attrs.get(name)
            if value is not None:
                assert value.startswith("data:") or value.startswith("#"), (tag, name, value[:60])
    # The default zero-shot tags (unsafe, watermark) give the run tag columns, hence their plot.
    assert [a["id"] for _, a in page.elements if a.get("class") == "plot"] == [
        "clip-histogram", "cluster-sizes", "score-columns"]
    assert "<b>bold</b>" not in text
    # Autoescaped: the caption is text of the page, its markup characters entities.
    escaped = "a &lt;b&gt;bold&lt;/b&gt; &amp; &#34;quoted&#34; &lt;script&gt;alert(1)&lt;/script&gt; caption"
    (hostile,) = [r for r in read_ledger(out) if r["caption"] == HOSTILE_CAPTION]
    assert hostile["status"] in ("ok", "clip_filtered") and hostile["uid"] in text and escaped in text
    assert HOSTILE_CAPTION in page.text


def test_report_summary_does_not_depend_on_batching(finished):
    out, _ = finished
    columns = ["uid", "url", "caption", "status", "error", "shard", "duplicate_of", "clip_score"]
    one = report.summarise_ledger(report.iter_ledger(out, columns))
    many = report.summarise_ledger(report.iter_ledger(out, columns, batch_rows=3))
    assert one == many and one.rows == len(read_ledger(out))
    reps = report.largest_clusters(one.duplicates_of)
    a = report.collect_details(report.iter_ledger(out, columns), one, reps)
    b = report.collect_details(report.iter_ledger(out, columns, batch_rows=3), one, reps)
    assert a.hist == b.hist and a.dropped_top == b.dropped_top and a.members == b.members
    assert sum(a.hist["kept"]) == sum(1 for r in read_ledger(out) if r["status"] == "ok")


def test_read_samples_is_bounded(finished):
    out, _ = finished
    ok = {r["uid"]: r for r in read_ledger(out) if r["status"] == "ok"}
    first, found = report.read_samples(out, kept=2)
    assert len(first) == 2 and not found
    assert all(s["key"] in ok and s["image"] and s["caption"] == ok[s["key"]]["caption"] for s in first)
    last = max(ok.values(), key=lambda r: (r["shard"], r["uid"]))
    first, found = report.read_samples(out, kept=1, wanted={last["uid"]: last["shard"]})
    assert list(found) == [last["uid"]] and found[last["uid"]]["image"]


def test_report_without_matplotlib_keeps_tables(finished, tmp_path, monkeypatch):
    out, _ = finished
    monkeypatch.setattr(report.plots, "_matplotlib", lambda: None)
    page = report.build_report(out)
    assert "matplotlib is not installed" in page
    assert 'class="plot"' not in page and 'id="clip-hist-table"' in page and 'id="funnel-table"' in page


def test_report_command_rebuilds_and_refuses_other_folders(finished, tmp_path):
    out, _ = finished
    path = os.path.join(out, "report.html")
    os.remove(path)
    result = CliRunner().invoke(cli, ["report", out])
    assert result.exit_code == 0, result.output
    assert os.path.getsize(path) > 0 and "report:" in result.output
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 1 and "no stats.json" in result.output and "Traceback" not in result.output


# --------------------------------------------------------------------------- inspect

def test_inspect_filters_and_limits(finished):
    out, _ = finished
    ledger = read_ledger(out)
    runner = CliRunner()
    n_clip = sum(1 for r in ledger if r["status"] == "clip_filtered")
    result = runner.invoke(cli, ["inspect", out, "--status", "clip_filtered", "--limit", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == list(report.INSPECT_COLUMNS)
    body = lines[2:-1]
    assert len(body) == 2 and all(" clip_filtered " in line for line in body)
    assert lines[-1] == f"2 of {n_clip} rows with status clip_filtered"

    wanted = {"fetch_failed", "decode_failed", "invalid_input"}
    expected = sum(1 for r in ledger if r["status"] in wanted)
    for args in (["--status", "fetch_failed,decode_failed", "--status", "invalid_input"],
                 ["--status", "fetch_failed, decode_failed,invalid_input"]):
        result = runner.invoke(cli, ["inspect", out, *args, "--limit", "0", "--columns", "uid,status,error"])
        assert result.exit_code == 0, result.output
        body = result.output.splitlines()[2:-1]
        assert len(body) == expected
        assert {line.split()[1] for line in body} == wanted
        assert {line.split()[0] for line in body} == {r["uid"] for r in ledger if r["status"] in wanted}

    result = runner.invoke(cli, ["inspect", out, "--limit", "3", "--width", "12"])
    lines = result.output.splitlines()
    assert len(lines) == 2 + 3 + 1 and lines[-1] == f"3 of {len(ledger)} rows"
    assert all(len(cell) <= 12 for line in lines[2:-1] for cell in line.split("  ") if cell)


def test_inspect_user_errors_are_one_line(finished, tmp_path):
    out, _ = finished
    runner = CliRunner()
    result = runner.invoke(cli, ["inspect", out, "--status", "clip_filterd"])
    assert result.exit_code == 1 and "unknown status clip_filterd" in result.output
    assert "valid statuses: " + ", ".join(STATUS_ORDER) in result.output
    result = runner.invoke(cli, ["inspect", out, "--columns", "uid,nope"])
    assert result.exit_code == 1 and "unknown column nope" in result.output and "clip_score" in result.output
    result = runner.invoke(cli, ["inspect", str(tmp_path)])
    assert result.exit_code == 1 and "not a paircurate output folder" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def small_output(folder, rows):
    """An output folder holding only a ledger of ``rows`` and a stats.json: enough for inspect."""
    os.makedirs(os.path.join(folder, "metadata"))
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(folder, "metadata", "part-00000.parquet"))
    with open(os.path.join(folder, "stats.json"), "w") as handle:
        json.dump({}, handle)
    return str(folder)


def test_inspect_escapes_terminal_controls(tmp_path):
    hostile = ["\x1b[2J\x1b[31mred", "abc\u202edcba", "csi \x9b2J bell \x07 del \x7f", "iso\u2066late\u2069"]
    rows = [{"uid": f"u{i}", "url": "http://example.com/\x1b]0;title\x07", "caption": caption,
             "status": "ok", "error": None, "clip_score": 0.3} for i, caption in enumerate(hostile)]
    out = small_output(tmp_path / "out", rows)
    result = CliRunner().invoke(cli, ["inspect", out, "--width", "80"])
    assert result.exit_code == 0, result.output
    controls = [c for c in result.output if c != "\n" and (ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f
                                                         or 0x202a <= ord(c) <= 0x202e or 0x2066 <= ord(c) <= 0x2069)]
    assert not controls
    for shown in ("\\x1b[2J\\x1b[31mred", "abc\\u202edcba", "csi \\x9b2J bell \\x07 del \\x7f",
                  "iso\\u2066late\\u2069", "example.com/\\x1b]0;title\\x07"):
        assert shown in result.output
    assert result.output.splitlines()[-1] == "4 of 4 rows"


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated"])
@pytest.mark.parametrize("command", ["inspect", "report"])
def test_corrupt_ledger_is_one_clear_error(tmp_path, damage, command):
    rows = [{"uid": f"u{i}", "url": "http://example.com/x", "caption": "a cat", "status": "ok",
             "error": None, "clip_score": 0.3} for i in range(50)]
    out = small_output(tmp_path / "out", rows)
    path = os.path.join(out, "metadata", "part-00000.parquet")
    data = open(path, "rb").read()
    damaged = {"garbage": bytes(range(256)) * 8, "empty": b"", "truncated": data[: len(data) // 2]}[damage]
    with open(path, "wb") as handle:
        handle.write(damaged)
    result = CliRunner().invoke(cli, [command, out])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # a ClickException, not a traceback
    assert len(result.output.strip().splitlines()) == 1
    assert path in result.output and "not a readable Parquet ledger file" in result.output


def test_report_on_damaged_stats_or_shard_is_one_clear_error(finished, tmp_path):
    import shutil

    out, _ = finished
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    stats = os.path.join(copy, "stats.json")
    good_stats = open(stats, "rb").read()
    with open(stats, "wb") as handle:
        handle.write(b"\xff\xfe{not json")
    result = CliRunner().invoke(cli, ["report", copy])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert stats in result.output and len(result.output.strip().splitlines()) == 1
    with open(stats, "wb") as handle:
        handle.write(good_stats)
    shard = sorted(glob.glob(os.path.join(copy, "shards", "*.tar")))[0]
    with open(shard, "wb") as handle:
        handle.write(b"\x00garbage" * 100)
    result = CliRunner().invoke(cli, ["report", copy])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert shard in result.output and "not a readable shard" in result.output


# --------------------------------------------------------------------------- rendering

def render(html_path, folder, name):
    """Screenshot ``html_path`` with headless Chromium; return (png path, console lines)."""
    shot = os.path.join(folder, name + ".png")
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={os.path.join(folder, 'profile-' + name)}", "--enable-logging=stderr", "--v=0",
         f"--screenshot={shot}", "--window-size=1280,2000", "file://" + os.path.abspath(html_path)],
        capture_output=True, text=True, timeout=120)
    # Chromium logs every console message (errors, CSP violations, uncaught exceptions) as CONSOLE.
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    return shot, console


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium_without_console_errors(finished, tmp_path):
    out, _ = finished
    shot, console = render(os.path.join(out, "report.html"), str(tmp_path), "report")
    assert console == []
    with open(shot, "rb") as handle:
        head = handle.read(8)
    assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(shot) > 20000
    # the check can fail: a page that breaks the policy and throws is caught
    broken = tmp_path / "broken.html"
    broken.write_text(re.sub(r"</body>", '<img src="http://127.0.0.1:9/x.png"><script>nope()</script></body>',
                             open(os.path.join(out, "report.html"), encoding="utf-8").read()))
    _, console = render(str(broken), str(tmp_path), "broken")
    assert console


# --------------------------------------------------------------------------- sections of newer stages

def synthetic_output(folder, rows, float32=(), stats=None):
    """An output folder with a ledger of ``rows`` (``float32`` columns typed so) and a matching stats.json."""
    names = list(dict.fromkeys(k for row in rows for k in row))
    types = {"clip_score": pa.float32(), **{name: pa.float32() for name in float32}}
    schema = pa.schema([(name, types.get(name, pa.string())) for name in names])
    os.makedirs(os.path.join(folder, "metadata"))
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), os.path.join(folder, "metadata", "part-00000.parquet"))
    by_status = dict(collections.Counter(r["status"] for r in rows))
    with open(os.path.join(folder, "stats.json"), "w") as handle:
        json.dump({"by_status": by_status, "ledger_rows": len(rows), "rows_in": len(rows), **(stats or {})}, handle)
    return str(folder)


def ledger_row(i, status="ok", **values):
    return {"uid": f"u{i:04d}", "url": f"http://example.com/{i}.jpg", "caption": f"caption {i}",
            "status": status, "error": None, "duplicate_of": None, "clip_score": None, **values}


def test_funnel_labels_the_statuses_of_newer_stages():
    steps = {s["status"]: s for s in report.funnel({"ok": 3, "language_filtered": 2, "tag_filtered": 1,
                                                     "duplicate_semantic": 1})}
    assert steps["language_filtered"]["stage"] == "language filter" and steps["language_filtered"]["removed"] == 2
    assert steps["tag_filtered"]["stage"] == "CLIP tag filter"
    assert steps["duplicate_semantic"]["stage"] == "semantic dedup"
    assert report.funnel({"ok": 3, "language_filtered": 2})[-1]["remaining"] == 3


def test_language_mix_lists_top_languages_then_other_then_none():
    languages = {"en": 50, "de": 10, None: 4, **{f"x{i}": 20 - i for i in range(16)}}
    mix = report.language_mix(languages, {"de": 3, "x15": 1, None: 4}, top=15)
    assert [r["language"] for r in mix[:3]] == ["en", "x0", "x1"] and len(mix) == 17
    # top 15: en, x0..x9, then the ties at 10 by code (de, x10), x11, x12; the rest is other
    assert [r["language"] for r in mix[11:15]] == ["de", "x10", "x11", "x12"]
    assert mix[-2] == {"language": "other", "rows": 7 + 6 + 5, "filtered": 1, "languages": 3,
                       "share": pytest.approx(18 / sum(languages.values()))}
    assert mix[-1]["language"] is None and mix[-1]["rows"] == 4 and mix[-1]["filtered"] == 4
    assert sum(r["rows"] for r in mix) == sum(languages.values())
    assert sum(r["share"] for r in mix) == pytest.approx(1.0)


def test_report_shows_the_language_mix(tmp_path):
    codes = ["en"] * 30 + ["de"] * 10 + [f"l{i:02d}" for i in range(17)] + [None] * 4
    rows = [ledger_row(i, "language_filtered" if code == "de" and i % 2 else "ok", caption_language=code,
                       caption_language_score=0.9 if code else None) for i, code in enumerate(codes)]
    # rows ended before language detection have no language and are not counted
    rows += [ledger_row(100, "invalid_input"), ledger_row(101, "caption_filtered")]
    out = synthetic_output(tmp_path / "out", rows, float32=["caption_language_score"])
    page = parse(report.build_report(out))
    counted = len(codes)
    assert int(page.by_id("language-rows")["data-value"]) == counted
    assert int(page.by_id("language-filtered")["data-value"]) == 5
    shown = {a["data-language"]: a for a in page.with_attr("data-language")}
    assert list(shown)[:2] == ["en", "de"] and len(shown) == 15 + 2  # top 15, other, none detected
    assert int(shown["en"]["data-rows"]) == 30 and float(shown["en"]["data-share"]) == pytest.approx(30 / counted)
    assert int(shown["de"]["data-filtered"]) == 5 and int(shown["en"]["data-filtered"]) == 0
    assert int(shown["other"]["data-rows"]) == 17 - 13  # 13 one-row languages fit in the top 15
    assert int(shown["none"]["data-rows"]) == 4
    assert sum(int(a["data-rows"]) for a in shown.values()) == counted
    assert "none detected" in page.text and "other (4 languages)" in page.text
    assert any(a.get("href") == "#languages" for _, a in page.elements)


def test_report_leaves_out_sections_whose_columns_the_ledger_lacks(tmp_path):
    out = synthetic_output(tmp_path / "out", [ledger_row(i, clip_score=0.3) for i in range(5)])
    page = report.build_report(out)
    for ident in ("languages", "tags", "language-table", "score-columns-table"):
        assert f'id="{ident}"' not in page and f'href="#{ident}"' not in page


def test_report_shows_tag_and_head_columns(tmp_path):
    rows = []
    for i in range(40):
        scored = i < 30
        status = "tag_filtered" if i in (0, 1) else ("ok" if scored else "fetch_failed")
        rows.append(ledger_row(i, status, clip_score=0.3 if scored else None,
                               tag_unsafe=(0.97 if i < 4 else i / 100) if scored else None,
                               tag_watermark=(0.8 if i % 3 == 0 else 0.1) if scored else None,
                               head_aesthetic=(4.0 + i / 10) if scored else None, tag_note="not a score"))
    out = synthetic_output(tmp_path / "out", rows, float32=["tag_unsafe", "tag_watermark", "head_aesthetic"])
    text = report.build_report(out)
    page = parse(text)
    assert int(page.by_id("tag-filtered")["data-value"]) == 2
    shown = {a["data-score-column"]: a for a in page.with_attr("data-score-column")}
    assert list(shown) == ["tag_unsafe", "tag_watermark", "head_aesthetic"]  # tag_note is text: no score
    assert all(int(a["data-rows"]) == 30 for a in shown.values())
    assert int(shown["tag_unsafe"]["data-above"]) == 4 and int(shown["tag_watermark"]["data-above"]) == 10
    assert shown["head_aesthetic"]["data-above"] == ""  # heads have no threshold
    hist = collections.defaultdict(dict)
    column = None
    for tag, attrs in page.elements:
        if tag == "table" and "data-column" in attrs:
            column = attrs["data-column"]
        elif tag == "tr" and column and "data-count" in attrs:
            hist[column][int(attrs["data-bin"])] = int(attrs["data-count"])
    assert {name: sum(bins.values()) for name, bins in hist.items()} == {name: 30 for name in shown}
    assert hist["tag_unsafe"][19] == 4  # 0.97: the last of 20 bins over 0..1
    assert hist["head_aesthetic"][0] and hist["head_aesthetic"][19]  # bins span the heads' range
    assert page.by_id("score-columns")["class"] == "plot"


def test_clip_histogram_has_kept_and_filtered_series(tmp_path):
    rows = [ledger_row(i, "ok", clip_score=0.30 + i / 1000) for i in range(20)]
    rows += [ledger_row(100 + i, "clip_filtered", clip_score=0.10 + i / 1000) for i in range(15)]
    rows += [ledger_row(200, "duplicate_semantic", clip_score=0.32, duplicate_of="u0000",
                        error="semantic: cosine 0.973 to u0000")]
    out = synthetic_output(tmp_path / "out", rows, stats={"config": {"clip": {"min_score": 0.25}}})
    page = parse(report.build_report(out))
    assert float(page.by_id("clip-threshold")["data-value"]) == 0.25
    assert page.by_id("clip-histogram")["data-series"] == "kept clip_filtered other"
    bins = page.with_attr("data-kept")
    assert sum(int(a["data-kept"]) for a in bins) == 20
    assert sum(int(a["data-clip-filtered"]) for a in bins) == 15
    assert sum(int(a["data-other"]) for a in bins) == 1
    kept_bins = [int(a["data-bin"]) for a in bins if int(a["data-kept"])]
    filtered_bins = [int(a["data-bin"]) for a in bins if int(a["data-clip-filtered"])]
    assert max(filtered_bins) < min(kept_bins)  # two separate humps


def test_semantic_duplicates_are_found_by_semantic(tmp_path):
    assert report.duplicate_signal("duplicate_semantic", "semantic: cosine 0.973 to u0000") == "semantic"
    rows = [ledger_row(0, clip_score=0.3), ledger_row(1, clip_score=0.3)]
    rows += [ledger_row(10 + i, "duplicate_semantic", clip_score=0.3, duplicate_of="u0000",
                        error=f"semantic: cosine 0.97{i} to u0000") for i in range(3)]
    rows += [ledger_row(20, "duplicate_exact", duplicate_of="u0001", error="exact")]
    out = synthetic_output(tmp_path / "out", rows)
    page = parse(report.build_report(out))
    signals = {a["data-signal"]: int(a["data-value"]) for a in page.with_attr("data-signal")}
    assert signals == {"exact": 1, "phash": 0, "smooth": 0, "flip": 0, "semantic": 3}
    assert int(page.by_id("dup-rows")["data-value"]) == 4 and int(page.by_id("dup-clusters")["data-value"]) == 2
    clusters = {a["data-representative"]: int(a["data-duplicates"]) for a in page.with_attr("data-representative")}
    assert clusters == {"u0000": 3, "u0001": 1}


def hostile_output(folder):
    """Every new section, with markup in every ledger string a page shows."""
    rows = [ledger_row(i, "ok", clip_score=0.3, caption=HOSTILE_CAPTION, caption_language="en",
                       tag_unsafe=0.2, head_aesthetic=5.0) for i in range(3)]
    rows += [ledger_row(10, "clip_filtered", clip_score=0.1, caption=HOSTILE_CAPTION, url='http://x/"><script>',
                        caption_language="<script>x</script>", tag_unsafe=0.7, head_aesthetic=4.0)]
    rows += [ledger_row(11, "duplicate_semantic", clip_score=0.3, duplicate_of="u0000",
                        error="semantic: cosine 0.99 to <b>u0000</b>", caption_language="de")]
    rows += [ledger_row(12, "fetch_failed", error="<img src=x onerror=alert(1)>: boom")]
    return synthetic_output(folder, rows, float32=["tag_unsafe", "head_aesthetic"],
                            stats={"config": {"clip": {"min_score": 0.25}, "<i>sec</i>": "<script>"}})


def test_report_autoescapes_everything_the_ledger_holds(tmp_path):
    text = report.build_report(hostile_output(tmp_path / "out"))
    page = parse(text)
    assert "<script" not in text.lower() and "<b>u0000" not in text and "<img src=x" not in text
    assert {tag for tag, _ in page.elements} <= {"html", "head", "meta", "title", "style", "body", "header", "h1",
                                                 "h2", "h3", "div", "main", "nav", "a", "section", "p", "table",
                                                 "tr", "th", "td", "b", "i", "span", "img", "details", "summary",
                                                 "code", "ul", "li", "br"}
    for shown in (HOSTILE_CAPTION, "<script>x</script>", "<b>u0000</b>", "<img src=x onerror=alert(1)>"):
        assert shown in page.text
    assert [a for a in page.with_attr("data-language") if a["data-language"] == "<script>x</script>"]
    from paircurate.report.render import environment

    assert environment().autoescape is True


def test_language_and_score_column_figures_do_not_depend_on_batching(tmp_path):
    out = hostile_output(tmp_path / "out")
    columns = ["uid", "url", "caption", "status", "error", "shard", "duplicate_of", "clip_score",
               "caption_language", "tag_unsafe", "head_aesthetic"]
    one = report.summarise_ledger(report.iter_ledger(out, columns))
    many = report.summarise_ledger(report.iter_ledger(out, columns, batch_rows=2))
    assert one == many and one.languages == {"en": 3, "<script>x</script>": 1, "de": 1, None: 1}
    assert one.score_columns["tag_unsafe"].rows == 4 and one.score_columns["tag_unsafe"].above == 1
    a = report.collect_details(report.iter_ledger(out, columns), one, [])
    b = report.collect_details(report.iter_ledger(out, columns, batch_rows=2), one, [])
    assert a.score_hist == b.score_hist and sum(a.score_hist["head_aesthetic"]["counts"]) == 4


def test_new_sections_keep_their_tables_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setattr(report.plots, "_matplotlib", lambda: None)
    page = parse(report.build_report(hostile_output(tmp_path / "out")))
    assert not [a for _, a in page.elements if a.get("class") == "plot"]
    assert page.by_id("language-table") is not None and page.by_id("score-columns-table") is not None
    assert page.by_id("clip-hist-table") is not None and "matplotlib is not installed" in page.text


def test_report_package_builds_no_html_in_python():
    """Markup lives in the templates: no string literal in the package's Python opens an HTML tag."""
    import io
    import tokenize

    folder = os.path.dirname(report.__file__)
    tag = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(\s[^<>]*)?/?>")
    found = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            source = open(os.path.join(folder, name), encoding="utf-8").read()
            for token in tokenize.generate_tokens(io.StringIO(source).readline):
                string_token = token.type in (tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", -1))
                if string_token and tag.search(token.string):
                    found.append((name, token.start[0], token.string[:60]))
    assert not found
    assert tag.search('f"<td class=n>{x}</td>"') and not tag.search("a < b > c")  # the check can fail


def test_report_templates_ship_in_the_wheel(tmp_path):
    """A wheel built from the sources holds the templates and renders a page from them."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = tmp_path / "src"
    for name in ("pipeline", "transforms", "configs"):
        shutil.copytree(os.path.join(root, name), source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(root, name), source / name)
    build = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                            "print(build_meta.build_wheel(sys.argv[1]))", str(tmp_path / "dist")],
                           cwd=source, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = tmp_path / "dist" / build.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "installed")
    templates = os.path.join(root, "pipeline", "report", "templates")
    shipped = {os.path.relpath(os.path.join(d, f), templates) for d, _, files in os.walk(templates) for f in files}
    assert shipped and {f"paircurate/report/templates/{f}" for f in shipped} <= names
    out = hostile_output(tmp_path / "out")
    check = subprocess.run([sys.executable, "-c", "import sys, paircurate.report as r; "
                            "assert r.__file__.startswith(sys.argv[2]), r.__file__; "
                            "print(len(r.build_report(sys.argv[1])))", out, str(tmp_path / "installed")],
                           env={**os.environ, "PYTHONPATH": str(tmp_path / "installed")},
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr[-2000:]
    assert int(check.stdout.strip()) > 10000


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} not installed (apt-get install chromium)")
def test_new_sections_render_in_headless_chromium_without_console_errors(tmp_path):
    out = hostile_output(tmp_path / "out")
    report.write_report(out)
    shot, console = render(os.path.join(out, "report.html"), str(tmp_path), "sections")
    assert console == []
    assert os.path.getsize(shot) > 20000
