"""Zero-shot tags and trained heads on the CLIP embeddings: arithmetic against open_clip, heads
trained on the fly, config errors, the tag filter, and whole runs whose ledgers and samples carry them."""
from __future__ import annotations

import glob
import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
from PIL import Image  # noqa: E402

from paircurate.config import ConfigError, load_config  # noqa: E402
from paircurate.demo import encode, synthetic_image  # noqa: E402
from paircurate.imageserver import Route  # noqa: E402
from paircurate.transforms import clip_model, clip_tags  # noqa: E402
from paircurate.transforms.clip import ScoreAndFilter  # noqa: E402
from paircurate.transforms.clip_model import DEFAULT_TAGS  # noqa: E402
from paircurate.transforms.schema import STATUS_ORDER, Status, carried_name, ledger_row, ledger_schema  # noqa: E402
from test_clip import TINY, make_records, run_stage, tiny_config, write_webdataset  # noqa: E402

TAGS = {"dog": {"positive": ["a photo of a dog", "a picture of a puppy"],
                "negative": ["a photo of a cat", "a photo of a car", "a landscape"]},
        "text": {"positive": ["an image with text"], "negative": ["an image without text"]}}


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


# --- arithmetic -------------------------------------------------------------


def test_tag_probability_is_the_positive_prompts_share_of_the_softmax():
    image = unit(torch.tensor([[1.0, 0.0], [0.6, 0.8]]))
    prompts = unit(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))  # tag a: P={0}, N={1, 2}
    tags = [clip_tags.TagSpec("a", ("p",), ("n1", "n2"))]
    got = clip_tags.tag_probabilities(image, prompts, 10.0, tags).numpy()
    for i, (x, y) in enumerate([(1.0, 0.0), (0.6, 0.8)]):
        logits = 10.0 * np.array([x, y, -x])
        expected = np.exp(logits[0]) / np.exp(logits).sum()
        assert got[i, 0] == pytest.approx(expected, abs=1e-6)


def open_clip_tags(images, tags):
    """open_clip directly: preprocess_val + encode_image, encode_text of the prompts, logit_scale."""
    open_clip.add_model_config(clip_model.find_model_config(TINY))
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY, pretrained=None)
    model.eval()
    tokenizer = open_clip.get_tokenizer(TINY)
    with torch.no_grad():
        x = unit(model.encode_image(torch.stack([preprocess(Image.open(io.BytesIO(b))) for b in images])))
        out = {}
        for name, spec in tags.items():
            prompts = spec["positive"] + spec["negative"]
            t = unit(model.encode_text(tokenizer(prompts)))
            probs = (model.logit_scale.exp() * x @ t.T).softmax(dim=-1)
            out["tag_" + name] = probs[:, :len(spec["positive"])].sum(-1).numpy()
    return x.numpy(), out


def test_tags_match_open_clip_directly():
    records = make_records(12, seed=4)
    images = [r["image"] for r in records]
    embeddings, expected = open_clip_tags(images, TAGS)
    loaded = clip_model.load_clip(tiny_config(tags=TAGS, preprocess="exact"))
    scored = loaded.score(images, [r["caption"] for r in records])
    assert list(scored.columns) == ["tag_dog", "tag_text"]
    for column, values in expected.items():
        assert np.abs(scored.columns[column] - values).max() < 1e-4
        assert values.std() > 1e-3  # values differ from image to image: a mix-up could not hide
    assert scored.columns["tag_dog"].dtype == np.float32
    # A probability, and only the image changes it (the prompts were encoded once).
    assert ((scored.columns["tag_dog"] > 0) & (scored.columns["tag_dog"] < 1)).all()


def test_default_tags_are_computed_without_asking():
    loaded = clip_model.load_clip(tiny_config())
    records = make_records(3)
    scored = loaded.score([r["image"] for r in records], [r["caption"] for r in records])
    assert sorted(scored.columns) == ["tag_unsafe", "tag_watermark"]
    assert clip_model.load_clip(tiny_config(tags={})).score([records[0]["image"]], ["a caption"]).columns is None


# --- heads ------------------------------------------------------------------


