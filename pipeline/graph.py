"""Assembling the pipeline graph from the stages in paircurate.transforms."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from paircurate.config import Config
from paircurate.schema import is_live
from paircurate.transforms.read import ReadInput, ReadTask, carried_columns, plan_reads
from paircurate.transforms.validate import ValidateAndFilter
from paircurate.transforms.write import WriteLedger, WriteManifest, WriteShards, write_json


@dataclass
class OutputLayout:
    """Where a run writes (DESIGN.md, Outputs)."""
    root: str

    @property
    def shards(self) -> str:
        return FileSystems.join(self.root, "shards")

    @property
    def metadata(self) -> str:
        return FileSystems.join(self.root, "metadata")

    @property
    def work(self) -> str:
        return FileSystems.join(self.root, "_work")

    @property
    def embeddings(self) -> str:
        return FileSystems.join(self.root, "embeddings")

    def file(self, name: str) -> str:
        return FileSystems.join(self.root, name)


@dataclass
class InputPlan:
    tasks: List[ReadTask]
    carried: pa.Schema
    has_captions: bool


def plan_input(input_pattern: str, config: Config) -> InputPlan:
    tasks = plan_reads(input_pattern, config.input)
    carried = carried_columns(tasks, config.input)
    has_captions = any(t.fmt != "txt" for t in tasks)
    return InputPlan(tasks, carried, has_captions)


def build(pipeline: beam.Pipeline, plan: InputPlan, config: Config, layout: OutputLayout) -> None:
    """read -> validate -> prefilter -> fetch -> decode/resize -> dedup -> clip -> write."""
    from paircurate.transforms.dedup import DeduplicateImages
    from paircurate.transforms.fetch import FetchImages
    from paircurate.transforms.resize import DecodeAndResize

    records = (pipeline
               | "Read" >> ReadInput(plan.tasks, config.input, plan.carried)
               | "Validate" >> ValidateAndFilter(config.filter, plan.has_captions)
               | "Fetch" >> FetchImages(config.fetch)
               | "Decode" >> DecodeAndResize(config.image))
    # Dedup frees the original bytes of every record it emits (disabled, it only does that).
    records = records | "Dedup" >> DeduplicateImages(config.dedup)
    if config.clip.enabled:
        from paircurate.transforms.clip import ScoreAndFilter
        records = records | "Clip" >> ScoreAndFilter(config.clip, layout.root)
    write_outputs(records, layout, config.output.samples_per_shard, plan.carried)


def write_outputs(records, layout: OutputLayout, samples_per_shard: int, carried: pa.Schema,
                  write_shards: bool = True) -> None:
    """Live records -> shards; every record -> the ledger; plus the manifest and counts work files.

    Without ``write_shards`` (rescoring without a filter: the input shards stay
    the data) no shards are written and the manifest is empty.
    """
    manifest_path = FileSystems.join(layout.work, "manifest.json")
    if write_shards:
        kept, rejected = records | "SplitKept" >> beam.Partition(lambda r, _: 0 if is_live(r) else 1, 2)
        written, manifest = kept | "Shards" >> WriteShards(layout.shards, samples_per_shard,
                                                           [f.name for f in carried])
        manifest | "Manifest" >> WriteManifest(manifest_path)
        records = (written, rejected) | "AllRecords" >> beam.Flatten()
    else:
        (records.pipeline
         | "NoShards" >> beam.Create([None])
         | "EmptyManifest" >> beam.Map(lambda _: write_json(manifest_path, [])))
    records | "Ledger" >> WriteLedger(layout.metadata, layout.work, carried)
