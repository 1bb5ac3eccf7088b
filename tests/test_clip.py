"""CLIP scoring and filtering: parity with open_clip, filters, embeddings, offline failure, rescoring."""
from __future__ import annotations

import glob
import io
import json
import math
import os
import pickle
import random
import tarfile
import tempfile
import time
import uuid

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402

from paircurate.config import load_config  # noqa: E402
from paircurate.demo import encode, synthetic_image  # noqa: E402
from paircurate.transforms import clip as clip_stage  # noqa: E402
from paircurate.transforms import clip_model  # noqa: E402
from paircurate.transforms.beam_util import test_pipeline  # noqa: E402
from paircurate.transforms.clip import ClipModelError, ScoreAndFilter, kept_count, top_fraction_threshold  # noqa: E402
from paircurate.transforms.clip_model import ClipConfig  # noqa: E402
from paircurate.transforms.schema import Status, new_record  # noqa: E402

TINY = "paircurate-tiny"


def _dump(record, folder):
    """Collect a pipeline output (the runner may run DoFns on pickled copies of this module)."""
    with open(os.path.join(folder, uuid.uuid4().hex), "wb") as handle:
        pickle.dump(record, handle)


def tiny_config(**changes) -> ClipConfig:
    values = dict(model_config=TINY, pretrained="none", device="cpu", batch_size=5, preprocess_threads=2,
                  preprocess="exact")
    values.update(changes)
    return ClipConfig(**values)


def make_records(n, seed=0, caption_none=(), dead=()):
    """n live records with 256x256 JPEGs and captions; some without caption, some already rejected."""
    records = []
    for i in range(n):
        image, caption = synthetic_image(seed * 1000 + i, size=(256, 256))
        uid = f"{i:08x}" + "0" * 24
        record = new_record(uid, f"http://example.invalid/{i}.jpg", caption, "input.parquet", i, {})
        record["image"] = encode(image)
        if i in caption_none:
            record["caption"] = None
        if i in dead:
            record.update(status=Status.DUPLICATE_EXACT.value, error="duplicate_exact", image=None)
        records.append(record)
    return records


def run_stage(records, config, output_dir=None):
    """Run ScoreAndFilter over records (shuffled) on the local runner; return the output records by uid."""
    shuffled = list(records)
    random.Random(7).shuffle(shuffled)
    stage = ScoreAndFilter(config, output_dir)
    with tempfile.TemporaryDirectory() as folder:
        with test_pipeline() as p:
            (p | beam.Create(shuffled, reshuffle=False) | stage
             | beam.Map(_dump, folder))
        out = []
        for name in os.listdir(folder):
            with open(os.path.join(folder, name), "rb") as handle:
                out.append(pickle.load(handle))
    assert len(out) == len(records)
    return {r["uid"]: r for r in out}


def reference_scores(records):
    """open_clip's own computation: preprocess_val, encode_image/encode_text, normalised dot product."""
    open_clip.add_model_config(clip_model.find_model_config(TINY))
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY, pretrained=None)
    model.eval()
    tokenizer = open_clip.get_tokenizer(TINY)
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(io.BytesIO(r["image"]))) for r in records])
        image_features = model.encode_image(images)
        text_features = model.encode_text(tokenizer([r["caption"] for r in records]))
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    scores = (image_features * text_features).sum(-1).numpy()
    return {r["uid"]: float(s) for r, s in zip(records, scores)}


@pytest.fixture(scope="module")
def scored_once():
    """37 pairs (+2 without caption, +2 already rejected) through the stage with no filter."""
    records = make_records(41, caption_none=(3, 17), dead=(5, 30))
    out = run_stage(records, tiny_config())
    return records, out


# --- parity and contract ---------------------------------------------------


def test_scores_match_open_clip_across_shuffled_batches(scored_once):
    records, out = scored_once
    live = [r for r in records if r["status"] == "ok" and r["caption"] is not None]
    expected = reference_scores(live)
    assert len(expected) == 37
    diffs = [abs(out[uid]["clip_score"] - score) for uid, score in expected.items()]
    assert max(diffs) < 1e-4
    # Scores differ from pair to pair, so a key mix-up could not hide in equal values.
    assert len({round(s, 4) for s in expected.values()}) > 30
    assert all(out[uid]["status"] == "ok" for uid in expected)


