"""Semantic dedup: float16 embeddings, LSH candidates, clustering, and the stage end to end."""
import os

import numpy as np
import pytest

from conftest import ledger, shard_keys
from oracles import connected_components
from paircurate.config import load_config
from paircurate.transforms import semantic
from paircurate.transforms.beam_util import test_pipeline
from paircurate.transforms.dedup import DedupConfig, SemanticDedupConfig, node_key
from paircurate.transforms.phash import rank
from paircurate.transforms.schema import LEDGER_COLUMNS, Status, ledger_row, new_record, pack_record, unpack_record


def unit(v):
    return v / np.linalg.norm(v)


def planted(rng, base, cos):
    """A unit vector at exactly cosine ``cos`` to the unit vector ``base``."""
    u = rng.standard_normal(base.size)
    u = unit(u - (u @ base) * base)
    return cos * base + np.sqrt(1 - cos * cos) * u


def test_embedding_travels_as_normalised_float16():
    v = np.random.default_rng(1).standard_normal(512) * 7.0
    data = semantic.embedding_bytes(v)
    assert len(data) == 2 * 512  # float16, never more
    back = semantic.embedding_array(data)
    assert abs(np.linalg.norm(back) - 1.0) < 1e-3
    assert semantic.cosine(back, v) > 0.9999
    assert semantic.cosine(back, semantic.embedding_array(semantic.embedding_bytes(v))) > 0.99999


def test_embedding_is_packed_for_shuffles_but_never_reaches_the_ledger():
    record = new_record("u1", "http://a/x.jpg", "a caption", "in.parquet", 0, {})
    record[semantic.EMBEDDING_FIELD] = semantic.embedding_bytes(np.ones(8))
    again = unpack_record(pack_record(record))
    assert again[semantic.EMBEDDING_FIELD] == record[semantic.EMBEDDING_FIELD]
    assert semantic.EMBEDDING_FIELD not in LEDGER_COLUMNS
    assert semantic.EMBEDDING_FIELD not in ledger_row(again, [])


def test_lsh_candidates_recall_planted_pairs_at_and_above_the_threshold():
    rng = np.random.default_rng(7)
    config = SemanticDedupConfig(enabled=True, min_cosine=0.95)
    dim, n = 128, 3000
    bases = np.stack([unit(rng.standard_normal(dim)) for _ in range(n)])
    cosines = rng.uniform(0.95, 0.99, n)
    copies = np.stack([planted(rng, b, c) for b, c in zip(bases, cosines)])
    embeddings = np.concatenate([bases, copies])
    pairs, stats = semantic.candidate_pairs(embeddings, config)
    found = {tuple(p) for p in pairs.tolist()}
    recall = np.mean([(i, n + i) in found for i in range(n)])
    assert recall >= 0.99, recall  # 0.997 expected at 30 x 16 bits (README)
    assert semantic.expected_recall(0.95, config.bands, config.bits) >= 0.99
    # Each pair is reported once, though it may share several bands.
    assert len(found) == len(pairs)
    # Unrelated vectors are not candidates: the prefilter drops them inside buckets.
    assert len(found) < 1.05 * n
    edges = semantic.semantic_edges(embeddings, config)
    assert all(c >= 0.95 for _, _, c in edges)
    assert {(i, j) for i, j, _ in edges} <= found


def test_far_pairs_are_not_candidates_and_near_misses_are_rejected_by_the_exact_cosine():
    rng = np.random.default_rng(3)
    config = SemanticDedupConfig(enabled=True, min_cosine=0.95)
    base = unit(rng.standard_normal(64))
    embeddings = np.stack([base, planted(rng, base, 0.93), planted(rng, base, 0.5)])
    edges = semantic.semantic_edges(embeddings, config)
    assert edges == []


def test_hot_bucket_is_compared_in_a_window_and_still_chains():
    config = SemanticDedupConfig(enabled=True, max_bucket_comparisons=50)
    v = unit(np.random.default_rng(0).standard_normal(32))
    embeddings = np.tile(v, (200, 1))  # 200 identical embeddings: every band is one bucket
    pairs, stats = semantic.candidate_pairs(embeddings, config)
    assert stats.overflowing == config.bands
    assert stats.comparisons <= 200 * config.bands  # a window of 1 instead of 19,900 pairs a band
    assert stats.skipped > 0
    components = connected_components(range(200), [tuple(p) for p in pairs.tolist()])
    assert len(set(components.values())) == 1


def run_transform(elements, transform):
    """Run a transform on the local runner; its outputs, pickled to files and read back."""
    import pickle
    import tempfile
    import uuid

    import apache_beam as beam

    def dump(element, folder):
        with open(os.path.join(folder, uuid.uuid4().hex), "wb") as handle:
            pickle.dump(element, handle)

    with tempfile.TemporaryDirectory() as folder:
        with test_pipeline() as p:
            p | beam.Create(elements, reshuffle=False) | transform | beam.Map(dump, folder)
        out = []
        for name in os.listdir(folder):
            with open(os.path.join(folder, name), "rb") as handle:
                out.append(pickle.load(handle))
    return out


def run_decisions(sigs, config):
    return dict(run_transform(sigs, semantic.SemanticDecisions(config)))


