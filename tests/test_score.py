"""`paircurate score` on hostile input: uids it computes itself, bounded member reads, damaged tars."""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
import subprocess
import sys
import tarfile

import pyarrow.parquet as pq
import pytest

from paircurate.config import load_config
from paircurate.demo import encode, synthetic_image
from paircurate.score import SAMPLE_EXTENSIONS, read_shard, run_score, sample_uid
from paircurate.transforms.files import CorruptShard, OversizedMember, iter_shard

TINY = "paircurate-tiny"
HEX_MEMBER = re.compile(r"^[0-9a-f]{32}\.(jpg|png|webp|txt|json)$")


def tar_bytes(members, mode="w"):
    """A tar (``mode`` "w" or "w:gz") of (name, bytes) members, in the order given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sample(i, key=None, meta=None):
    """The three members of one img2dataset-like sample."""
    image, caption = synthetic_image(900 + i, size=(64, 64))
    key = key or f"{i:09d}"
    meta = {"key": key, "url": f"http://example.invalid/{i}.jpg", **(meta or {})}
    return [(f"{key}.jpg", encode(image)), (f"{key}.txt", caption.encode()),
            (f"{key}.json", json.dumps(meta).encode())]


def score_config(*extra):
    return load_config(None, [f"clip.model_config={TINY}", "clip.pretrained=none", "clip.device=cpu",
                              "clip.batch_size=4", "clip.min_score=-1.0", "output.report=false", *extra])


def read_ledger(out):
    return pq.read_table(sorted(glob.glob(os.path.join(out, "metadata", "*.parquet")))).to_pylist()


# --- uids ------------------------------------------------------------------------------


def test_uid_is_computed_from_shard_and_key_never_taken_from_json(tmp_path):
    members = (sample(0, meta={"uid": "0000000a/../../../../tmp/x"})
               + sample(1, meta={"uid": "not hex at all"})
               + sample(2, meta={"uid": "0000000a/../../../../tmp/x"})  # the same json uid again
               + sample(3, key="000000000")  # the first key again, later in the shard
               + sample(4, meta={"uid": 12345, "url": 7}))
    path = tmp_path / "a.tar"
    path.write_bytes(tar_bytes(members))
    records = list(read_shard(str(path), str(tmp_path), 10_000_000))
    uids = [r["uid"] for r in records]
    assert len(records) == 5 and len(set(uids)) == 5
    assert all(re.fullmatch(r"[0-9a-f]{32}", uid) for uid in uids)
    assert uids[0] == sample_uid("a.tar", "000000000")
    assert uids[3] == sample_uid("a.tar", "000000000", 1)  # a repeated key gets its own uid
    assert [r["key"] for r in records] == ["000000000", "000000001", "000000002", "000000000", "000000004"]
    assert records[4]["url"] is None  # a non-string url from the json is not carried
    assert all(r["status"] == "ok" for r in records)


def test_hostile_uids_and_repeated_shards_give_hex_members_only(tmp_path):
    """Path-like, non-hex and repeated uids, a repeated key, a shard listed twice: no crash, hex names."""
    folder = tmp_path / "in"
    folder.mkdir()
    members = (sample(0, meta={"uid": "0000000a/../../../../tmp/x"})
               + sample(1, meta={"uid": "zz-not-hex"})
               + sample(2, meta={"uid": "0000000a/../../../../tmp/x"})
               + sample(3, key="000000000"))
    (folder / "a.tar").write_bytes(tar_bytes(members))
    (folder / "b.tar").write_bytes(tar_bytes(sample(4, meta={"uid": "../../b"})))
    out = str(tmp_path / "out")
    pattern = f"{folder}/*.tar,{folder}/a.tar,{folder}/a.tar"
    stats = run_score(pattern, out, score_config())
    ledger = read_ledger(out)
    assert stats["input_shards"] == 2 and stats["ledger_rows"] == len(ledger) == 5
    assert all(row["status"] == "ok" for row in ledger)
    assert len({row["uid"] for row in ledger}) == 5
    names = [n for shard in glob.glob(os.path.join(out, "shards", "*.tar"))
             for n in tarfile.open(shard).getnames()]
    assert len(names) == 15 and all(HEX_MEMBER.match(n) for n in names), names


# --- bounded reads -----------------------------------------------------------------------


def test_oversized_member_is_decode_failed_and_never_read(tmp_path):
    big = os.urandom(300_000)
    members = sample(0) + [("000000001.jpg", big), ("000000001.txt", b"a large picture")] + sample(2)
    path = tmp_path / "a.tar"
    path.write_bytes(tar_bytes(members))
    records = list(read_shard(str(path), str(tmp_path), 100_000))
    assert [r["status"] for r in records] == ["ok", "decode_failed", "ok"]
    assert records[1]["error"].startswith("too_large: 000000001.jpg is 300000 bytes")
    assert records[1]["caption"] == "a large picture" and records[1]["image"] is None
    # The reader hands over a stand-in, not the bytes.
    (_, first), (_, second), _ = iter_shard(str(path), SAMPLE_EXTENSIONS, 100_000)
    assert second["jpg"] == OversizedMember("000000001.jpg", 300_000)


def test_members_of_other_kinds_are_skipped(tmp_path):
    members = sample(0) + [("000000000.npy", b"\x00" * 5000), ("000000000.cls", b"7")]
    path = tmp_path / "a.tar"
    path.write_bytes(tar_bytes(members))
    ((key, found),) = iter_shard(str(path), SAMPLE_EXTENSIONS, 100_000)
    assert key == "000000000" and set(found) == {"jpg", "txt", "json"}


_PEAK_SCRIPT = """
import sys, tracemalloc
from paircurate.score import read_shard
tracemalloc.start()
records = list(read_shard(sys.argv[1], "", 20 * 1024 * 1024))
print(tracemalloc.get_traced_memory()[1], [(r["status"], r["error"]) for r in records])
"""


class _Zeros(io.RawIOBase):
    """``size`` zero bytes, produced in blocks (so the test never holds them in memory)."""

    def __init__(self, size):
        self.left = size

    def readable(self):
        return True

    def readinto(self, buffer):
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def test_small_gzip_tar_with_huge_member_keeps_memory_bounded(tmp_path):
    """A ~1 MB .tar.gz holding a 1 GiB member: peak memory stays far below the member's size."""
    size = 1 << 30
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(path, "w:gz", compresslevel=9) as tar:
        for name, data in sample(0):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name in ("000000001.jpg", "000000001.bin"):  # one a sample uses, one it does not
            info = tarfile.TarInfo(name)
            info.size = size if name.endswith(".jpg") else size // 16
            tar.addfile(info, io.BufferedReader(_Zeros(info.size), 1 << 20))
        for name, data in sample(2):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert os.path.getsize(path) < 2 * 1024 * 1024
    result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(path)], capture_output=True,
                            text=True, check=True)
    peak, statuses = result.stdout.split(" ", 1)
    assert int(peak) < size // 16, f"peak {int(peak) >> 20} MiB for a {size >> 20} MiB member"
    assert "('decode_failed', 'too_large: 000000001.jpg is 1073741824 bytes" in statuses
    assert statuses.count("('ok', None)") == 2