def train_head(module, dim=64, steps=300, seed=0):
    """Fit ``module`` to a known linear function of random normalised embeddings; return (x, w, b)."""
    gen = torch.Generator().manual_seed(seed)
    x = unit(torch.randn(512, dim, generator=gen))
    w, b = torch.randn(dim, generator=gen), 0.5
    target = x @ w + b
    optimiser = torch.optim.Adam(module.parameters(), lr=0.02)
    for _ in range(steps):
        optimiser.zero_grad()
        loss = ((module(x).squeeze(-1) - target) ** 2).mean()
        loss.backward()
        optimiser.step()
    assert loss.item() < 0.05 * target.var().item()  # it did learn the function
    return x, w, b


def save(module, path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    else:
        torch.save(module.state_dict(), str(path))
    return str(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_head_trained_on_the_fly_loads_and_matches_torch(tmp_path, suffix, kind):
    torch.manual_seed(1)
    module = (torch.nn.Sequential(torch.nn.Linear(64, 1)) if kind == "linear" else
              torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)))
    x, _, _ = train_head(module)
    path = save(module, tmp_path / f"head{suffix}")
    head = clip_tags.build_head(clip_tags.HeadSpec("h", path), 64)
    with torch.no_grad():
        assert torch.abs(head(x) - module(x)).max().item() < 1e-4
    sigmoid = clip_tags.build_head(clip_tags.HeadSpec("h", path, activation="sigmoid"), 64)
    with torch.no_grad():
        assert torch.abs(sigmoid(x) - torch.sigmoid(module(x))).max().item() < 1e-4
    if kind == "linear":  # a bare nn.Linear's state dict: keys "weight" and "bias"
        bare = clip_tags.build_head(clip_tags.HeadSpec("h", save(module[0], tmp_path / f"bare{suffix}")), 64)
        with torch.no_grad():
            assert torch.abs(bare(x) - module(x)).max().item() < 1e-4


def test_laion_style_mlp_without_hidden_activations_keeps_layer_order(tmp_path):
    # LAION's improved aesthetic predictor: Linear, Dropout, Linear, ... with no ReLU, layers.0 to
    # layers.12 (so "layers.10" must come after "layers.4", not after "layers.1").
    sizes = [64, 32, 16, 8, 4, 4, 4, 1]
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Dropout(0.1)]
    module = torch.nn.Sequential(*layers[:-1]).eval()
    path = save(module, tmp_path / "aesthetic.safetensors")
    assert "12.weight" in module.state_dict()
    head = clip_tags.build_head(clip_tags.HeadSpec("aesthetic", path, hidden="none"), 64)
    x = unit(torch.randn(20, 64))
    with torch.no_grad():
        assert torch.abs(head(x) - module(x)).max().item() < 1e-5


def test_head_in_the_scoring_batch_matches_torch_on_the_image_embeddings(tmp_path):
    torch.manual_seed(2)
    module = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    path = save(module, tmp_path / "h.pt")
    records = make_records(6, seed=9)
    images = [r["image"] for r in records]
    embeddings, _ = open_clip_tags(images, {})
    loaded = clip_model.load_clip(tiny_config(tags={}, heads={"quality": {"path": path}}, preprocess="exact"))
    scored = loaded.score(images, [r["caption"] for r in records])
    with torch.no_grad():
        expected = module(torch.from_numpy(embeddings)).squeeze(-1).numpy()
    assert list(scored.columns) == ["head_quality"]
    assert np.abs(scored.columns["head_quality"] - expected).max() < 1e-4


def test_head_of_the_wrong_size_is_a_clear_error_before_anything_runs(tmp_path):
    path = save(torch.nn.Linear(768, 1), tmp_path / "vit-l.safetensors")
    with pytest.raises(ConfigError) as info:
        ScoreAndFilter(tiny_config(heads={"aesthetic": {"path": path}}), str(tmp_path))
    message = str(info.value)
    assert path in message and "768" in message and "64" in message and "clip.heads.aesthetic" in message
    with pytest.raises(ConfigError, match="768"):  # and again when a worker loads the model
        clip_model.load_clip(tiny_config(heads={"aesthetic": {"path": path}}))


