"""Assembling the pipeline graph from the stages in paircurate.transforms."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from paircurate.config import Config
from paircurate.transforms.files import write_json
from paircurate.transforms.language import check_input as check_language_input
from paircurate.transforms.read import ReadInput, ReadTask, carried_columns, plan_reads
from paircurate.transforms.schema import is_live
from paircurate.transforms.validate import ValidateAndFilter
from paircurate.transforms.write import WriteLedger, WriteManifest, WriteShards


@dataclass
class OutputLayout:
    """Where a run writes (README, The output folder)."""
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
    def progress(self) -> str:
        """Workers' progress files (paircurate.progress); deleted with _work when the run is finished."""
        return FileSystems.join(self.work, "progress")

    @property
    def embeddings(self) -> str:
        return FileSystems.join(self.root, "embeddings")

    def staging(self, config: Config) -> str:
        """Staged image bytes (transforms/staging.py), in a folder named by the settings that shape them."""
        from paircurate.transforms.staging import staging_dir
        return staging_dir(self.root, config)

    def file(self, name: str) -> str:
        return FileSystems.join(self.root, name)

    def file_in_work(self, name: str) -> str:
        return FileSystems.join(self.work, name)


#: The near-duplicate candidates verification rejected, nearest first (finalise moves them to stats.json).
REJECTED_FILE = "dedup_rejected.json"
#: The same for semantic dedup: candidate pairs below dedup.semantic.min_cosine, highest cosine first.
SEMANTIC_REJECTED_FILE = "semantic_rejected.json"


@dataclass
class InputPlan:
    tasks: List[ReadTask]
    carried: pa.Schema
    has_captions: bool


def plan_input(input_pattern: str, config: Config) -> InputPlan:
    tasks = plan_reads(input_pattern, config.input)
    carried = carried_columns(tasks, config.input)
    has_captions = any(t.fmt != "txt" for t in tasks)
    check_language_input(config.filter.languages, has_captions)
    return InputPlan(tasks, carried, has_captions)


def build(pipeline: beam.Pipeline, plan: InputPlan, config: Config, layout: OutputLayout,
          resume: bool = True, progress: bool = True) -> None:
    """read -> validate -> [resume] -> fetch -> decode/resize -> hash -> stage -> dedup -> clip
    -> [semantic dedup] -> write.

    Image bytes are staged (transforms/staging.py) before the first shuffle
    they would otherwise cross: right after hashing when dedup or semantic dedup
    runs, else after CLIP (which then scores the bytes still in memory).  Records that a killed
    run already staged are restored instead of fetched again (``resume``; a dry
    run builds the job without looking at the output folder).  With ``progress``,
    the read, fetch, decode and ledger steps tally rows for paircurate.progress.
    """
    from paircurate.transforms.dedup import DeduplicateImages, HashImages
    from paircurate.transforms.fetch import FetchImages
    from paircurate.transforms.resize import DecodeAndResize
    from paircurate.transforms.staging import RestoreStaged, StageImages, list_indexes

    staging = layout.staging(config)
    stage = StageImages(staging, config.output.staging_segment_records,
                        config.output.staging_segment_bytes)
    watch = layout.progress if progress else None
    records = (pipeline
               | "Read" >> ReadInput(plan.tasks, config.input, plan.carried, watch)
               | "Validate" >> ValidateAndFilter(config.filter, plan.has_captions))
    indexes = list_indexes(staging) if resume else []
    if indexes:
        records = records | "Resume" >> RestoreStaged(staging, indexes)
    records = (records
               | "Fetch" >> FetchImages(config.fetch, watch)
               | "Decode" >> DecodeAndResize(config.image, watch)
               | "Hash" >> HashImages(config.dedup))
    # Semantic dedup shuffles records after CLIP: they must be staged (slim) by then.
    stage_early = config.dedup.enabled or semantic_enabled(config)
    if stage_early:
        records = records | "Stage" >> stage
    if config.dedup.enabled:
        records = records | "Dedup" >> DeduplicateImages(
            config.dedup, rejected_path=layout.file_in_work(REJECTED_FILE))
    records = add_clip(records, config, layout.root, staging)
    if not stage_early:
        records = records | "Stage" >> stage
    write_outputs(records, layout, config.output.samples_per_shard, plan.carried, staging=staging,
                  progress=watch, clip_columns=clip_ledger_columns(config))


def semantic_enabled(config: Config) -> bool:
    return config.clip.enabled and config.dedup.semantic.enabled


def add_clip(records, config: Config, output_root: str, staging: Optional[str]):
    """The CLIP stage, when enabled: staged records are made whole for it (captions), then slim again.

    Semantic dedup (dedup.semantic) follows CLIP's filter, on the records it left live.
    """
    if not config.clip.enabled:
        return records
    from paircurate.transforms.clip import ScoreAndFilter
    from paircurate.transforms.staging import Rehydrate, Slim

    if staging:
        # Details and bytes in one read; the stage drops the bytes once a pair is scored.
        records = records | "ClipDetails" >> Rehydrate(staging, live_only=True, with_image=True)
    semantic = semantic_enabled(config)
    records = records | "Clip" >> ScoreAndFilter(config.clip, output_root, staging,
                                                 image_embeddings=semantic)
    if semantic:
        from paircurate.transforms.semantic import SemanticDedup
        rejected = OutputLayout(output_root).file_in_work(SEMANTIC_REJECTED_FILE)
        records = records | "SemanticDedup" >> SemanticDedup(config.dedup, rejected)
    return records | "ClipSlim" >> Slim() if staging else records


def clip_ledger_columns(config: Config) -> List[str]:
    """The ledger columns the CLIP stage adds (tag_<name>, head_<name>); none without CLIP."""
    from paircurate.transforms.clip_tags import ledger_columns
    return ledger_columns(config.clip)


def write_outputs(records, layout: OutputLayout, samples_per_shard: int, carried: pa.Schema,
                  write_shards: bool = True, staging: Optional[str] = None,
                  progress: Optional[str] = None, clip_columns: Sequence[str] = ()) -> None:
    """Live records -> shards; every record -> the ledger; plus the manifest and counts work files.

    Without ``write_shards`` (rescoring without a filter: the input shards stay
    the data) no shards are written and the manifest is empty.
    """
    manifest_path = FileSystems.join(layout.work, "manifest.json")
    if write_shards:
        kept, rejected = records | "SplitKept" >> beam.Partition(lambda r, _: 0 if is_live(r) else 1, 2)
        written, manifest = kept | "Shards" >> WriteShards(layout.shards, samples_per_shard,
                                                           [f.name for f in carried], staging)
        manifest | "Manifest" >> WriteManifest(manifest_path)
        records = (written, rejected) | "AllRecords" >> beam.Flatten()
    if staging:
        # Staged records that were not kept (duplicates, CLIP-filtered) get their details back.
        from paircurate.transforms.staging import Rehydrate
        records = records | "LedgerDetails" >> Rehydrate(staging)
    else:
        (records.pipeline
         | "NoShards" >> beam.Create([None])
         | "EmptyManifest" >> beam.Map(lambda _: write_json(manifest_path, [])))
    records | "Ledger" >> WriteLedger(layout.metadata, layout.work, carried, progress, clip_columns)
