"""Dedup end to end: duplicate families under different URLs, then a run against history."""
import os

from conftest import ledger, shard_keys
from paircurate.config import load_config
from paircurate.demo import encode, synthetic_image
from paircurate.imageserver import Route
from paircurate.run import run_pipeline

FAMILIES = 6


def config(server, *extra):
    return load_config(overrides=[f"fetch.allowed_hosts=[{server.host_port}]", "clip.enabled=false",
                                  "output.samples_per_shard=4", *extra])


def test_families_keep_one_and_history_blocks_reruns(tmp_path, image_server, parquet_input):
    rows = []
    for f in range(FAMILIES):
        image, caption = synthetic_image(5500 + f, (480, 360))
        variants = {
            "orig": encode(image, quality=92),
            "mirror": encode(image, quality=92),                       # same bytes elsewhere
            "half": encode(image.resize((240, 180)), quality=85),      # resized copy
            "q40": encode(image, quality=40),                          # re-encoded copy
        }
        for name, body in variants.items():
            path = f"/{name}/{f}.jpg"
            image_server.routes[path] = Route(body)
            rows.append({"url": image_server.url(path), "caption": f"{caption} ({name})", "family": f})
    first_root = str(tmp_path / "first")
    stats = run_pipeline(parquet_input(rows, "first.parquet"), first_root, config(image_server))
    first = ledger(first_root)
    assert len(first) == 4 * FAMILIES and stats["by_status"]["ok"] == FAMILIES
    by_uid = {r["uid"]: r for r in first}
    for f in range(FAMILIES):
        family = [r for r in first if r["family"] == f]
        kept = [r for r in family if r["status"] == "ok"]
        assert len(kept) == 1, [(r["url"], r["status"]) for r in family]
        # The representative has the most pixels: never the half-size copy.
        assert "/half/" not in kept[0]["url"]
        for r in family:
            if r is not kept[0]:
                assert r["status"] in ("duplicate_exact", "duplicate_near"), r["status"]
                assert r["duplicate_of"] == kept[0]["uid"]
                assert by_uid[r["duplicate_of"]]["status"] == "ok"
    # Of each original and its mirror (the same bytes), one is recorded as the other's exact copy.
    for f in range(FAMILIES):
        pair = [r for r in first if r["family"] == f and ("/orig/" in r["url"] or "/mirror/" in r["url"])]
        assert sum(r["error"] == "exact" or (r["error"] or "").startswith("near: exact copy of")
                   for r in pair) == 1
    assert sorted(shard_keys(first_root)) == sorted(r["uid"] for r in first if r["status"] == "ok")

    # Second run: the first run's images again, re-hosted and re-encoded, plus new ones.
    second_rows = []
    for f in range(FAMILIES):
        image, caption = synthetic_image(5500 + f, (480, 360))
        path = f"/again/{f}.jpg"
        image_server.routes[path] = Route(encode(image, quality=70))
        second_rows.append({"url": image_server.url(path), "caption": caption, "family": f})
    for n in range(3):
        image, caption = synthetic_image(6600 + n)
        path = f"/new/{n}.jpg"
        image_server.routes[path] = Route(encode(image))
        second_rows.append({"url": image_server.url(path), "caption": caption, "family": 100 + n})
    second_root = str(tmp_path / "second")
    history = os.path.join(first_root, "metadata", "*.parquet")
    run_pipeline(parquet_input(second_rows, "second.parquet"), second_root,
                 config(image_server, f"dedup.history=[{history}]"))
    second = ledger(second_root)
    assert len(second) == len(second_rows)
    first_kept = {r["uid"] for r in first if r["status"] == "ok"}
    for r in second:
        if r["family"] >= 100:
            assert r["status"] == "ok"
        else:
            assert r["status"] in ("duplicate_exact", "duplicate_near")
            assert r["duplicate_of"] in first_kept
    keys = shard_keys(second_root)
    assert sorted(keys) == sorted(r["uid"] for r in second if r["family"] >= 100)
    assert not set(keys) & first_kept
