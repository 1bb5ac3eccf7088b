"""`paircurate demo`: every generated row ends with the status its construction calls for."""
import glob
import os

import pyarrow.parquet as pq
from click.testing import CliRunner

from paircurate.cli import cli


def test_demo_statuses_match_their_causes(tmp_path):
    out = str(tmp_path / "demo")
    result = CliRunner().invoke(cli, ["demo", "--output", out, "--images", "40"])
    assert result.exit_code == 0, result.output
    ledger = [r for f in sorted(glob.glob(os.path.join(out, "metadata", "*.parquet")))
              for r in pq.read_table(f).to_pylist()]
    assert len(ledger) == 40 + 20 + 15 + 10 + 10 + 5 + 5 + 5 + 2 + 3
    # Which of two identical images is kept is dedup's choice (largest, then smallest uid),
    # so "ok" and "duplicate_exact" may swap within such a pair; everything else is exact.
    swappable = {"ok", "duplicate_exact", "clip_filtered"}
    wrong = [(r["url"], r["expect"], r["status"], r["error"]) for r in ledger
             if r["status"] != r["expect"] and not {r["status"], r["expect"]} <= swappable]
    assert not wrong
    count = lambda key, value: sum(1 for r in ledger if r[key] == value)  # noqa: E731
    for status in ("duplicate_exact", "duplicate_near", "duplicate_input", "fetch_failed"):
        assert count("status", status) == count("expect", status), status
    kept = {r["uid"] for r in ledger if r["status"] in ("ok", "clip_filtered")}
    assert all(r["duplicate_of"] in kept for r in ledger if r["status"] in ("duplicate_exact", "duplicate_near"))
    assert "rows in" in result.output and "shards written" in result.output
    # A second demo into the same folder replaces the first.
    again = CliRunner().invoke(cli, ["demo", "--output", out, "--images", "40", "--no-clip"])
    assert again.exit_code == 0, again.output
