"""End to end: the caption language filter drops rows before any download, and loses none."""
import glob
import json
import os
import threading

import pyarrow.parquet as pq
from click.testing import CliRunner

from paircurate.cli import cli
from paircurate.config import load_config
from paircurate.demo import encode, synthetic_image
from paircurate.imageserver import Route
from paircurate.run import run_pipeline
from paircurate.transforms.files import iter_shard

CAPTIONS = [
    ("en", "a red bicycle leaning against a brick wall", "ok"),
    ("en", "photo of a cat sleeping on the sofa", "ok"),
    ("en", "an old lighthouse on a rocky coast at sunset", "ok"),
    ("de", "ein rotes Fahrrad lehnt an einer Backsteinmauer", "language_filtered"),
    ("fr", "photo d'un chat qui dort sur le canapé", "language_filtered"),
    ("ja", "ソファで寝ている猫の写真", "language_filtered"),
    (None, "https://example.com/images/cat-on-sofa.jpg", "language_filtered"),  # no letters: und
    (None, "Haus", "caption_filtered"),  # too short: rejected before, keeps its status
]


class CountingRoutes(dict):
    """Routes that count the requests for each path."""

    def __init__(self, routes):
        super().__init__(routes)
        self.hits = {}
        self._lock = threading.Lock()

    def get(self, path, default=None):
        with self._lock:
            self.hits[path] = self.hits.get(path, 0) + 1
        return super().get(path, default)


def test_language_filtered_rows_are_never_fetched_and_every_row_is_in_the_ledger(
        tmp_path, image_server, parquet_input):
    routes, rows = {}, []
    for i, (lang, caption, expect) in enumerate(CAPTIONS):
        image, _ = synthetic_image(81000 + i)
        routes[f"/l/{i}.jpg"] = Route(encode(image))
        rows.append({"url": image_server.url(f"/l/{i}.jpg"), "caption": caption, "n": i,
                     "expect": expect, "lang": lang})
    rows.append(dict(rows[3], n=len(rows)))  # same URL and caption as the German row: filtered too
    counting = CountingRoutes(routes)
    image_server.use_routes(counting)
    config = load_config(overrides=[f"fetch.allowed_hosts=[{image_server.host_port}]", "fetch.retries=0",
                                    "clip.enabled=false", "output.report=false",
                                    "filter.languages=[en]"])
    out = str(tmp_path / "out")
    stats = run_pipeline(parquet_input(rows, row_group_size=3), out, config)

    ledger = [r for f in sorted(glob.glob(os.path.join(out, "metadata", "*.parquet")))
              for r in pq.read_table(f).to_pylist()]
    assert len(ledger) == len(rows) and stats["ledger_rows"] == len(rows) == stats["rows_in"]
    assert sorted(r["n"] for r in ledger) == list(range(len(rows)))
    for row in ledger:
        assert row["status"] == row["expect"], (row["n"], row["status"], row["error"])
        path = f"/l/{row['n'] if row['n'] < len(CAPTIONS) else 3}.jpg"
        # The filtered rows' images were never requested; the kept ones once each.
        assert counting.hits.get(path, 0) == (1 if row["status"] == "ok" else 0), (path, row["status"])
        if row["status"] == "ok":
            assert row["caption_language"] == "en" and 0.5 < row["caption_language_score"] <= 1
        elif row["lang"]:
            assert row["caption_language"] == row["lang"]
    by_n = {r["n"]: r for r in ledger}
    assert by_n[3]["error"].startswith("de: score ") and by_n[3]["error"].endswith(", not in [en]")
    assert by_n[6]["error"] == "und: no letters, not in [en]"
    assert by_n[6]["caption_language"] is None and by_n[6]["caption_language_score"] is None
    assert by_n[7]["error"].startswith("too_short") and by_n[7]["caption_language_score"] > 0
    assert stats["by_status"]["language_filtered"] == 5 and stats["by_status"]["ok"] == 3
    assert stats["errors"]["language_filtered"] == {"de": 2, "fr": 1, "ja": 1, "und": 1}

    samples = [meta for shard in sorted(glob.glob(os.path.join(out, "shards", "*.tar")))
               for _, meta in iter_shard(shard)]
    assert len(samples) == 3
    for sample in samples:
        info = json.loads(sample["json"])
        assert info["caption_language"] == "en" and 0.5 < info["caption_language_score"] <= 1


def test_a_language_filter_on_a_url_list_is_one_line_error(tmp_path):
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/a.jpg\n")
    result = CliRunner().invoke(cli, ["run", "--input", str(tmp_path / "urls.txt"), "--output",
                                      str(tmp_path / "o"), "--set", "filter.languages=[en]"])
    assert result.exit_code == 1 and "no captions" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()
