import io
import json
import tarfile

import apache_beam as beam
from apache_beam.testing.util import assert_that

from paircurate.transforms.beam_util import test_pipeline
from paircurate.transforms.read import make_uid
from paircurate.transforms.schema import new_record
from paircurate.transforms.write import (
    RANK_BUCKETS,
    WriteShards,
    assign_shards,
    bucket_offsets,
    rank_bucket,
    rank_group,
    summarise_counts,
    write_shard,
)


def kept_record(i, carried=None):
    uid = make_uid("s", i, f"http://h/{i}", f"caption {i}")
    record = new_record(uid, f"http://h/{i}", f"caption {i}", "s", i, carried or {})
    record.update(image=f"image-bytes-{i}".encode(), image_format="jpg", width=8, height=8)
    return record


def test_shard_positions_are_dense_and_sequential():
    records = [{"uid": make_uid("s", i, "u", "c")} for i in range(1000)]
    groups = {}
    for record in records:
        groups.setdefault(rank_group(record["uid"]), []).append(record)
    offsets = bucket_offsets({g: len(v) for g, v in groups.items()})
    assigned = {r["uid"]: shard for g, v in groups.items() for shard, r in assign_shards(g, v, offsets, 64)}
    sizes = {}
    for shard in assigned.values():
        sizes[shard] = sizes.get(shard, 0) + 1
    assert sorted(sizes) == list(range(16))  # 1000 / 64 -> shards 0..15
    assert all(n == 64 for s, n in sizes.items() if s < 15) and sizes[15] == 1000 - 15 * 64
    assert all(0 <= rank_bucket(r["uid"]) < RANK_BUCKETS for r in records)
    # Rank groups only split buckets: positions follow (bucket, uid), the order shards always had.
    by_position = sorted(records, key=lambda r: (rank_bucket(r["uid"]), r["uid"]))
    expected = {r["uid"]: i // 64 for i, r in enumerate(by_position)}
    assert assigned == expected
    assert all(r["key"] == r["uid"] and r["shard"] == f"{expected[r['uid']]:05d}" for r in records)


def test_tar_is_deterministic_and_sorted(tmp_path):
    records = [kept_record(i) for i in range(5)]
    for record in records:
        record["key"] = record["uid"]
    first = write_shard(str(tmp_path), 0, records, [])
    data1 = (tmp_path / "00000.tar").read_bytes()
    second = write_shard(str(tmp_path), 0, list(reversed(records)), [])
    assert (tmp_path / "00000.tar").read_bytes() == data1
    assert first == second and first["samples"] == 5 and first["bytes"] == len(data1)
    names = tarfile.open(fileobj=io.BytesIO(data1)).getnames()
    assert names == sorted(names) and len(names) == 15
    member = tarfile.open(fileobj=io.BytesIO(data1)).getmembers()[0]
    assert member.mtime == 946684800 and member.uname == ""
    assert not list(tmp_path.glob(".*incomplete"))


def test_summarise_counts():
    summary = summarise_counts([(("ok", ""), 5), (("fetch_failed", "http_404"), 2),
                                (("fetch_failed", "timeout"), 1)])
    assert summary["rows"] == 8
    assert summary["by_status"] == {"fetch_failed": 3, "ok": 5}
    assert summary["errors"] == {"fetch_failed": {"http_404": 2, "timeout": 1}}


def test_write_shards_in_beam(tmp_path):
    import webdataset as wds

    records = [kept_record(i, {"lang": "en"}) for i in range(23)]

    def check(out):
        assert len(out) == 23
        assert {r["key"] for r in out} == {r["uid"] for r in records}
        assert all(r["image"] is None for r in out)  # bytes are not carried on
        assert sorted({r["shard"] for r in out}) == ["00000", "00001", "00002"]

    def check_manifest(entries):
        assert sorted(e["name"] for e in entries) == ["00000.tar", "00001.tar", "00002.tar"]
        assert sorted(e["samples"] for e in entries) == [3, 10, 10]

    with test_pipeline() as p:
        written, manifest = p | beam.Create(records) | WriteShards(str(tmp_path), 10, ["lang"])
        assert_that(written, check, label="records")
        assert_that(manifest, check_manifest, label="manifest")
    samples = list(wds.WebDataset(sorted(str(p) for p in tmp_path.glob("*.tar")), shardshuffle=False))
    assert len(samples) == 23
    by_key = {s["__key__"]: s for s in samples}
    for record in records:
        sample = by_key[record["uid"]]
        assert sample["txt"].decode() == record["caption"]
        assert sample["jpg"] == record["image"]
        meta = json.loads(sample["json"])
        assert meta["url"] == record["url"] and meta["lang"] == "en"


def test_shard_members_cross_without_key_and_shard():
    """The shard grouping carries neither key nor shard (implied by uid and the grouping key)."""
    from paircurate.transforms.schema import pack_record
    from paircurate.transforms.write import shard_member, unshard_member

    record = {"uid": "ab" * 16, "status": "ok", "error": None, "duplicate_of": None, "clip_score": 0.5,
              "key": "ab" * 16, "shard": "00007", "image_ref": "s:0:10:20:ff", "clip_columns": None}
    packed = shard_member(record)
    again = unshard_member(7, packed)
    assert {name: again[name] for name in record} == record
    assert len(packed) <= len(pack_record(record)) - 38