def test_decisions_use_the_pixel_then_uid_representative_and_name_the_cosine():
    rng = np.random.default_rng(11)
    config = DedupConfig(semantic=SemanticDedupConfig(enabled=True, min_cosine=0.95), partitions=7)
    base = unit(rng.standard_normal(64))
    near = planted(rng, base, 0.97)
    nearer = planted(rng, base, 0.99)
    other = unit(rng.standard_normal(64))
    # uid -> (pixels, embedding); "b" has the most pixels, so it is kept; "e" stands alone.
    images = {"a": (100, base), "b": (400, near), "c": (100, nearer), "d": (100, base), "e": (400, other)}
    sigs = [(node_key(rank(uid, px, 1)), semantic.embedding_bytes(emb)) for uid, (px, emb) in images.items()]
    decisions = run_decisions(sigs, config)
    assert set(decisions) == {"a", "c", "d"}
    for status, duplicate_of, error in decisions.values():
        assert status == Status.DUPLICATE_SEMANTIC.value and duplicate_of == "b"
        assert error.startswith("semantic: cosine ")
    # "a" and "d" are the same embedding: each names the other as its nearest, at cosine 1.000.
    assert decisions["a"][2] == "semantic: cosine 1.000 to d"
    assert decisions["d"][2] == "semantic: cosine 1.000 to a"
    cos_c = max(semantic.cosine(nearer, base), semantic.cosine(nearer, near))
    assert decisions["c"][2].startswith(f"semantic: cosine {cos_c:.3f} to ")


def test_stage_marks_live_embedded_records_drops_embeddings_and_keeps_every_record():
    rng = np.random.default_rng(5)
    base = unit(rng.standard_normal(64))
    records = []
    for i, emb in enumerate([base, base, unit(rng.standard_normal(64)), base, None]):
        record = new_record(f"{i:032x}", f"http://h/{i}.jpg", "a caption here", "in", i, {})
        record.update(original_width=100 - i, original_height=100)
        if emb is not None:
            record[semantic.EMBEDDING_FIELD] = semantic.embedding_bytes(emb)
        records.append(record)
    records[3]["status"] = Status.CLIP_FILTERED.value  # filtered: not live, untouched
    config = DedupConfig(semantic=SemanticDedupConfig(enabled=True, min_cosine=0.99))
    out = run_transform(records, semantic.SemanticDedup(config))
    by_uid = {r["uid"]: r for r in out}
    assert len(out) == len(records)
    assert all(r.get(semantic.EMBEDDING_FIELD) is None for r in out)
    assert by_uid[f"{1:032x}"]["status"] == "duplicate_semantic"
    assert by_uid[f"{1:032x}"]["duplicate_of"] == f"{0:032x}"  # more pixels
    assert [by_uid[f"{i:032x}"]["status"] for i in (0, 2, 3, 4)] == ["ok", "ok", "clip_filtered", "ok"]


# --------------------------------------------------------------------------- end to end

@pytest.mark.parametrize("dedup_overrides", [
    ["dedup.enabled=false"],                           # staging moves before CLIP
    ["dedup.exact=false", "dedup.near=false"],         # dedup on, image dedup off
])
def test_identical_images_under_other_urls_end_duplicate_semantic(tmp_path, image_server, parquet_input,
                                                                  dedup_overrides):
    from paircurate.demo import encode, synthetic_image
    from paircurate.imageserver import Route
    from paircurate.run import run_pipeline

    rows = []
    for family in range(4):
        image, caption = synthetic_image(7100 + family, (320, 240))
        body = encode(image)
        for copy in range(3 if family < 2 else 1):  # two families of three copies, two singles
            path = f"/f{family}/c{copy}.jpg"
            image_server.routes[path] = Route(body)
            rows.append({"url": image_server.url(path), "caption": f"{caption}, copy {copy}",
                         "family": family})
    rows.append({"url": image_server.url("/missing.jpg"), "caption": "nothing here", "family": -1})
    config = load_config(overrides=[
        f"fetch.allowed_hosts=[{image_server.host_port}]", "clip.model_config=paircurate-tiny",
        "clip.pretrained=none", "clip.device=cpu", "clip.batch_size=4", "output.samples_per_shard=3",
        "dedup.semantic.enabled=true", "dedup.semantic.min_cosine=0.9999", *dedup_overrides])
    root = str(tmp_path / "out")
    stats = run_pipeline(parquet_input(rows), root, config)
    rows_out = ledger(root)
    assert len(rows_out) == len(rows)
    by_uid = {r["uid"]: r for r in rows_out}
    for family in range(4):
        members = [r for r in rows_out if r["family"] == family]
        kept = [r for r in members if r["status"] == "ok"]
        assert len(kept) == 1, [(r["url"], r["status"], r["error"]) for r in members]
        for r in members:
            if r is not kept[0]:
                assert r["status"] == "duplicate_semantic"
                assert r["duplicate_of"] == kept[0]["uid"]
                assert r["error"].startswith("semantic: cosine 1.000 to ")
                assert by_uid[r["error"].rsplit(" ", 1)[1]]["family"] == family
                assert r["clip_score"] is not None
    assert [r["status"] for r in rows_out if r["family"] == -1] == ["fetch_failed"]
    assert stats["by_status"]["duplicate_semantic"] == 4
    assert stats["semantic"]["verified_pairs"] == 6  # three pairs in each family of three, each once
    assert all(p["cosine"] < 0.9999 for p in stats["semantic"].get("nearest_rejected", []))
    assert sorted(shard_keys(root)) == sorted(r["uid"] for r in rows_out if r["status"] == "ok")
    assert not any(k.startswith("image_embedding") for k in rows_out[0])
    # The report counts the semantic signal and lists the rejected candidates nearest min_cosine.
    page = open(os.path.join(root, "report.html"), encoding="utf-8").read()
    assert 'data-signal="semantic" data-value="4"' in page
    rejected = stats["semantic"].get("nearest_rejected", [])
    if rejected:
        assert page.count('data-cosine="') == min(len(rejected), 10)
        assert f'data-cosine="{rejected[0]["cosine"]:.4f}"' in page
    else:
        assert "No semantic candidate pair was rejected." in page
