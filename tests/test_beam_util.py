"""BatchedFn: a bundle's elements in batches, each element in exactly one batch."""
from __future__ import annotations

import apache_beam as beam
from apache_beam.testing.util import assert_that, equal_to

from paircurate.transforms.beam_util import BatchedFn, test_pipeline


class _Batches(BatchedFn):
    def emit_batch(self, batch):
        yield len(batch), sorted(batch)


def test_batched_fn_hands_every_element_once_in_batches_of_at_most_its_size():
    def check(outputs):
        sizes = [size for size, _ in outputs]
        elements = sorted(e for _, batch in outputs for e in batch)
        assert elements == list(range(23))
        assert max(sizes) <= 5 and all(size > 0 for size in sizes)
        assert len(outputs) >= 5  # 23 elements cannot fit in fewer batches of 5

    with test_pipeline() as p:
        outputs = p | beam.Create(range(23)) | beam.ParDo(_Batches(5))
        assert_that(outputs, check)


def test_batched_fn_emits_nothing_for_an_empty_input():
    with test_pipeline() as p:
        outputs = p | beam.Create([]) | beam.ParDo(_Batches(5))
        assert_that(outputs, equal_to([]))
