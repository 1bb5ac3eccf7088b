"""End to end on the local runner: ledger completeness, statuses, shards, determinism, reruns."""
import glob
import json
import os

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from paircurate.cli import cli
from paircurate.config import load_config
from paircurate.demo import encode, synthetic_image
from paircurate.imageserver import Route
from paircurate.run import RunError, run_pipeline

N_GOOD = 12


def build_rows(server):
    rows = []
    for i in range(N_GOOD):
        image, caption = synthetic_image(7000 + i)
        server.routes[f"/good/{i}.jpg"] = Route(encode(image))
        rows.append({"url": server.url(f"/good/{i}.jpg"), "caption": caption, "expect": "ok", "n": i})
    body = server.routes["/good/0.jpg"].body
    server.routes["/page.html"] = Route(b"<html>hi</html>", "text/html")
    server.routes["/corrupt.jpg"] = Route(body[:30] + b"\x00" * 100)
    server.routes["/optout.jpg"] = Route(body, headers=[("X-Robots-Tag", "noai")])
    rows += [
        dict(rows[3], expect="duplicate_input", n=100),
        {"url": server.url("/missing.jpg"), "caption": "a missing picture", "expect": "fetch_failed", "n": 101},
        {"url": server.url("/page.html"), "caption": "a page, not a picture", "expect": "fetch_failed", "n": 102},
        {"url": server.url("/corrupt.jpg"), "caption": "a corrupt picture", "expect": "decode_failed", "n": 103},
        {"url": server.url("/good/1.jpg"), "caption": "tiny", "expect": "caption_filtered", "n": 104},
        {"url": "", "caption": "no url at all", "expect": "invalid_input", "n": 105},
        {"url": "http://169.254.169.254/latest/meta-data/", "caption": "metadata service",
         "expect": "blocked_address", "n": 106},
        {"url": server.url("/optout.jpg"), "caption": "an opted out picture", "expect": "disallowed", "n": 107},
    ]
    return rows


def config_for(server, *extra):
    return load_config(overrides=[f"fetch.allowed_hosts=[{server.host_port}]", "fetch.timeout=5",
                                  "fetch.retries=0", "output.samples_per_shard=5",
                                  "dedup.enabled=false", "clip.enabled=false", *extra])


def read_ledger(root):
    files = sorted(glob.glob(os.path.join(root, "metadata", "*.parquet")))
    assert files
    return [row for f in files for row in pq.read_table(f).to_pylist()]


@pytest.fixture
def finished_run(tmp_path, image_server, parquet_input):
    rows = build_rows(image_server)
    path = parquet_input(rows, row_group_size=4)
    out = str(tmp_path / "out")
    stats = run_pipeline(path, out, config_for(image_server))
    return rows, path, out, stats


def test_ledger_has_one_row_per_input_with_right_status(finished_run):
    rows, _, out, stats = finished_run
    ledger = read_ledger(out)
    assert len(ledger) == len(rows)
    assert len({r["uid"] for r in ledger}) == len(rows)
    assert sorted(r["n"] for r in ledger) == sorted(r["n"] for r in rows)  # carried column
    for row in ledger:
        assert row["status"] == row["expect"], (row["n"], row["status"], row["error"])
    by_n = {r["n"]: r for r in ledger}
    assert by_n[100]["duplicate_of"] == by_n[3]["uid"]
    assert by_n[101]["error"].startswith("http_404")
    for row in ledger:
        if row["status"] == "ok":
            assert row["key"] == row["uid"] and row["shard"] and row["width"] == 256
            assert row["sha256"] and row["original_width"] > 0
        else:
            assert row["key"] is None and row["shard"] is None
    assert stats["rows_in"] == len(rows) and stats["ledger_rows"] == len(rows)
    assert stats["by_status"]["ok"] == N_GOOD
    assert stats["errors"]["fetch_failed"]["http_404"] == 1
    assert os.path.exists(os.path.join(out, "_SUCCESS"))
    assert not os.path.exists(os.path.join(out, "_work"))
    on_disk = json.load(open(os.path.join(out, "stats.json")))
    assert on_disk["by_status"] == stats["by_status"]