def test_huge_extended_header_is_refused_not_read(tmp_path):
    """A pax header declaring 64 MiB (tarfile would read it whole) ends the shard as damaged."""
    header = tarfile.TarInfo("PaxHeaders/x")
    header.type = tarfile.XHDTYPE
    header.size = 64 << 20
    path = tmp_path / "pax.tar"
    with open(path, "wb") as handle:
        for name, data in sample(0) + sample(1):  # member by member, so nothing ends the archive early
            info = tarfile.TarInfo(name)
            info.size = len(data)
            handle.write(info.tobuf(tarfile.USTAR_FORMAT) + data + bytes(-len(data) % 512))
        handle.write(header.tobuf(tarfile.USTAR_FORMAT))
        handle.write(bytes(64 << 20))
    records = list(read_shard(str(path), str(tmp_path), 10_000_000))
    assert [r["status"] for r in records] == ["ok", "decode_failed"]
    assert "extended header of 67108864 bytes" in records[1]["error"]
    assert records[1]["key"] == "000000001"  # the sample being read when the damage was hit


# --- damaged tars ----------------------------------------------------------------------------


def damaged_shards(folder):
    whole = tar_bytes(sample(0) + sample(1) + sample(2))
    second_starts = whole.index(b"000000001.jpg")  # the header of sample 1's first member
    shards = {
        "empty.tar": b"",
        "garbage.tar": b"this is not a tar file " * 100,
        "truncated.tar": whole[: second_starts + 700],  # inside sample 1's image
        "truncated.tar.gz": gzip.compress(whole)[:-300],
    }
    for name, data in shards.items():
        (folder / name).write_bytes(data)
    return shards


