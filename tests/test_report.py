"""The run report and `paircurate inspect`: figures equal the ledger's, the page renders offline."""
import collections
import glob
import json
import os
import re
import subprocess
from html.parser import HTMLParser

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import ImageOps
from click.testing import CliRunner

from paircurate import report
from paircurate.cli import cli
from paircurate.config import load_config
from paircurate.demo import encode, synthetic_image
from paircurate.imageserver import ImageServer, Route
from paircurate.run import run_pipeline
from paircurate.schema import STATUS_ORDER, error_class

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
    assert "duplicate_semantic" in report.IMAGE_DUPLICATE_STATUSES


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

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

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
    assert [a["id"] for _, a in page.elements if a.get("class") == "plot"] == ["clip-histogram", "cluster-sizes"]
    assert "<b>bold</b>" not in text
    escaped = "a &lt;b&gt;bold&lt;/b&gt; &amp; &quot;quoted&quot; &lt;script&gt;alert(1)&lt;/script&gt; caption"
    assert escaped in report._tile({"key": "k", "caption": HOSTILE_CAPTION, "image": None}, "kept")
    (hostile,) = [r for r in read_ledger(out) if r["caption"] == HOSTILE_CAPTION]
    assert hostile["status"] in ("ok", "clip_filtered") and hostile["uid"] in text and escaped in text


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
    monkeypatch.setattr(report, "_matplotlib", lambda: None)
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