def test_head_files_that_are_not_a_chain_of_linear_layers(tmp_path):
    from safetensors.torch import save_file

    cases = {
        "conv.safetensors": ({"conv.weight": torch.zeros(4, 3, 3, 3)}, "2-D weight"),
        "two.safetensors": ({"0.weight": torch.zeros(2, 64)}, "gives 2 values"),
        "gap.safetensors": ({"0.weight": torch.zeros(8, 64), "1.weight": torch.zeros(1, 4)}, "takes 4 inputs"),
        "bn.safetensors": ({"0.weight": torch.zeros(1, 64), "0.running_mean": torch.zeros(1)}, "running_mean"),
    }
    for name, (state, expected) in cases.items():
        save_file(state, str(tmp_path / name))
        with pytest.raises(ConfigError, match=expected):
            clip_tags.build_head(clip_tags.HeadSpec("h", str(tmp_path / name)), 64)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="garbage.pt"):
        clip_tags.build_head(clip_tags.HeadSpec("h", str(tmp_path / "garbage.pt")), 64)
    torch.save(torch.nn.Linear(64, 1), str(tmp_path / "module.pt"))  # a pickled module, not a state dict
    with pytest.raises(ConfigError, match="state_dict"):
        clip_tags.build_head(clip_tags.HeadSpec("h", str(tmp_path / "module.pt")), 64)
    with pytest.raises(ConfigError, match="cannot be read"):
        clip_tags.build_head(clip_tags.HeadSpec("h", str(tmp_path / "missing.safetensors")), 64)


# --- configuration ----------------------------------------------------------


def test_default_tags_and_columns():
    config = load_config()
    assert config.clip.tags == DEFAULT_TAGS and config.clip.tag_max == {} and config.clip.heads == {}
    assert clip_tags.ledger_columns(config.clip) == ["tag_unsafe", "tag_watermark"]
    config = load_config(overrides=["clip.tags={}", "clip.heads={aesthetic: /x/a.safetensors}"])
    assert clip_tags.ledger_columns(config.clip) == ["head_aesthetic"]
    assert clip_tags.ledger_columns(load_config(overrides=["clip.enabled=false"]).clip) == []
    config = load_config(overrides=["clip.tag_max={unsafe: 0.5}"])
    assert config.clip.tag_max == {"unsafe": 0.5}


