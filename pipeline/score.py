"""`paircurate score`: rescore an existing WebDataset dataset with another CLIP model.

Reads tars of {key}.jpg|png|webp + {key}.txt + {key}.json (paircurate's or
img2dataset's), scores every pair, and writes a new ledger (same schema as a
run's; status ok, clip_filtered or tag_filtered, decode_failed or invalid_input for samples
that cannot be scored) plus, when a filter is set, shards of the kept samples.
Nothing is downloaded.  Without a filter no shards are written: the input
shards stay the data and the ledger's shard column is empty.

The input is not trusted: a sample's uid is computed here from its shard (path
relative to the input root) and its key, never taken from its json; members are
read with a size limit; a damaged tar gives one decode_failed row and keeps
the samples read before the damage.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from paircurate.config import Config, ConfigError
from paircurate.transforms.files import IMAGE_EXTENSIONS, CorruptShard, OversizedMember, iter_shard
from paircurate.transforms.schema import LEDGER_FIELDS, Status, mark, new_record

#: Ledger fields a sample's json may supply (the rest are this command's to fill).
COPIED_FIELDS = {f.name: f.type for f in LEDGER_FIELDS
                 if f.name not in ("uid", "status", "error", "clip_score", "shard", "key", "source",
                                   "position", "caption", "image_format")}
#: The members a sample is made of; others are skipped without being read.
SAMPLE_EXTENSIONS = frozenset(IMAGE_EXTENSIONS + ("txt", "json"))


def sample_uid(shard: str, key: str, occurrence: int = 0) -> str:
    """A sample's uid: blake2b-128 hex of its shard (relative to the input root) and key.

    ``occurrence`` counts earlier samples with the same key in the same shard
    (a tar may repeat a key); the first has 0, so its uid depends only on where
    it is.
    """
    digest = hashlib.blake2b(digest_size=16)
    for part in ("sample", shard, key, str(occurrence)):
        digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return digest.hexdigest()


def damage_uid(shard: str) -> str:
    """The uid of the one row that records a damaged shard."""
    digest = hashlib.blake2b(digest_size=16)
    for part in ("corrupt_shard", shard):
        digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return digest.hexdigest()


def input_root(paths: Sequence[str]) -> str:
    """The deepest folder holding every shard ("/"-separated, local or gs:// alike)."""
    folders = [p.rsplit("/", 1)[0].split("/") if "/" in p else [] for p in paths]
    common: List[str] = []
    for parts in zip(*folders):
        if any(part != parts[0] for part in parts):
            break
        common.append(parts[0])
    return "/".join(common)


def relative_shard(path: str, root: str) -> str:
    return path[len(root):].lstrip("/") if root and path.startswith(root + "/") else path


def _coerce(value: Any, kind: pa.DataType) -> Any:
    try:
        if value is None:
            return None
        if pa.types.is_integer(kind):
            return int(value)
        if pa.types.is_floating(kind):
            return float(value)
        if pa.types.is_boolean(kind):
            return bool(value)
        return str(value)
    except (TypeError, ValueError, OverflowError):
        return None


def sample_record(key: str, members: Dict[str, Any], source: str, position: int,
                  uid: str, limit: Optional[int] = None) -> Dict[str, Any]:
    """The ledger record of one WebDataset sample, with its image bytes to score.

    The json's own "uid" and "key" are ignored (the ledger's ``key`` is the
    member key in the input shard); its other ledger fields are copied.
    """
    meta: Dict[str, Any] = {}
    if isinstance(members.get("json"), bytes):
        try:
            loaded = json.loads(members["json"].decode("utf-8"))
            meta = loaded if isinstance(loaded, dict) else {}
        except (UnicodeDecodeError, ValueError):
            meta = {}
    if isinstance(members.get("txt"), bytes):
        caption: Optional[str] = members["txt"].decode("utf-8", "replace")
    else:
        caption = meta.get("caption") if isinstance(meta.get("caption"), str) else None
    url = meta.get("url") if isinstance(meta.get("url"), str) else None
    record = new_record(uid, url, caption, source, position, {})
    for name, kind in COPIED_FIELDS.items():
        if name in meta and name != "url":
            record[name] = _coerce(meta[name], kind)
    record["key"] = key
    oversized = [m for m in members.values() if isinstance(m, OversizedMember)]
    if oversized:
        return mark(record, Status.DECODE_FAILED, "too_large: " + "; ".join(
            f"{m.name} is {m.size} bytes, over the limit of {limit} (fetch.max_bytes)" for m in oversized))
    ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if ext is None:
        return mark(record, Status.INVALID_INPUT, "no_image: sample has no jpg/png/webp member")
    record["image"] = members[ext]
    record["image_format"] = "jpg" if ext == "jpeg" else ext
    if record.get("width") is None or record.get("height") is None:
        try:
            from PIL import Image
            with Image.open(io.BytesIO(record["image"])) as image:  # header only
                record["width"], record["height"] = image.size
        except Exception:
            pass  # the model's decoder will report it
    return record


def damage_record(path: str, shard: str, position: int, error: CorruptShard) -> Dict[str, Any]:
    """The ledger row of a damaged shard (and of the sample it was reading, if any)."""
    record = new_record(damage_uid(shard), None, None, path, position, {})
    record["key"] = error.pending
    where = f" in sample {error.pending!r}" if error.pending is not None else ""
    return mark(record, Status.DECODE_FAILED, f"corrupt_shard: {path}: {error.reason}{where}")


def read_shard(path: str, root: str, max_member_bytes: int) -> Iterator[Dict[str, Any]]:
    """Every sample of one shard as a record; a damaged shard ends with one decode_failed row."""
    shard = relative_shard(path, root)
    seen: Dict[str, int] = {}
    count = 0
    try:
        for key, members in iter_shard(path, SAMPLE_EXTENSIONS, max_member_bytes):
            occurrence = seen.get(key, 0)
            seen[key] = occurrence + 1
            yield sample_record(key, members, path, count, sample_uid(shard, key, occurrence),
                                max_member_bytes)
            count += 1
    except CorruptShard as exc:
        yield damage_record(path, shard, count, exc)


class _ReadShard(beam.DoFn):
    def __init__(self, root: str, max_member_bytes: int):
        self._root = root
        self._max = max_member_bytes

    def setup(self):
        self._rows = beam.metrics.Metrics.counter("read", "rows")

    def process(self, path: str):
        for record in read_shard(path, self._root, self._max):
            self._rows.inc()
            yield record


def match_inputs(input_glob: str) -> List[str]:
    """The shard files a glob (or comma-separated globs) names, each once; an error when there are none."""
    from paircurate.run import RunError

    paths: List[str] = []
    for pattern in [p for p in input_glob.split(",") if p]:
        try:
            found = FileSystems.match([pattern])[0].metadata_list
        except Exception as exc:
            raise RunError(f"cannot list {pattern}: {exc}") from None
        paths.extend(m.path for m in found if m.path.endswith((".tar", ".tar.gz", ".tgz")))
    paths = sorted({_normalised(p) for p in paths})
    if not paths:
        raise RunError(f"no .tar shards match {input_glob}")
    return paths


def _normalised(path: str) -> str:
    import os

    return path if "://" in path else os.path.abspath(path)


def run_score(input_glob: str, output_dir: str, config: Config, overwrite: bool = False,
              extra_args: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """Rescore WebDataset shards; write the ledger (and kept shards if a filter is set); return stats."""
    from paircurate.graph import OutputLayout, clip_ledger_columns, write_outputs
    from paircurate.run import beam_options, claim_output, finalise, input_rows, wait_until_done
    from paircurate.transforms.clip import ScoreAndFilter

    if not config.clip.enabled:
        raise ConfigError("paircurate score needs clip.enabled: true (it only scores)")
    clip = config.clip
    score_filter = clip.min_score is not None or clip.keep_fraction is not None
    filtering = score_filter or bool(clip.tag_max)  # rows may be dropped: write the kept ones anew
    paths = match_inputs(input_glob)
    layout = OutputLayout(output_dir)
    stage = ScoreAndFilter(clip, output_dir)  # fails fast when the weights cannot be had
    from paircurate.transforms.beam_util import make_pipeline

    with claim_output(output_dir, overwrite):
        started = time.time()
        pipeline = make_pipeline(config.runner.runner, beam_options(config, extra_args))
        records = (pipeline
                   | "ShardPaths" >> beam.Create(paths)
                   | "Spread" >> beam.Reshuffle()
                   | "ReadShard" >> beam.ParDo(_ReadShard(input_root(paths), config.fetch.max_bytes))
                   | "Clip" >> stage)
        staging = None
        if filtering:  # kept samples cross two shuffles on their way to new shards: stage their bytes
            from paircurate.transforms.staging import StageImages

            staging = layout.staging(config)
            records = records | "Stage" >> StageImages(staging, config.output.staging_segment_records,
                                                       config.output.staging_segment_bytes)
        write_outputs(records, layout, config.output.samples_per_shard, pa.schema([]),
                      write_shards=filtering, staging=staging, clip_columns=clip_ledger_columns(config))
        result = pipeline.run()
        wait_until_done(result)
        threshold = (clip.min_score if clip.min_score is not None
                     else _ledger_threshold(layout.metadata) if score_filter else None)
        return finalise(layout, config, started, input_rows(result),
                        {"rescored_from": input_glob, "input_shards": len(paths),
                         "clip_threshold": threshold})


def _ledger_threshold(metadata_dir: str) -> Optional[float]:
    """The lowest score that passed: the threshold the filter applied (for stats)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    lowest: Optional[float] = None
    for meta in FileSystems.match([FileSystems.join(metadata_dir, "*.parquet")])[0].metadata_list:
        with FileSystems.open(meta.path) as handle:
            table = pq.read_table(handle, columns=["status", "clip_score"])
        # Tag filtering comes after the score filter: its rows passed the threshold too.
        passed = pc.is_in(table["status"], pa.array([Status.OK.value, Status.TAG_FILTERED.value]))
        ok = table.filter(passed)["clip_score"]
        value = pc.min(ok).as_py() if len(ok) else None
        if value is not None and (lowest is None or value < lowest):
            lowest = value
    return lowest


__all__ = ["run_score", "sample_record", "sample_uid", "read_shard"]