def test_unscorable_records_pass_untouched(scored_once):
    records, out = scored_once
    for i in (3, 17):  # live without caption: nothing to score, not filtered
        record = out[records[i]["uid"]]
        assert record["status"] == "ok" and record["clip_score"] is None and record["image"]
    for i in (5, 30):
        record = out[records[i]["uid"]]
        assert record["status"] == "duplicate_exact" and record["clip_score"] is None


def test_disabled_stage_is_identity():
    records = make_records(4)
    out = run_stage(records, tiny_config(enabled=False))
    assert all(r["clip_score"] is None and r["status"] == "ok" for r in out.values())


# --- filters ------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.01, 0.25, 0.3, 0.5, 0.999, 1.0])
def test_top_fraction_threshold_is_exact(fraction):
    rng = np.random.default_rng(1)
    scores = np.concatenate([rng.normal(0.25, 0.08, 997), [-0.5, 0.0, -0.0]]).astype(np.float32)
    k = kept_count(len(scores), fraction)
    threshold = top_fraction_threshold([float(s) for s in scores], fraction)
    assert threshold == float(np.sort(scores)[::-1][k - 1])
    assert int((scores >= threshold).sum()) == k  # no ties among these scores


def test_top_fraction_keeps_ties_and_counts_decimally():
    assert kept_count(10, 0.3) == 3  # not ceil(3.0000000000000004) == 4
    assert kept_count(7, 0.5) == 4
    scores = [0.1, 0.2, 0.3, 0.3, 0.3, 0.5]
    threshold = top_fraction_threshold(scores, 0.5)  # k = 3: the 3rd largest is 0.3, tied 3 times
    assert threshold == pytest.approx(0.3)
    assert sum(s >= threshold for s in np.float32(scores)) == 4  # ties kept: never fewer than k
    assert top_fraction_threshold([], 0.5) is None
    assert top_fraction_threshold([-0.25, -0.75], 0.5) == -0.25


def threshold_in_widest_gap(scores):
    """A threshold halfway across the widest gap between neighbouring scores of the middle half.

    Scores move by ~1e-7 when the batch composition changes (CPU matmuls are not
    batch-invariant), so a threshold equal to a score could land on either side of it
    in another run; one in the middle of a wide gap cannot.  Returns (threshold, rows below).
    """
    ordered = sorted(scores)
    quarter = len(ordered) // 4
    below = max(range(quarter, len(ordered) - quarter), key=lambda i: ordered[i] - ordered[i - 1])
    assert ordered[below] - ordered[below - 1] > 1e-3  # far wider than any batching difference
    return (ordered[below - 1] + ordered[below]) / 2, below


def test_min_score_filters_below_threshold(scored_once):
    records, unfiltered = scored_once
    scores = [r["clip_score"] for r in unfiltered.values() if r["clip_score"] is not None]
    threshold, below = threshold_in_widest_gap(scores)
    out = run_stage(records, tiny_config(min_score=threshold, batch_size=8))
    filtered = 0
    for uid, record in out.items():
        if unfiltered[uid]["clip_score"] is None:
            assert record["status"] == unfiltered[uid]["status"] and record["clip_score"] is None
            continue
        # Each row is judged by its own score from this run (batch size 8, not the fixture's 5).
        score = record["clip_score"]
        assert score == pytest.approx(unfiltered[uid]["clip_score"], abs=1e-4)
        if score < threshold:
            filtered += 1
            assert record["status"] == "clip_filtered"
            assert record["error"].startswith("clip_score: ") and record["image"] is None
        else:
            assert record["status"] == "ok" and record["image"]
    assert filtered == below


def test_threshold_keeps_scores_at_or_above_it():
    def scored(score):
        record = make_records(1)[0]
        record["clip_score"] = score
        return record

    assert clip_stage.apply_threshold(scored(0.28), 0.28)["status"] == "ok"
    assert clip_stage.apply_threshold(scored(0.2800001), 0.28)["status"] == "ok"
    low = clip_stage.apply_threshold(scored(0.2799999), 0.28)
    assert low["status"] == "clip_filtered" and low["error"].startswith("clip_score: ")
    assert clip_stage.apply_threshold(scored(0.1), None)["status"] == "ok"


