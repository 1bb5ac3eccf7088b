"""Staging: blobs round-trip by reference, slim records, and a killed run resumed without refetching."""
import glob
import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest

from conftest import generated_rows
from paircurate.config import load_config
from paircurate.run import run_pipeline
from paircurate.transforms.schema import new_record
from paircurate.transforms.staging import (
    DECIDED_FIELDS,
    SLIM_FIELDS,
    SegmentWriter,
    StagedReader,
    StagingError,
    decided_only,
    list_indexes,
    read_index,
    rehydrate,
)


def staged_record(i):
    record = new_record(f"{i:032x}", f"http://h/{i}.jpg", f"caption number {i}", "in.parquet", i,
                        {"lang": "en"})
    record.update(image=f"image-bytes-{i}".encode() * (i + 1), image_format="jpg", width=8, height=8,
                  image_sha256="ab" * 32, phash="0f" * 8, low_information=False,
                  original_width=640, original_height=480, sha256="cd" * 32)
    return record


def test_segments_round_trip_by_reference(tmp_path):
    writer = SegmentWriter(str(tmp_path), max_records=2, max_bytes=1 << 20)
    originals = [staged_record(i) for i in range(5)]
    slim = [writer.stage(dict(r)) for r in originals]
    assert len(list_indexes(str(tmp_path))) == 2  # two full segments closed, the third still open
    writer.close()
    indexes = list_indexes(str(tmp_path))
    assert len(indexes) == 3 == len(writer.closed_segments)
    assert sorted(uid for path in indexes for uid, _ in read_index(path)) == sorted(r["uid"] for r in originals)
    reader = StagedReader(str(tmp_path))
    for original, record in zip(originals, slim):
        assert set(record) == set(SLIM_FIELDS) and record["image_ref"]
        assert "caption" not in record and "url" not in record  # details stay in the blob
        meta, image = reader.read(record["image_ref"])
        assert image == original["image"]
        assert meta["caption"] == original["caption"] and meta["extra"] == {"lang": "en"}
        whole = reader.rehydrate(record, with_image=True)
        assert whole["image"] == original["image"] and whole["url"] == original["url"]
    reader.close()


def test_decided_fields_win_over_the_blob_and_signatures_leave_the_join(tmp_path):
    writer = SegmentWriter(str(tmp_path), 10, 1 << 20)
    record = writer.stage(staged_record(1))
    writer.close()
    record.update(status="duplicate_near", error="near: distance=2", duplicate_of="f" * 32)
    moved = decided_only(record)
    assert set(moved) == set(DECIDED_FIELDS)
    meta, _ = StagedReader(str(tmp_path)).read(record["image_ref"])
    whole = rehydrate(moved, meta)
    assert whole["status"] == "duplicate_near" and whole["duplicate_of"] == "f" * 32
    assert whole["phash"] == "0f" * 8 and whole["caption"] == "caption number 1"
    unstaged = {"uid": "u", "status": "ok", "caption": "kept whole"}
    assert decided_only(unstaged) is unstaged  # nothing in a blob: nothing dropped


def test_damaged_staging_is_refused(tmp_path):
    writer = SegmentWriter(str(tmp_path), 10, 1 << 20)
    record = writer.stage(staged_record(3))
    writer.close()
    (data,) = glob.glob(str(tmp_path / "*.bin"))
    raw = bytearray(open(data, "rb").read())
    raw[-1] ^= 0xFF
    open(data, "wb").write(bytes(raw))
    with pytest.raises(StagingError):
        StagedReader(str(tmp_path)).read(record["image_ref"])
    with pytest.raises(StagingError):
        StagedReader(str(tmp_path / "gone")).read(record["image_ref"])


# --------------------------------------------------------------------------- whole runs

N_ROWS = 120


class CountingRoutes(dict):
    """Routes that count requests per path and answer slowly, so a run can be killed mid-fetch."""

    def __init__(self, routes, delay):
        super().__init__(routes)
        self.hits = {}
        self.delay = delay
        self._lock = threading.Lock()

    def get(self, path, default=None):
        with self._lock:
            self.hits[path] = self.hits.get(path, 0) + 1
        time.sleep(self.delay)
        return super().get(path, default)


def serve_counted(server, n, delay):
    routes, rows = generated_rows(server, n, "r", 31000)
    counting = CountingRoutes(routes, delay)
    server.use_routes(counting)
    return rows, counting


def settings(server):
    return [f"fetch.allowed_hosts=[{server.host_port}]", "fetch.threads=4", "fetch.retries=0",
            "clip.enabled=false", "output.samples_per_shard=16", "output.report=false",
            "output.staging_segment_records=8"]


def run_command(input_path, out, server):
    command = [sys.executable, "-m", "paircurate.cli", "run", "--input", input_path, "--output", out]
    for item in settings(server):
        command += ["--set", item]
    return command


def ledger(root):
    files = sorted(glob.glob(os.path.join(root, "metadata", "*.parquet")))
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    return {r["uid"]: r for r in rows}


def shard_bytes(root):
    return {os.path.basename(p): open(p, "rb").read() for p in sorted(glob.glob(os.path.join(root, "shards", "*.tar")))}


