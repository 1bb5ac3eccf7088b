"""`paircurate demo`: every generated row ends with the status its construction calls for."""
import glob
import os

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from paircurate.cli import cli
from paircurate.demo import MISMATCHED_ROWS, TRANSLATED_ROWS


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One demo run (40 pictures): its output folder, CLI output and ledger rows."""
    out = str(tmp_path_factory.mktemp("demo") / "demo")
    result = CliRunner().invoke(cli, ["demo", "--output", out, "--images", "40"])
    assert result.exit_code == 0, result.output
    ledger = [r for f in sorted(glob.glob(os.path.join(out, "metadata", "*.parquet")))
              for r in pq.read_table(f).to_pylist()]
    return out, result.output, ledger


def test_demo_statuses_match_their_causes(demo_run):
    out, output, ledger = demo_run
    assert len(ledger) == 40 + MISMATCHED_ROWS + TRANSLATED_ROWS + 20 + 15 + 10 + 10 + 5 + 5 + 5 + 2 + 3
    # Which of two identical images is kept is dedup's choice (largest, then smallest uid),
    # so "ok" and "duplicate_exact" may swap within such a pair, and a CLIP score near the
    # threshold may fall either side; everything else is exact.
    swappable = {"ok", "duplicate_exact", "clip_filtered"}
    wrong = [(r["url"], r["expect"], r["status"], r["error"]) for r in ledger
             if r["status"] != r["expect"] and not {r["status"], r["expect"]} <= swappable]
    assert not wrong
    count = lambda key, value: sum(1 for r in ledger if r[key] == value)  # noqa: E731
    for status in ("duplicate_exact", "duplicate_near", "duplicate_input", "fetch_failed"):
        assert count("status", status) == count("expect", status), status
    kept = {r["uid"] for r in ledger if r["status"] in ("ok", "clip_filtered")}
    assert all(r["duplicate_of"] in kept for r in ledger if r["status"] in ("duplicate_exact", "duplicate_near"))
    assert "rows in" in output and "shards written" in output
    # A second demo into the same folder replaces the first.
    again = CliRunner().invoke(cli, ["demo", "--output", out, "--images", "40", "--no-clip"])
    assert again.exit_code == 0, again.output


def test_demo_clip_keeps_matched_pairs_and_drops_mismatched_ones(demo_run):
    _, output, ledger = demo_run
    assert "CLIP on (the demo model" in output
    scored = [r for r in ledger if r["status"] in ("ok", "clip_filtered")]
    matched = [r for r in scored if r["pair"] == "matched"]
    mismatched = [r for r in scored if r["pair"] == "mismatched"]
    assert len(matched) >= 30 and len(mismatched) == MISMATCHED_ROWS
    kept = lambda rows: sum(r["status"] == "ok" for r in rows) / len(rows)  # noqa: E731
    assert kept(matched) >= 0.95, sorted((r["clip_score"], r["caption"]) for r in matched)[:5]
    assert kept(mismatched) <= 0.10, sorted((r["clip_score"], r["caption"]) for r in mismatched)[-5:]
    assert all(r["clip_score"] is not None for r in scored)


def test_demo_tag_finds_the_striped_pictures(demo_run):
    """The demo's zero-shot tag (demo_tags) with the demo model: stripes above 0.5, other shapes below."""
    _, _, ledger = demo_run
    matched = [r for r in ledger if r["pair"] == "matched" and r["tag_stripes"] is not None]
    striped = [r["tag_stripes"] for r in matched if " stripes " in r["caption"]]
    others = [r["tag_stripes"] for r in matched if " stripes " not in r["caption"]]
    assert len(striped) >= 3 and len(others) >= 20
    assert sum(p > 0.5 for p in striped) >= 0.8 * len(striped), striped
    assert sum(p > 0.5 for p in others) <= 0.1 * len(others), sorted(others)[-5:]
    assert not any(name.startswith("tag_unsafe") for name in ledger[0])
