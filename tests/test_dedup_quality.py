"""A small run of benchmarks/near_duplicate_quality.py: the defaults keep their promises."""
from __future__ import annotations

import importlib.util
import os

import pytest

from paircurate.transforms.dedup import DedupConfig

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "near_duplicate_quality.py")


@pytest.fixture(scope="module")
def result():
    spec = importlib.util.spec_from_file_location("near_duplicate_quality", _PATH)
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    config = DedupConfig()
    data = quality.build(bases=120, flat=24, workers=1, seed=1234)
    # The information measure at smooth_below: where smooth images get the smooth hash (and
    # where the old rule left them to exact dedup only).
    return quality.evaluate(data, ks=[config.max_distance], min_information=config.smooth_below,
                            chosen_k=config.max_distance), config.max_distance


def test_recall_of_robust_transforms_at_default_k(result):
    res, k = result
    for name in ("jpeg_q50", "jpeg_q95", "resize_0.25", "resize_2", "bright_-15", "greyscale"):
        assert res["recall"][(k, name)] >= 0.95, name
    assert res["recall"][(k, "flip")] <= 0.02  # pHash cannot catch mirror images
    assert res["recall"][(k, "crop_10")] < res["recall"][(k, "crop_5")]


def test_information_measure_separates_flat_images_from_structured_ones(result):
    res, k = result
    assert res["low_share_flat"] >= 0.5
    assert res["low_share_structured"] <= 0.1
    assert res["fp_rule"][k] <= res["fp"][k]
    assert res["fp_struct"][k] <= 0.1