def test_killed_run_resumes_without_refetching(tmp_path, image_server, parquet_input):
    rows, counting = serve_counted(image_server, N_ROWS, delay=0.05)
    input_path = parquet_input(rows)
    reference = str(tmp_path / "reference")
    run_pipeline(input_path, reference, load_config(overrides=settings(image_server)))
    counting.hits.clear()

    out = str(tmp_path / "out")
    env = dict(os.environ, HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1")
    process = subprocess.Popen(run_command(input_path, out, image_server), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while sum(counting.hits.values()) < 0.8 * N_ROWS and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not os.path.exists(os.path.join(out, "_SUCCESS"))

    staging = glob.glob(os.path.join(out, "_staging", "*"))
    assert len(staging) == 1
    staged_uids = {uid for path in list_indexes(staging[0]) for uid, _ in read_index(path)}
    assert staged_uids, "nothing was staged before the kill"
    first_hits = dict(counting.hits)
    counting.hits.clear()

    stats = run_pipeline(input_path, out, load_config(overrides=settings(image_server)))
    result, expected = ledger(out), ledger(reference)
    by_url = {r["url"]: uid for uid, r in expected.items()}
    path_of = {uid: r["url"].split(image_server.host_port, 1)[1] for uid, r in expected.items()}
    # Nothing already staged was fetched again; everything else was fetched once more at most.
    assert all(counting.hits.get(path_of[uid], 0) == 0 for uid in staged_uids)
    assert sum(counting.hits.values()) == N_ROWS - len(staged_uids)
    assert all(first_hits.get(path_of[uid], 0) == 1 for uid in staged_uids)
    assert stats["resumed_rows"] == len(staged_uids)
    # The same ledger and the same shard bytes as a run that was never killed.
    assert set(result) == set(expected) == set(by_url.values())
    for uid, row in expected.items():
        for column in ("status", "error", "duplicate_of", "shard", "key", "sha256", "image_sha256", "phash",
                       "width", "height", "caption", "url"):
            assert result[uid][column] == row[column], (uid, column)
    assert shard_bytes(out) == shard_bytes(reference) and shard_bytes(out)
    assert not os.path.exists(os.path.join(out, "_staging"))  # removed once finished


def test_shard_writer_hands_staged_records_on_slim(tmp_path):
    """Written records wait for the ledger's stage (in memory, on the local runner): they stay slim."""
    import apache_beam as beam
    from apache_beam.testing.util import assert_that

    from paircurate.transforms.beam_util import test_pipeline
    from paircurate.transforms.write import WriteShards

    staging = tmp_path / "staging"
    staging.mkdir()
    writer = SegmentWriter(str(staging), 10, 1 << 20)
    slim = [writer.stage(staged_record(i)) for i in range(12)]
    writer.close()

    def check(out):
        assert len(out) == 12
        assert all(set(r) == set(DECIDED_FIELDS) for r in out)  # details are back in the ledger stage
        assert {r["key"] for r in out} == {r["uid"] for r in slim}
        assert sorted({r["shard"] for r in out}) == ["00000", "00001"]

    with test_pipeline() as p:
        written, _ = (p | beam.Create([decided_only(r) for r in slim])
                      | WriteShards(str(tmp_path / "shards"), 10, ["lang"], str(staging)))
        assert_that(written, check)
    assert sorted(os.listdir(tmp_path / "shards")) == ["00000.tar", "00001.tar"]


def test_shard_from_slim_records_matches_whole_records_and_reads_each_blob_once(tmp_path):
    """write_shard makes slim records whole one at a time (a shard's details are never all in memory)."""
    from paircurate.transforms.write import write_shard

    staging = tmp_path / "staging"
    staging.mkdir()
    writer = SegmentWriter(str(staging), 10, 1 << 20)
    originals = [staged_record(i) for i in range(7)]
    slim = [decided_only(writer.stage(dict(r))) for r in originals]
    writer.close()
    for record in slim + originals:
        record["key"], record["shard"] = record["uid"], "00000"
    whole = [dict(r, image_ref=None) for r in originals]  # carried bytes, no staging
    write_shard(str(tmp_path / "a"), 0, whole, ["lang"])
    reader = StagedReader(str(staging))
    reads = []
    read = reader.read
    reader.read = lambda ref: reads.append(ref) or read(ref)
    entry = write_shard(str(tmp_path / "b"), 0, slim, ["lang"], reader)
    assert (tmp_path / "b" / "00000.tar").read_bytes() == (tmp_path / "a" / "00000.tar").read_bytes()
    assert entry["samples"] == 7 and sorted(reads) == sorted(r["image_ref"] for r in slim)
    assert all(set(r) == set(DECIDED_FIELDS) for r in slim)  # the callers' records stay slim


def test_decided_only_records_pack_short_and_unpack_as_before():
    """A slim record packs its decided fields alone; unpacked, it is the dict the full packing gave."""
    from paircurate.transforms.schema import _PACKED_FIELDS, _RECORD_CODER, pack_record, unpack_record

    slim = decided_only(dict(staged_record(3), image_ref="seg:0:10:20:ff", status="ok", key="k"))
    full_packing = _RECORD_CODER.encode(tuple(slim.get(name) for name in _PACKED_FIELDS))
    assert len(pack_record(slim)) <= len(full_packing) - len(_PACKED_FIELDS) + len(DECIDED_FIELDS)
    unpacked = unpack_record(pack_record(slim))
    assert unpacked == unpack_record(full_packing)
    assert list(unpacked) == list(_PACKED_FIELDS)  # same keys, same order
    whole = staged_record(4)  # any other field set: the full layout, every field back
    assert unpack_record(pack_record(whole)) == {name: whole.get(name) for name in _PACKED_FIELDS}