@pytest.mark.parametrize("override,expected", [
    ("clip.tags={Unsafe: {positive: [a], negative: [b]}}", "name 'Unsafe'"),
    ("clip.tags={bad-name: {positive: [a], negative: [b]}}", "name 'bad-name'"),
    ("clip.tags={x: {positive: [a]}}", "clip.tags.x: expected a mapping with exactly the keys"),
    ("clip.tags={x: {positive: [], negative: [b]}}", "clip.tags.x.positive"),
    ("clip.tags={x: {positive: [a], negative: ['']}}", "clip.tags.x.negative"),
    ("clip.tag_max={nsfw: 0.5}", "clip.tag_max names tag 'nsfw', which clip.tags does not define"),
    ("clip.tag_max={unsafe: 1.5}", "clip.tag_max.unsafe=1.5"),
    ("clip.tag_max={unsafe: yes}", "clip.tag_max.unsafe=True"),
    ("clip.heads={a: {path: x.pt, activation: tanh}}", "clip.heads.a.activation='tanh'"),
    ("clip.heads={a: {path: x.pt, hidden: gelu}}", "clip.heads.a.hidden='gelu'"),
    ("clip.heads={a: {path: x.pt, size: 3}}", "unknown key 'size'"),
    ("clip.heads={a: {activation: none}}", "clip.heads.a: expected"),
    ("clip.heads={A: x.pt}", "name 'A'"),
])
def test_config_errors_name_the_problem(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert expected in str(info.value)


def test_tag_max_without_tags_is_an_error():
    with pytest.raises(ConfigError, match="defined: none"):
        load_config(overrides=["clip.tags={}", "clip.tag_max={unsafe: 0.5}"])


def test_ledger_schema_puts_the_columns_after_clip_score_and_reserves_their_prefixes():
    schema = ledger_schema(pa.schema([pa.field("n", pa.int64())]), ["tag_a", "head_b"])
    names = schema.names
    at = names.index("clip_score")
    assert names[at + 1:at + 3] == ["tag_a", "head_b"] and names[-1] == "n"
    assert schema.field("tag_a").type == pa.float32()
    row = ledger_row({"uid": "u", "status": "ok", "clip_columns": {"tag_a": 0.25}}, [], ["tag_a", "head_b"])
    assert row["tag_a"] == 0.25 and row["head_b"] is None
    assert ledger_row({"uid": "u", "status": "fetch_failed"}, [], ["tag_a"])["tag_a"] is None
    # An input column named like one would be carried under another name, not clash.
    assert carried_name("tag_unsafe") == "input_tag_unsafe" and carried_name("head_x") == "input_head_x"
    assert carried_name("tags") == "tags"
    assert STATUS_ORDER.index("tag_filtered") == STATUS_ORDER.index("clip_filtered") + 1


# --- the tag filter ---------------------------------------------------------


def test_apply_tag_max():
    record = make_records(1)[0]
    record["clip_columns"] = {"tag_unsafe": 0.75, "tag_watermark": 0.2}
    assert clip_tags.apply_tag_max(dict(record), {"unsafe": 0.75})["status"] == "ok"  # at the limit: kept
    out = clip_tags.apply_tag_max(dict(record), {"watermark": 0.5, "unsafe": 0.5})
    assert out["status"] == Status.TAG_FILTERED.value and out["error"] == "tag_unsafe: 0.75 > 0.5"
    assert out["image"] is None
    unscored = make_records(1)[0]
    assert clip_tags.apply_tag_max(unscored, {"unsafe": 0.0})["status"] == "ok"
    dead = dict(record, status="clip_filtered", error="clip_score: 0.1 < 0.2")
    assert clip_tags.apply_tag_max(dead, {"unsafe": 0.1})["status"] == "clip_filtered"


def gap_limit(values):
    """A limit halfway across the widest gap of the middle half (batching moves values by ~1e-7)."""
    ordered = sorted(values)
    quarter = len(ordered) // 4
    i = max(range(quarter, len(ordered) - quarter), key=lambda j: ordered[j] - ordered[j - 1])
    assert ordered[i] - ordered[i - 1] > 1e-4
    return (ordered[i - 1] + ordered[i]) / 2


def test_stage_marks_tag_filtered_after_the_score_filter():
    records = make_records(24, seed=6, caption_none=(3,), dead=(5,))
    unfiltered = run_stage(records, tiny_config(tags=TAGS, batch_size=5))
    scored = {uid: r for uid, r in unfiltered.items() if r["clip_score"] is not None}
    assert len(scored) == 22
    assert all(set(r["clip_columns"]) == {"tag_dog", "tag_text"} for r in scored.values())
    assert all(r.get("clip_columns") is None for uid, r in unfiltered.items() if uid not in scored)
    limit = gap_limit([r["clip_columns"]["tag_dog"] for r in scored.values()])
    min_score = gap_limit([r["clip_score"] for r in scored.values()])
    out = run_stage(records, tiny_config(tags=TAGS, batch_size=7, tag_max={"dog": limit}, min_score=min_score))
    counts = {}
    for uid, record in out.items():
        counts[record["status"]] = counts.get(record["status"], 0) + 1
        if uid not in scored:
            assert record["status"] == unfiltered[uid]["status"]
            continue
        before = scored[uid]
        if before["clip_score"] < min_score:  # the score filter comes first in the funnel
            assert record["status"] == "clip_filtered"
        elif before["clip_columns"]["tag_dog"] > limit:
            assert record["status"] == "tag_filtered"
            assert record["error"].startswith("tag_dog: ") and f"> {np.float32(limit)}" in record["error"]
        else:
            assert record["status"] == "ok"
    assert counts["tag_filtered"] > 0 and counts["clip_filtered"] > 0 and counts["ok"] > 0
    # Some rows are both below the score threshold and above the tag limit: clip_filtered wins.
    assert any(scored[u]["clip_score"] < min_score and scored[u]["clip_columns"]["tag_dog"] > limit
               for u in scored)


# --- whole runs ---------------------------------------------------------------


def test_run_writes_tag_and_head_columns_to_ledger_and_samples(tmp_path, image_server, parquet_input):
    from paircurate.run import run_pipeline

    torch.manual_seed(3)
    head_path = save(torch.nn.Sequential(torch.nn.Linear(64, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1)),
                     tmp_path / "quality.safetensors")
    rows = []
    for i in range(16):
        image, caption = synthetic_image(8100 + i)
        image_server.routes[f"/img/{i}.jpg"] = Route(encode(image))
        rows.append({"url": image_server.url(f"/img/{i}.jpg"), "caption": caption, "n": i, "tag_unsafe": "input"})
    rows.append({"url": image_server.url("/missing.jpg"), "caption": "a missing picture", "n": 99,
                 "tag_unsafe": "input"})
    path = parquet_input(rows)
    config = load_config(overrides=[
        f"fetch.allowed_hosts=[{image_server.host_port}]", "fetch.retries=0", "output.report=false",
        f"clip.model_config={TINY}", "clip.pretrained=none", "clip.device=cpu", "clip.batch_size=8",
        "clip.tag_max={watermark: 0.6}", "clip.heads={quality: {path: %s, activation: sigmoid}}" % head_path])
    out = str(tmp_path / "out")
    stats = run_pipeline(path, out, config)
    files = sorted(glob.glob(os.path.join(out, "metadata", "*.parquet")))
    schema = pq.read_schema(files[0])
    at = schema.names.index("clip_score")
    assert schema.names[at + 1:at + 4] == ["tag_unsafe", "tag_watermark", "head_quality"]
    assert schema.field("head_quality").type == pa.float32() and "input_tag_unsafe" in schema.names
    ledger = [r for f in files for r in pq.read_table(f).to_pylist()]
    assert len(ledger) == len(rows)
    by_n = {r["n"]: r for r in ledger}
    assert by_n[99]["status"] == "fetch_failed" and by_n[99]["tag_unsafe"] is None
    assert by_n[99]["head_quality"] is None and by_n[99]["input_tag_unsafe"] == "input"
    scored = [r for r in ledger if r["clip_score"] is not None]
    assert len(scored) == 16
    for row in scored:
        assert 0 < row["tag_unsafe"] < 1 and 0 < row["head_quality"] < 1
        assert row["status"] == ("tag_filtered" if row["tag_watermark"] > 0.6 else "ok"), row
    # The limit cuts through these images' values (0.52 to 0.66 with these random weights).
    assert {r["status"] for r in scored} == {"ok", "tag_filtered"}
    assert stats["by_status"]["tag_filtered"] == sum(r["status"] == "tag_filtered" for r in ledger)
    assert stats["clip_model"]["tag_max"] == {"watermark": 0.6}
    kept = {r["uid"]: r for r in ledger if r["status"] == "ok"}
    samples = {}
    for shard in glob.glob(os.path.join(out, "shards", "*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    samples[member.name[:-5]] = json.load(tar.extractfile(member))
    assert set(samples) == set(kept)
    for uid, meta in samples.items():
        for column in ("tag_unsafe", "tag_watermark", "head_quality"):
            assert meta[column] == pytest.approx(kept[uid][column], abs=1e-6)


def test_score_command_applies_tag_max(tmp_path):
    from paircurate.score import run_score

    os.makedirs(tmp_path / "in")
    write_webdataset(tmp_path / "in" / "00000.tar", 12)
    base = [f"clip.model_config={TINY}", "clip.pretrained=none", "clip.device=cpu", "clip.batch_size=4",
            "output.report=false"]
    run_score(str(tmp_path / "in" / "*.tar"), str(tmp_path / "all"), load_config(None, base))
    ledger = pq.read_table(str(tmp_path / "all" / "metadata")).to_pylist()
    assert all(r["status"] == "ok" and r["tag_watermark"] is not None for r in ledger)
    limit = gap_limit([r["tag_watermark"] for r in ledger])
    stats = run_score(str(tmp_path / "in" / "*.tar"), str(tmp_path / "tagged"),
                      load_config(None, base + [f"clip.tag_max={{watermark: {limit}}}"]))
    tagged = pq.read_table(str(tmp_path / "tagged" / "metadata")).to_pylist()
    dropped = {r["uid"] for r in tagged if r["status"] == "tag_filtered"}
    assert dropped == {r["uid"] for r in ledger if r["tag_watermark"] > limit} and dropped
    with tarfile.open(tmp_path / "tagged" / "shards" / "00000.tar") as tar:
        keys = {n.split(".")[0] for n in tar.getnames()}
    assert keys == {r["uid"] for r in tagged if r["status"] == "ok"}
    assert stats["clip_threshold"] is None  # no score filter: no score threshold


def test_head_mismatch_on_the_command_line_is_one_line(tmp_path):
    from click.testing import CliRunner

    from paircurate.cli import cli

    os.makedirs(tmp_path / "in")
    write_webdataset(tmp_path / "in" / "a.tar", 2)
    path = save(torch.nn.Linear(768, 1), tmp_path / "vit-l.pt")
    result = CliRunner().invoke(cli, ["score", "--input", str(tmp_path / "in" / "*.tar"),
                                      "--output", str(tmp_path / "out"), "--set", f"clip.model_config={TINY}",
                                      "--set", "clip.pretrained=none", "--set", "clip.device=cpu",
                                      "--set", "clip.heads={aesthetic: %s}" % path])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "size 768" in result.output and "size 64" in result.output and path in result.output
