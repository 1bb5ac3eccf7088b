"""Runner selection and small Beam helpers shared by the pipeline and the tests."""
from __future__ import annotations

import logging
from typing import Optional, Sequence, Union

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

_LOG = logging.getLogger(__name__)

#: Names that mean "run locally in this Python process (or its workers)".
LOCAL_RUNNERS = ("DirectRunner", "FnApiRunner", "direct", "local")


def runner_for(name: str) -> Union[str, object]:
    """The runner to hand to beam.Pipeline.

    Beam 2.77's DirectRunner first tries the Prism runner, whose binary it
    downloads from GitHub; offline that stalls and fails before it falls back
    to the Python FnApiRunner.  paircurate asks for the FnApiRunner directly,
    which honours --direct_running_mode and --direct_num_workers.
    """
    if name in LOCAL_RUNNERS:
        from apache_beam.runners.portability.fn_api_runner import fn_runner
        return fn_runner.FnApiRunner()
    return name


def make_pipeline(runner: str = "DirectRunner",
                  options: Optional[Union[PipelineOptions, Sequence[str]]] = None) -> beam.Pipeline:
    """A pipeline on the named runner (local runs use the FnApiRunner, see runner_for)."""
    if options is None or not isinstance(options, PipelineOptions):
        options = PipelineOptions(list(options or []))
    return beam.Pipeline(runner=runner_for(runner), options=options)


def local_pipeline() -> beam.Pipeline:
    """An in-process local pipeline for tests (use as a context manager)."""
    return make_pipeline("DirectRunner")


#: The name the tests use; marked so that pytest does not collect it as a test.
test_pipeline = local_pipeline
test_pipeline.__test__ = False  # type: ignore[attr-defined]