def test_keep_fraction_keeps_top_of_run(scored_once):
    records, unfiltered = scored_once
    out = run_stage(records, tiny_config(keep_fraction=0.25, batch_size=7))
    scored = {uid: r for uid, r in out.items() if r["clip_score"] is not None}
    assert len(scored) == 37
    kept = {uid for uid, r in scored.items() if r["status"] == "ok"}
    assert len(kept) == math.ceil(0.25 * 37)
    top = sorted(scored, key=lambda uid: scored[uid]["clip_score"], reverse=True)[:len(kept)]
    assert kept == set(top)
    assert all(r["status"] == "clip_filtered" for uid, r in scored.items() if uid not in kept)


# --- embeddings ---------------------------------------------------------------


def test_embeddings_are_aligned_to_uids(tmp_path):
    records = make_records(23, seed=3)
    out = run_stage(records, tiny_config(save_embeddings=True, batch_size=4), str(tmp_path))
    files = sorted(glob.glob(str(tmp_path / "embeddings" / "part-*.parquet")))
    assert files and not glob.glob(str(tmp_path / "embeddings" / ".temp*"))
    table = pq.read_table(files).to_pydict() if len(files) == 1 else None
    if table is None:
        import pyarrow as pa
        table = pa.concat_tables([pq.read_table(f) for f in files]).to_pydict()
    assert sorted(table["uid"]) == sorted(out)
    for uid, image, text in zip(table["uid"], table["image_embedding"], table["text_embedding"]):
        image, text = np.asarray(image, np.float32), np.asarray(text, np.float32)
        assert len(image) == 64
        assert float(image @ text) == pytest.approx(out[uid]["clip_score"], abs=5e-3)
    schema = pq.read_schema(files[0])
    kind = schema.field("image_embedding").type
    assert kind.list_size == 64 and str(kind.value_type) == "halffloat"


# --- model loading ----------------------------------------------------------