def test_webdataset_reads_exactly_the_ok_samples(finished_run):
    import webdataset as wds

    _, _, out, _ = finished_run
    ledger = {r["uid"]: r for r in read_ledger(out) if r["status"] == "ok"}
    shards = sorted(glob.glob(os.path.join(out, "shards", "*.tar")))
    assert [os.path.basename(s) for s in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("pil"))
    assert sorted(s["__key__"] for s in samples) == sorted(ledger)
    for sample in samples:
        row = ledger[sample["__key__"]]
        assert sample["txt"] == row["caption"]
        assert sample["jpg"].size == (256, 256)
        assert sample["json"]["url"] == row["url"] and sample["json"]["n"] == row["n"]
        assert row["shard"] + ".tar" in [os.path.basename(s) for s in shards]
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert sum(e["samples"] for e in manifest) == N_GOOD
    assert [e["bytes"] for e in manifest] == [os.path.getsize(s) for s in shards]


def test_second_run_gives_identical_shards(finished_run, tmp_path, image_server):
    _, path, out, _ = finished_run
    out2 = str(tmp_path / "again")
    run_pipeline(path, out2, config_for(image_server))
    first = sorted(glob.glob(os.path.join(out, "shards", "*.tar")))
    second = sorted(glob.glob(os.path.join(out2, "shards", "*.tar")))
    assert [os.path.basename(p) for p in first] == [os.path.basename(p) for p in second]
    for a, b in zip(first, second):
        assert open(a, "rb").read() == open(b, "rb").read()
    assert json.load(open(os.path.join(out, "manifest.json"))) == \
        json.load(open(os.path.join(out2, "manifest.json")))


def test_rerun_into_finished_output_is_refused(finished_run, image_server):
    _, path, out, _ = finished_run
    with pytest.raises(RunError, match="--overwrite"):
        run_pipeline(path, out, config_for(image_server))
    result = CliRunner().invoke(cli, ["run", "--input", path, "--output", out, "--no-clip",
                                      "--allow-host", image_server.host_port])
    assert result.exit_code != 0
    assert "already holds a finished run" in result.output and "Traceback" not in result.output
    stats = run_pipeline(path, out, config_for(image_server), overwrite=True)
    assert stats["by_status"]["ok"] == N_GOOD
    assert len(read_ledger(out)) == stats["ledger_rows"]


def test_cli_user_errors_are_one_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["run", "--input", str(tmp_path / "none.parquet"), "--output",
                                 str(tmp_path / "o")])
    assert result.exit_code == 1 and "no input files match" in result.output
    (tmp_path / "in.csv").write_text("url,caption\nhttp://x,abcdefg\n")
    result = runner.invoke(cli, ["run", "--input", str(tmp_path / "in.csv"), "--output",
                                 str(tmp_path / "o"), "--set", "fetch.bogus=1"])
    assert result.exit_code == 1 and "valid keys of 'fetch'" in result.output
    assert "Traceback" not in result.output


def test_help_is_complete():
    runner = CliRunner()
    top = runner.invoke(cli, ["--help"]).output
    for command in ("run", "demo"):
        assert command in top
    run_help = runner.invoke(cli, ["run", "--help"]).output
    for option in ("--input", "--output", "--config", "--set", "--runner", "--allow-host",
                   "--overwrite", "--no-clip"):
        assert option in run_help


def test_stats_time_the_concurrent_stages(finished_run):
    rows, _, out, stats = finished_run
    stages = stats["stages"]
    # Fetch handles every row that reached it; resize every row fetched successfully.
    reached_fetch = sum(1 for r in rows if r["expect"] not in ("invalid_input", "caption_filtered",
                                                                "duplicate_input"))
    assert stages["fetch"]["records"] == reached_fetch
    assert stages["resize"]["records"] == N_GOOD + 1  # the corrupt file is decoded too
    assert stages["fetch"]["busy_s"] > 0 and stages["fetch"]["ms_per_record"] > 0
    page = open(os.path.join(out, "report.html")).read()
    assert 'data-stage="fetch"' in page


def test_lost_records_are_never_marked_finished(tmp_path):
    from paircurate.graph import OutputLayout
    from paircurate.run import finalise
    from paircurate.transforms.files import write_json

    layout = OutputLayout(str(tmp_path / "out"))
    os.makedirs(layout.work)
    write_json(os.path.join(layout.work, "counts.json"),
               {"rows": 9, "by_status": {"ok": 9}, "errors": {}})
    write_json(os.path.join(layout.work, "manifest.json"), [])
    with pytest.raises(RunError, match="records were lost"):
        finalise(layout, load_config(overrides=["output.report=false"]), 0.0, rows_read=10)
    assert not os.path.exists(os.path.join(layout.root, "_SUCCESS"))
    stats = finalise(layout, load_config(overrides=["output.report=false"]), 0.0, rows_read=9)
    assert stats["rows_in"] == 9 and os.path.exists(os.path.join(layout.root, "_SUCCESS"))
