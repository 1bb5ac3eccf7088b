"""Every fault of the fault server through the whole pipeline at once: a complete ledger, in bounded time."""
import glob
import os
import time

import pyarrow.parquet as pq

from fault_server import FaultServer
from paircurate.config import load_config
from paircurate.run import run_pipeline
from paircurate.transforms.schema import error_class
from test_fetch import FAULTS, config_for

EXTRA = [
    ("/corrupt.jpg", "decode_failed", "corrupt"),
    ("/bomb.png", "decode_failed", "decompression_bomb"),
]
NO_TRAFFIC = [
    ("file:///etc/passwd", "blocked_address", "scheme"),
    ("ftp://127.0.0.1/x.jpg", "blocked_address", "scheme"),
    ("http://2130706433/x.jpg", "blocked_address", "blocked_address"),
    ("http://[::ffff:127.0.0.1]/x.jpg", "blocked_address", "blocked_address"),
    ("http://169.254.169.254/latest/meta-data/", "blocked_address", "blocked_address"),
    ("http://no-such-host.invalid/x.jpg", "fetch_failed", "dns"),
]


def test_all_faults_through_the_pipeline(tmp_path, parquet_input):
    with FaultServer() as server:
        rows = []
        for i, (path, status, cls, _) in enumerate(FAULTS):
            rows.append({"url": server.url(path.replace("single", f"e2e-{i}")),
                         "caption": f"fault number {i}", "status_expected": status.value,
                         "class_expected": cls})
        rows += [{"url": server.url(p), "caption": f"decode fault {p}", "status_expected": s,
                  "class_expected": c} for p, s, c in EXTRA]
        rows += [{"url": u, "caption": f"never fetched {u}", "status_expected": s, "class_expected": c}
                 for u, s, c in NO_TRAFFIC]
        config = load_config(overrides=["dedup.enabled=false", "clip.enabled=false"])
        config.fetch = config_for(server, threads=32)
        started = time.monotonic()
        stats = run_pipeline(parquet_input(rows), str(tmp_path / "out"), config)
        elapsed = time.monotonic() - started
    ledger = [r for f in glob.glob(os.path.join(tmp_path, "out", "metadata", "*.parquet"))
              for r in pq.read_table(f).to_pylist()]
    assert len(ledger) == len(rows) == stats["rows_in"]
    got = sorted((r["url"], r["status"], error_class(r["error"])) for r in ledger)
    want = sorted((r["url"], r["status_expected"], r["class_expected"]) for r in rows)
    assert got == want
    assert stats["errors"]["fetch_failed"]["timeout"] == 3
    assert elapsed < 60, elapsed