def test_missing_weights_offline_fail_fast_with_advice(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = ClipConfig(cache_dir=str(tmp_path / "empty-cache"))  # default ViT-B-32 / laion2b tag
    started = time.monotonic()
    with pytest.raises(ClipModelError) as info:
        ScoreAndFilter(config, str(tmp_path))
    assert time.monotonic() - started < 20
    message = str(info.value)
    assert "ViT-B-32/laion2b_s34b_b79k" in message
    assert "clip.pretrained=/path/to" in message and "pretrained=none" in message


def test_unreachable_hub_switches_process_offline(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    probed = []
    assert clip_model.can_download("huggingface.co", probe=lambda host: probed.append(host) or False) is False
    assert probed == ["huggingface.co"] and os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE
    # Offline now: no second probe.
    assert clip_model.can_download("huggingface.co", probe=lambda host: probed.append(host) or True) is False
    assert probed == ["huggingface.co"]


def test_probe_of_closed_loopback_port_is_quick():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        started = time.monotonic()
        assert clip_model.reachable("127.0.0.1", port, timeout=2.0) is False
    assert time.monotonic() - started < 3


def test_unknown_tag_and_unknown_model_are_clear():
    with pytest.raises(ClipModelError, match="neither a known tag"):
        clip_model.resolve_model(tiny_config(pretrained="laion2b_s34b_b79k"))
    with pytest.raises(ClipModelError, match="not an open_clip architecture"):
        clip_model.resolve_model(ClipConfig(model="ViT-Nope", pretrained="none"))
    with pytest.raises(ClipModelError, match="not a shipped model config"):
        clip_model.resolve_model(ClipConfig(model_config="no-such-config", pretrained="none"))


def test_local_checkpoint_is_loaded(tmp_path):
    open_clip.add_model_config(clip_model.find_model_config(TINY))
    torch.manual_seed(123)
    model = open_clip.create_model(TINY, pretrained=None)
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    loaded = clip_model.load_clip(tiny_config(pretrained=str(path)))
    assert loaded.resolved.source == "file"
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    # Random weights are seeded: two loads agree.
    a = clip_model.load_clip(tiny_config()).model.state_dict()
    b = clip_model.load_clip(tiny_config()).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_undecodable_image_is_marked_not_scored():
    records = make_records(6, seed=5)
    records[2]["image"] = b"\xff\xd8\xff not really a jpeg"
    out = run_stage(records, tiny_config(batch_size=3))
    bad = out[records[2]["uid"]]
    assert bad["status"] == "decode_failed" and bad["error"].startswith("not_image: clip:")
    assert bad["clip_score"] is None
    assert all(out[r["uid"]]["clip_score"] is not None for i, r in enumerate(records) if i != 2)


def test_model_description_names_model_and_tag():
    desc = clip_stage.model_description(ClipConfig())
    assert desc["model"] == "ViT-B-32" and desc["pretrained"] == "laion2b_s34b_b79k"
    desc = clip_stage.model_description(tiny_config(keep_fraction=0.3))
    assert desc["model"] == TINY and desc["pretrained"] == "none" and desc["filter"] == "keep_fraction"


# --- paircurate score -------------------------------------------------------


def write_webdataset(path, n, with_uid=lambda i: i % 2 == 0):
    """A tar like img2dataset's: {key}.jpg, {key}.txt, {key}.json; returns [(key, uid or None, caption)]."""
    samples = []
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            image, caption = synthetic_image(500 + i, size=(256, 256))
            key = f"{i:09d}"
            meta = {"key": key, "url": f"http://example.invalid/{i}.jpg", "width": 256, "height": 256,
                    "status": "success"}
            uid = None
            if with_uid(i):
                uid = f"{i:032x}"
                meta["uid"] = uid
            for name, data in ((f"{key}.jpg", encode(image)), (f"{key}.txt", caption.encode()),
                               (f"{key}.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            samples.append((key, uid, caption))
    return samples


def test_run_score_rescores_webdataset(tmp_path):
    from paircurate.score import run_score, sample_uid

    os.makedirs(tmp_path / "in")
    samples = write_webdataset(tmp_path / "in" / "00000.tar", 12)
    config = load_config(None, [f"clip.model_config={TINY}", "clip.pretrained=none", "clip.device=cpu",
                                "clip.batch_size=4", "clip.keep_fraction=0.5", "output.report=false"])
    out = tmp_path / "out"
    stats = run_score(str(tmp_path / "in" / "*.tar"), str(out), config)
    ledger = pq.read_table(sorted(glob.glob(str(out / "metadata" / "*.parquet")))).to_pylist()
    assert len(ledger) == 12 and stats["ledger_rows"] == 12
    expected_uids = {sample_uid("00000.tar", key) for key, _, _ in samples}  # never the json's uid
    assert {row["uid"] for row in ledger} == expected_uids
    assert sum(row["status"] == "ok" for row in ledger) == 6
    assert sum(row["status"] == "clip_filtered" for row in ledger) == 6
    assert all(row["clip_score"] is not None for row in ledger)
    captions = {sample_uid("00000.tar", key): caption for key, _, caption in samples}
    assert all(row["caption"] == captions[row["uid"]] for row in ledger)
    kept = {row["uid"] for row in ledger if row["status"] == "ok"}
    assert min(r["clip_score"] for r in ledger if r["uid"] in kept) >= \
        max(r["clip_score"] for r in ledger if r["uid"] not in kept)
    with tarfile.open(out / "shards" / "00000.tar") as tar:
        names = tar.getnames()
    assert sorted({n.split(".")[0] for n in names}) == sorted(kept)
    assert stats["clip_model"]["model"] == TINY and stats["clip_threshold"] is not None
    assert os.path.exists(out / "_SUCCESS") and os.path.exists(out / "stats.json")


def test_model_shared_across_processes_scores_the_same(scored_once):
    records, unfiltered = scored_once
    out = run_stage(records[:12], tiny_config(share_model_across_processes=True))
    for uid, record in out.items():
        expected = unfiltered[uid]["clip_score"]
        if expected is None:
            assert record["clip_score"] is None
        else:
            # Other batches than the fixture's: equal up to float rounding, not bitwise.
            assert record["clip_score"] == pytest.approx(expected, abs=1e-4)


def test_score_command_line(tmp_path):
    from click.testing import CliRunner

    from paircurate.cli import cli

    os.makedirs(tmp_path / "in")
    write_webdataset(tmp_path / "in" / "a.tar", 5)
    result = CliRunner().invoke(cli, ["score", "--input", str(tmp_path / "in" / "*.tar"),
                                      "--output", str(tmp_path / "out"),
                                      "--set", f"clip.model_config={TINY}", "--set", "clip.pretrained=none",
                                      "--set", "clip.device=cpu", "--set", "output.report=false"])
    assert result.exit_code == 0, result.output
    ledger = pq.read_table(str(tmp_path / "out" / "metadata")).to_pylist()
    assert len(ledger) == 5 and all(r["status"] == "ok" and r["clip_score"] is not None for r in ledger)
    assert not os.path.exists(tmp_path / "out" / "shards")  # no filter: no new shards
    # Weights that cannot be had: one clear line, no traceback.
    result = CliRunner().invoke(cli, ["score", "--input", str(tmp_path / "in" / "*.tar"),
                                      "--output", str(tmp_path / "out2"),
                                      "--set", f"clip.cache_dir={tmp_path / 'empty'}"])
    assert result.exit_code != 0 and "cannot be downloaded" in result.output
    assert "Traceback" not in result.output


# --- image paths: exact (open_clip's transform) and fast (clip.preprocess=fast) ----------


def varied_images():
    """(bytes, caption) pairs the stage can meet: stored 256px, non-square, large, greyscale, PNG, palette."""
    out = []
    for i in range(24):
        size = [(256, 256), (256, 180), (700, 520), (1100, 900)][i % 4]
        image, caption = synthetic_image(900 + i, size=size)
        if i % 6 == 5:
            image = image.convert("L")
        out.append((encode(image), caption))
    image, caption = synthetic_image(950, size=(300, 400))
    out.append((encode(image, "PNG"), caption))
    out.append((encode(image.convert("P"), "PNG"), caption))  # palette: the fast path hands it to PIL
    out.append((encode(image.convert("RGBA"), "PNG"), caption))
    return out


def test_exact_path_matches_open_clip_on_varied_images():
    pairs = varied_images()
    records = []
    for i, (data, caption) in enumerate(pairs):
        record = new_record(f"{i:032x}", None, caption, "in", i, {})
        record["image"] = data
        records.append(record)
    expected = reference_scores(records)
    loaded = clip_model.load_clip(tiny_config(preprocess="exact"))
    scored = loaded.score([r["image"] for r in records], [r["caption"] for r in records])
    assert all(e is None for e in scored.errors)
    diffs = [abs(float(s) - expected[r["uid"]]) for s, r in zip(scored.scores, records)]
    assert max(diffs) < 1e-4


@pytest.mark.parametrize("per_image", [False, True])
def test_fast_path_scores_within_bound_of_exact(per_image, monkeypatch):
    """Both CPU variants: batched resize (small inputs such as tiny's) and per-image preparation."""
    if per_image:
        monkeypatch.setattr(clip_model, "PER_IMAGE_MIN_PIXELS", 64 * 64)
    pairs = varied_images()
    images, captions = [p[0] for p in pairs], [p[1] for p in pairs]
    exact = clip_model.load_clip(tiny_config(preprocess="exact"))
    fast = clip_model.load_clip(tiny_config(preprocess="fast"))
    assert exact.fast is None and fast.fast == clip_model.FastResize("shortest", (64, 64), "bicubic")
    assert fast.host_input == per_image and exact.host_input
    a = exact.score(images, captions)
    b = fast.score(images, captions)
    assert all(e is None for e in b.errors)
    diff = np.abs(a.scores - b.scores)
    assert diff.max() <= 0.01 and diff.mean() <= 0.003
    assert diff.max() > 0  # the fast path did run (it is not bit-identical on these images)
    # Images the fast path leaves to PIL (palette, alpha) score exactly as on the exact path.
    assert diff[-2:].max() < 1e-6


@pytest.mark.parametrize("per_image", [False, True])
def test_fast_path_in_the_stage_marks_undecodable_and_scores_the_rest(per_image, monkeypatch):
    if per_image:
        monkeypatch.setattr(clip_model, "PER_IMAGE_MIN_PIXELS", 64 * 64)
    records = make_records(9, seed=8)
    records[4]["image"] = b"\xff\xd8\xff not really a jpeg"
    exact = run_stage(records, tiny_config(batch_size=4))
    fast = run_stage(records, tiny_config(batch_size=4, preprocess="fast"))
    assert fast[records[4]["uid"]]["status"] == "decode_failed"
    for i, record in enumerate(records):
        if i != 4:
            assert abs(fast[record["uid"]]["clip_score"] - exact[record["uid"]]["clip_score"]) <= 0.01


@pytest.mark.parametrize("width,height", [(256, 256), (256, 180), (181, 333), (1100, 900), (225, 224),
                                          (3000, 97)])
def test_fast_geometry_is_torchvisions(width, height):
    from torchvision.transforms import CenterCrop, Resize

    plan = clip_model.FastResize("shortest", (64, 64), "bicubic")
    resized = Resize(64)(Image.new("RGB", (width, height)))
    assert plan.resized(width, height) == (resized.height, resized.width)
    # CenterCrop's box, read back from a gradient image.
    ramp = np.add.outer(np.arange(resized.height) * 1000, np.arange(resized.width)).astype(np.int32)
    cropped = np.asarray(CenterCrop(64)(Image.fromarray(ramp, "I")))
    top, left = plan.crop_box(resized.height, resized.width)
    assert (top, left) == divmod(int(cropped[0, 0]), 1000)


def test_fast_plan_only_for_transforms_it_reproduces():
    assert clip_model.fast_resize_of({"size": 224, "resize_mode": "shortest", "interpolation": "bicubic"})
    assert clip_model.fast_resize_of({"size": (224, 224), "resize_mode": "squash", "interpolation": "bilinear"})
    assert clip_model.fast_resize_of({"size": 224, "resize_mode": "longest"}) is None
    assert clip_model.fast_resize_of({"size": 224, "interpolation": "random"}) is None
    with pytest.raises(ClipModelError, match="clip.preprocess must be one of exact, fast"):
        clip_model.load_clip(tiny_config(preprocess="quick"))


def pil_pixels(data: bytes, draft=None) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        if draft:
            image.draft(image.mode, draft)
        return np.array(image.convert("RGB"))


def test_fast_decode_gives_pils_pixels_and_leaves_odd_modes_to_the_exact_path():
    plan = clip_model.FastResize("shortest", (64, 64), "bicubic")
    image, _ = synthetic_image(31, size=(256, 180))
    for data in (encode(image), encode(image.convert("L")), encode(image, "PNG"),
                 encode(synthetic_image(32, size=(256, 256))[0], quality=95)):
        pixels, original = clip_model.decode_pixels(data, clip_model.FastResize("shortest", (224, 224), "bicubic"))
        expected = pil_pixels(data)
        assert original == expected.shape[:2] and pixels.dtype == torch.uint8
        assert np.array_equal(pixels.permute(1, 2, 0).numpy(), expected)  # torchvision's libjpeg-turbo = PIL's
    # A JPEG at least four times the size the model needs: decoded at a reduced scale, as PIL drafts it.
    large = encode(synthetic_image(33, size=(1100, 900))[0])
    pixels, original = clip_model.decode_pixels(large, plan)
    assert original == (900, 1100) and tuple(pixels.shape) == (3, 225, 275)
    assert np.array_equal(pixels.permute(1, 2, 0).numpy(), pil_pixels(large, draft=(2 * 78, 2 * 64)))
    assert clip_model.decode_pixels(encode(image.convert("CMYK")), plan) is None
    assert clip_model.decode_pixels(encode(image.convert("P"), "PNG"), plan) is None


def test_fast_decode_falls_back_to_pil_without_torchvisions_decoder(monkeypatch):
    """torchvision 0.29 deprecates its image decoders: without one, PIL decodes the same pixels."""
    import torchvision.io

    data = encode(synthetic_image(36, size=(256, 180))[0])
    monkeypatch.delattr(torchvision.io, "decode_jpeg")
    pixels, original = clip_model.decode_pixels(data, clip_model.FastResize("shortest", (224, 224), "bicubic"))
    assert original == (180, 256) and np.array_equal(pixels.permute(1, 2, 0).numpy(), pil_pixels(data))


def test_jpeg_header_reads_what_pil_reads():
    image, _ = synthetic_image(35, size=(300, 170))
    exif = Image.Exif()
    exif[0x0112] = 6  # an orientation tag: an APP1 segment before the frame header
    cases = {"RGB": encode(image), "L": encode(image.convert("L")), "CMYK": encode(image.convert("CMYK"))}
    for name, kw in (("progressive", {"progressive": True}), ("exif", {"exif": exif.tobytes()}),
                     ("icc", {"icc_profile": b"\0" * 5000})):
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=80, **kw)
        cases[name] = buffer.getvalue()
    for name, data in cases.items():
        with Image.open(io.BytesIO(data)) as reference:
            components = {"L": 1, "RGB": 3, "CMYK": 4}[reference.mode]
            assert clip_model.jpeg_header(data) == (reference.height, reference.width, components, 8), name
    assert clip_model.jpeg_header(encode(image, "PNG")) is None
    assert clip_model.jpeg_header(b"\xff\xd8\xff not really a jpeg") is None
    assert clip_model.jpeg_header(cases["exif"][:40]) is None  # cut before the frame header


@pytest.mark.parametrize("width,height", [(256, 256), (255, 255), (300, 200), (1100, 900), (511, 2000),
                                          (512, 512), (4000, 300), (4000, 250)])
def test_drafts_agrees_with_pil(width, height):
    plan = clip_model.FastResize("shortest", (64, 64), "bicubic")
    with Image.open(io.BytesIO(encode(Image.new("RGB", (width, height))))) as image:
        target = plan.resized(width, height)
        image.draft("RGB", (clip_model.DRAFT_HEADROOM * target[1], clip_model.DRAFT_HEADROOM * target[0]))
        assert clip_model.drafts(width, height, target) == (image.size != (width, height))


def test_fast_path_on_cpu_names_what_is_wrong_with_a_truncated_jpeg():
    loaded = clip_model.load_clip(tiny_config(preprocess="fast"))
    data = encode(synthetic_image(34, size=(256, 256))[0])
    loaded.host_input = True  # the per-image path, which models of 96 px or more take
    out = loaded._buffer(2)
    out.zero_()
    assert loaded._prepare_fast_into(out, 0, data) is None and out[0].abs().max() > 0
    error = loaded._prepare_fast_into(out, 1, data[: len(data) // 2])  # torchvision refuses; PIL says why
    assert error and "truncated" in error


def test_one_image_batch_is_a_view_with_a_whole_images_batch_stride():
    hwc = torch.from_numpy(np.random.default_rng(6).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    decoded = hwc.permute(2, 0, 1)  # CHW, HWC in memory: as both decoders give it
    x = clip_model.one_image_batch(decoded)
    assert tuple(x.shape) == (1, 3, 40, 30) and x.stride() == (40 * 30 * 3, 1, 30 * 3, 3)
    assert x.data_ptr() == hwc.data_ptr() and torch.equal(x[0], decoded)  # no copy
    planar = decoded.contiguous()  # CHW in memory: copied once into HWC
    y = clip_model.one_image_batch(planar)
    assert y.stride() == (40 * 30 * 3, 1, 30 * 3, 3) and torch.equal(y[0], decoded)
    # The resize gives the pixels it gave through unsqueeze(0), the view it had before.
    plan = clip_model.FastResize("shortest", (16, 16), "bicubic")
    target = plan.resized(30, 40)
    old = torch.nn.functional.interpolate(decoded.unsqueeze(0).contiguous(memory_format=torch.channels_last),
                                          size=target, mode="bicubic", antialias=True)
    assert torch.equal(clip_model.resize_image(decoded, (40, 30), plan), clip_model.resize_batch(old, target, plan)[0])


def test_single_threaded_ops_keep_other_threads_counts():
    from concurrent.futures import ThreadPoolExecutor

    import img2dataset  # noqa: F401  (brings an OpenMP runtime of its own, mapped before torch's: simsimd's)

    before = torch.get_num_threads()
    torch.set_num_threads(3)  # more than one, whatever the machine
    try:
        with ThreadPoolExecutor(1, initializer=clip_model.single_threaded_ops) as pool:
            assert pool.submit(torch.get_num_threads).result() == 1
        assert torch.get_num_threads() == 3  # the model's threads (here: the main thread's) keep theirs
        with ThreadPoolExecutor(1) as pool:  # a thread without it has the process's count
            assert pool.submit(torch.get_num_threads).result() == 3
    finally:
        torch.set_num_threads(before)


def test_normalise_into_is_totensor_then_normalize():
    from torchvision.transforms import Normalize, ToTensor

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    scale = (1.0 / (255.0 * np.array(std, np.float32))).reshape(3, 1, 1)
    shift = (-np.array(mean, np.float32) / np.array(std, np.float32)).reshape(3, 1, 1)
    hwc = np.random.default_rng(5).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    expected = Normalize(mean, std)(ToTensor()(hwc)).numpy()
    for pixels in (torch.from_numpy(hwc).permute(2, 0, 1),  # HWC in memory, as the decoders give it
                   torch.from_numpy(hwc).permute(2, 0, 1).contiguous()[:, 2:, 3:]):  # a cropped view
        out = torch.full((*pixels.shape[1:], 3), float("nan")).permute(2, 0, 1)  # HWC in memory
        width = pixels.shape[2]
        clip_model.normalise_into(out, pixels, clip_model.affine_row(torch.from_numpy(scale), width),
                                  clip_model.affine_row(torch.from_numpy(shift), width))
        assert np.abs(out.numpy() - expected[:, -pixels.shape[1]:, -pixels.shape[2]:]).max() < 1e-5


def test_fast_path_batch_decode_scores_within_bound_and_falls_back():
    """The batched decode a GPU uses (run here on the CPU): same bound; what it cannot read goes to PIL."""
    pairs = varied_images()
    pairs.insert(3, (b"\xff\xd8\xff not really a jpeg", "broken"))  # fails its batch: that chunk goes to PIL
    images, captions = [p[0] for p in pairs], [p[1] for p in pairs]
    exact = clip_model.load_clip(tiny_config(preprocess="exact"))
    fast = clip_model.load_clip(tiny_config(preprocess="fast"))
    fast.device_decode = True
    a = exact.score(images, captions, chunk=8)
    b = fast.score(images, captions, chunk=8)
    assert a.errors[3] and b.errors[3] and np.isnan(b.scores[3])
    ok = [i for i in range(len(images)) if i != 3]
    assert all(b.errors[i] is None for i in ok)
    diff = np.abs(a.scores[ok] - b.scores[ok])
    assert diff.max() <= 0.01 and diff.mean() <= 0.003
    decoded = fast._decode_on_device(images, 8, 16)
    assert sorted(decoded) == [i for i in range(8, 16) if clip_model.is_jpeg(images[i])]


def test_staged_pairs_are_read_once_and_leave_slim(tmp_path, monkeypatch):
    """The pipeline's CLIP wiring (graph.add_clip) on staged records: one staging read per pair."""
    from paircurate.config import Config
    from paircurate.transforms import staging

    records = make_records(12, seed=3, caption_none=(4,), dead=(7,))
    writer = staging.SegmentWriter(str(tmp_path), 1000, 1 << 30)
    slim = [writer.stage(dict(r)) if r["status"] == "ok" else r for r in records]
    writer.close()
    carried = run_stage(records, tiny_config())
    reads = []
    real_read = staging.StagedReader.read
    monkeypatch.setattr(staging.StagedReader, "read", lambda self, ref: reads.append(ref) or real_read(self, ref))
    config = Config(clip=tiny_config())
    with tempfile.TemporaryDirectory() as folder:
        with test_pipeline() as p:
            (p | beam.Create(slim, reshuffle=False) | AddClip(config, str(tmp_path))
             | beam.Map(_dump, folder))
        out = {}
        for name in os.listdir(folder):
            with open(os.path.join(folder, name), "rb") as handle:
                record = pickle.load(handle)
                out[record["uid"]] = record
    assert len(out) == 12
    assert sorted(reads) == sorted(r["image_ref"] for r in slim if r.get("image_ref"))  # each blob once
    for record in records:
        got = out[record["uid"]]
        assert got["status"] == carried[record["uid"]]["status"]
        if carried[record["uid"]]["clip_score"] is None:
            assert got["clip_score"] is None
        else:
            assert abs(got["clip_score"] - carried[record["uid"]]["clip_score"]) < 1e-6
        if got.get("image_ref"):  # staged records leave slim: details and bytes stay in staging
            assert set(got) == set(staging.DECIDED_FIELDS)


class AddClip(beam.PTransform):
    """graph.add_clip as a transform (staging folder doubles as the output root)."""

    def __init__(self, config, staging_dir):
        super().__init__()
        self._config, self._staging = config, staging_dir

    def expand(self, records):
        from paircurate.graph import add_clip
        return add_clip(records, self._config, self._staging, self._staging)