def test_damaged_tars_keep_what_was_read_and_record_the_damage(tmp_path):
    damaged_shards(tmp_path)
    by_name = {name: list(read_shard(str(tmp_path / name), str(tmp_path), 10_000_000))
               for name in ("empty.tar", "garbage.tar", "truncated.tar", "truncated.tar.gz")}
    for name in ("empty.tar", "garbage.tar"):
        (row,) = by_name[name]
        assert row["status"] == "decode_failed" and row["key"] is None
        assert row["error"].startswith(f"corrupt_shard: {tmp_path / name}: ReadError")
    truncated = by_name["truncated.tar"]
    assert [r["status"] for r in truncated] == ["ok", "decode_failed"]
    assert truncated[1]["key"] == "000000001" and "in sample '000000001'" in truncated[1]["error"]
    gz = by_name["truncated.tar.gz"]
    assert gz[-1]["status"] == "decode_failed" and gz[-1]["error"].startswith("corrupt_shard: ")
    assert all(r["status"] == "ok" for r in gz[:-1])
    with pytest.raises(CorruptShard):  # the reader says what happened; score turns it into a row
        list(iter_shard(str(tmp_path / "garbage.tar")))


def test_score_survives_damaged_shards_and_ledger_equals_rows_read(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    damaged_shards(folder)
    (folder / "good.tar").write_bytes(tar_bytes(sample(5) + sample(6)))
    out = str(tmp_path / "out")
    stats = run_score(f"{folder}/*", out, score_config())
    ledger = read_ledger(out)
    assert stats["rows_in"] == stats["ledger_rows"] == len(ledger)
    damaged = [r for r in ledger if r["status"] == "decode_failed"]
    assert len(damaged) == 4 and all(r["error"].startswith("corrupt_shard: ") for r in damaged)
    assert stats["errors"]["decode_failed"]["corrupt_shard"] == 4
    read_before_damage = sum(r["status"] == "ok" for name in ("truncated.tar", "truncated.tar.gz")
                             for r in read_shard(str(folder / name), str(folder), 10_000_000))
    assert read_before_damage >= 1
    assert sum(r["status"] == "ok" for r in ledger) == 2 + read_before_damage
    assert os.path.exists(os.path.join(out, "_SUCCESS"))


def test_a_damaged_header_mid_shard_is_a_ledger_row_not_a_shorter_shard(tmp_path):
    """tarfile's reader took a bad header after the first for the end of the archive: the samples
    from there on vanished without a row.  Now the damage is a corrupt_shard row (naming the
    sample being read), and the ledger still equals the rows read."""
    folder = tmp_path / "in"
    folder.mkdir()
    whole = bytearray(tar_bytes(sample(0) + sample(1) + sample(2) + sample(3)))
    at = whole.index(b"000000002.jpg")
    whole[at + 200] ^= 0xFF  # sample 2's image header: its checksum no longer holds
    (folder / "bad.tar").write_bytes(bytes(whole))
    (folder / "good.tar").write_bytes(tar_bytes(sample(5)))
    out = str(tmp_path / "out")
    stats = run_score(f"{folder}/*", out, score_config())
    ledger = read_ledger(out)
    assert stats["rows_in"] == stats["ledger_rows"] == len(ledger) == 3
    bad = sorted((r for r in ledger if r["source"].endswith("bad.tar")), key=lambda r: r["status"])
    assert [r["status"] for r in bad] == ["decode_failed", "ok"]  # sample 0, then the damage
    assert bad[0]["key"] == "000000001" and bad[1]["uid"] == sample_uid("bad.tar", "000000000")
    assert bad[0]["error"].startswith("corrupt_shard: ") and "bad checksum" in bad[0]["error"]
    assert "in sample '000000001'" in bad[0]["error"]
    assert stats["errors"]["decode_failed"]["corrupt_shard"] == 1
    assert os.path.exists(os.path.join(out, "_SUCCESS"))
