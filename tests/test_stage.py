"""The per-record stage contract (transforms/stage.py), on the worked example of README's
"Adding a stage": a minimum-caption-words filter, written exactly as a new stage module would be."""
from dataclasses import dataclass

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.util import assert_that, equal_to

from paircurate.transforms.beam_util import WORK_TIME_METRIC, local_pipeline
from paircurate.transforms.schema import Status, new_record
from paircurate.transforms.settings import NON_NEGATIVE, ConfigError, check_values, setting
from paircurate.transforms.stage import RecordStage

# --- the example stage module (README, Development, Adding a stage) ---------------------------


@dataclass
class WordsConfig:
    # Captions with fewer words than this are caption_filtered (0: off).
    min_caption_words: int = setting(0, NON_NEGATIVE)


class MinCaptionWords(RecordStage):
    """Captions of fewer than ``min_caption_words`` words -> caption_filtered."""

    namespace = "words"

    def __init__(self, config: WordsConfig):
        self._config = config

    def check(self, record):
        words = len((record.get("caption") or "").split())
        if words < self._config.min_caption_words:
            return Status.CAPTION_FILTERED, f"too_few_words: {words} < {self._config.min_caption_words}"
        return None

# --- end of the example -----------------------------------------------------------------------


def rec(i, caption):
    return new_record(f"uid{i}", f"http://h/{i}.jpg", caption, "in.parquet", i, {})


def test_check_marks_a_failing_record_and_passes_the_others():
    stage = MinCaptionWords(WordsConfig(min_caption_words=3))
    assert stage.apply(rec(0, "a red bicycle"))["status"] == "ok"
    short = stage.apply(rec(1, "red bicycle"))
    assert (short["status"], short["error"]) == ("caption_filtered", "too_few_words: 2 < 3")


def test_records_already_decided_are_not_checked():
    decided = rec(2, "x")
    decided.update(status="fetch_failed", error="http_404")
    assert MinCaptionWords(WordsConfig(min_caption_words=3)).apply(decided)["error"] == "http_404"


def test_in_a_pipeline_the_base_counts_each_status_and_times_the_work():
    records = [rec(0, "a red bicycle"), rec(1, "red bicycle"), rec(2, "one"), rec(3, "a b c d")]
    records[3].update(status="invalid_input", error="url: missing")
    pipeline = local_pipeline()
    out = (pipeline | beam.Create(records)
           | beam.ParDo(MinCaptionWords(WordsConfig(min_caption_words=3))))
    assert_that(out | beam.Map(lambda r: (r["uid"], r["status"])),
                equal_to([("uid0", "ok"), ("uid1", "caption_filtered"), ("uid2", "caption_filtered"),
                          ("uid3", "invalid_input")]))
    result = pipeline.run()
    result.wait_until_finish()
    metrics = result.metrics().query(MetricsFilter().with_namespace("words"))
    counters = {c.key.metric.name: c.committed for c in metrics["counters"]}
    assert counters == {"ok": 1, "caption_filtered": 2}  # the decided record is not counted
    (work,) = [d for d in metrics["distributions"] if d.key.metric.name == WORK_TIME_METRIC]
    assert work.committed.count == 3


def test_the_example_config_section_declares_its_range():
    check_values("words", WordsConfig(min_caption_words=2))
    with pytest.raises(ConfigError, match=r"words.min_caption_words=-1 is out of range: must be at least 0"):
        check_values("words", WordsConfig(min_caption_words=-1))
