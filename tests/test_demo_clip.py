"""The demo's CLIP: the shipped float16 checkpoint loads and tells matched pairs from mismatched ones;
the training script trains; the demo's captions translate."""
from __future__ import annotations

import importlib.util
import os
import random

import numpy as np
import pytest
from safetensors import safe_open

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from paircurate.demo import (  # noqa: E402
    DEMO_MIN_SCORE,
    DEMO_MODEL_CONFIG,
    demo_checkpoint,
    encode,
    synthetic_image,
    translated_caption,
)
from paircurate.transforms.clip_model import (  # noqa: E402
    ClipConfig,  # noqa: E402
    LoadedClip,
    resolve_model,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_training_script():
    spec = importlib.util.spec_from_file_location("train_demo_clip",
                                                  os.path.join(ROOT, "scripts", "train_demo_clip.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demo_clip(checkpoint):
    return LoadedClip(ClipConfig(model_config=DEMO_MODEL_CONFIG, pretrained=checkpoint, device="cpu",
                                 preprocess_threads=2))


def test_shipped_checkpoint_is_float16_and_small():
    path = demo_checkpoint()
    assert path is not None and path.endswith(".safetensors")
    assert os.path.getsize(path) < 5_000_000
    with safe_open(path, framework="pt") as handle:
        dtypes = {str(handle.get_slice(name).get_dtype()) for name in handle.keys()}
    assert dtypes == {"F16"}


def test_shipped_checkpoint_scores_matched_pairs_above_mismatched():
    resolved = resolve_model(ClipConfig(model_config=DEMO_MODEL_CONFIG, pretrained=demo_checkpoint()))
    assert resolved.source == "file"  # the ordinary local-checkpoint path, nothing special
    clip = demo_clip(demo_checkpoint())
    try:
        # Seeds far from those the model was trained on (scripts/train_demo_clip.py).
        pictures = [synthetic_image(70_000_000 + i) for i in range(60)]
        images = [encode(image) for image, _ in pictures]
        captions = [caption for _, caption in pictures]
        others = captions[1:] + captions[:1]
        pairs = [(i, c, o) for i, (c, o) in enumerate(zip(captions, others)) if c != o]
        matched = clip.score([images[i] for i, _, _ in pairs], [c for _, c, _ in pairs]).scores
        mismatched = clip.score([images[i] for i, _, _ in pairs], [o for _, _, o in pairs]).scores
    finally:
        clip.close()
    assert matched.mean() > mismatched.mean() + 0.3
    assert np.mean(matched > mismatched) >= 0.95
    assert np.mean(matched >= DEMO_MIN_SCORE) >= 0.9 and np.mean(mismatched >= DEMO_MIN_SCORE) <= 0.1


def test_training_script_lowers_the_loss_and_saves_a_loadable_float16_checkpoint(tmp_path):
    train = load_training_script()
    model, tokenizer, mean, std = train.create_model(seed=1)
    pixels, captions = train.make_pool(range(5_000_000, 5_000_096), 64, workers=1)
    assert pixels.shape == (96, 2, 64, 64, 3) and len(captions) == 96
    losses = train.train(model, tokenizer, mean, std, pixels, captions, steps=40, batch=32, lr=2e-3, seed=1,
                         log_every=0)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3
    path = str(tmp_path / "trained.safetensors")
    train.save_float16(model, path)
    clip = demo_clip(path)
    try:
        image, caption = synthetic_image(5_000_000)
        scores = clip.score([encode(image)], [caption]).scores
    finally:
        clip.close()
    assert np.isfinite(scores).all()


def test_distinct_caption_batch_never_repeats_a_caption():
    train = load_training_script()
    captions = ["a", "b", "a", "c", "b", "d"] * 5
    chosen = train.distinct_caption_batch(captions, 3, random.Random(0))
    assert len(chosen) == 3 and len({captions[i] for i in chosen}) == 3
    assert len(train.distinct_caption_batch(captions, 10, random.Random(0))) == 4  # only four differ


def test_threshold_is_the_midpoint_of_the_gap_or_the_fewest_errors():
    train = load_training_script()
    assert train.choose_threshold(np.array([0.8, 0.9]), np.array([0.1, 0.4])) == pytest.approx(0.6)
    matched, mismatched = np.array([0.3, 0.8, 0.9]), np.array([0.1, 0.4, 0.2])
    cut = train.choose_threshold(matched, mismatched)
    # One pair on the wrong side (0.3 matched or 0.4 mismatched) is the fewest possible.
    assert np.sum(matched < cut) + np.sum(mismatched >= cut) == 1
    assert cut not in (0.2, 0.3, 0.4, 0.8)  # between two scores, not on one


def test_mismatched_captions_always_differ():
    train = load_training_script()
    captions = ["x", "y", "x", "z"]
    others = train.mismatched_captions(captions, random.Random(3))
    assert all(a != b for a, b in zip(captions, others))


@pytest.mark.parametrize("language, expected", [
    ("de", "ein Kreuz in Weiß auf einem Hintergrund in Türkis"),
    ("fr", "une croix blanche sur un fond turquoise"),
    ("es", "una cruz blanca sobre un fondo turquesa"),
])
def test_translated_caption(language, expected):
    assert translated_caption("a white cross on a teal background", language) == expected


def test_translated_caption_agrees_with_plural_shapes():
    assert translated_caption("a green stripes on a blue background", "fr") == "des rayures vertes sur un fond bleu"


def test_translated_caption_rejects_other_text():
    with pytest.raises(ValueError):
        translated_caption("a cat on a mat", "de")
