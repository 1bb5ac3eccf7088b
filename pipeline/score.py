"""`paircurate score`: rescore an existing WebDataset dataset with another CLIP model.

Reads tars of {key}.jpg|png|webp + {key}.txt + {key}.json (paircurate's or
img2dataset's), scores every pair, and writes a new ledger (same schema as a
run's; status ok or clip_filtered) plus, when a filter is set, shards of the
kept samples.  Nothing is downloaded.  A sample's uid is the "uid" of its json
when there is one, else derived from its key.  Without a filter no shards are
written: the input shards stay the data and the ledger's shard column is empty.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from typing import Any, Dict, List, Optional, Tuple

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from paircurate.config import Config, ConfigError
from paircurate.schema import LEDGER_FIELDS, Status, mark, new_record
from paircurate.transforms.write import IMAGE_EXTENSIONS, iter_shard

#: Ledger fields a sample's json may supply (the rest are this command's to fill).
COPIED_FIELDS = {f.name: f.type for f in LEDGER_FIELDS
                 if f.name not in ("uid", "status", "error", "clip_score", "shard", "key", "source",
                                   "position", "caption")}


def derived_uid(key: str) -> str:
    """A uid for a sample whose json has none: hex, like the reader's (the shard writer buckets by it)."""
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


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
    except (TypeError, ValueError):
        return None


def sample_record(key: str, members: Dict[str, bytes], source: str, position: int) -> Dict[str, Any]:
    """The ledger record of one WebDataset sample, with its image bytes to score."""
    meta: Dict[str, Any] = {}
    if "json" in members:
        try:
            loaded = json.loads(members["json"].decode("utf-8"))
            meta = loaded if isinstance(loaded, dict) else {}
        except (UnicodeDecodeError, ValueError):
            meta = {}
    if "txt" in members:
        caption: Optional[str] = members["txt"].decode("utf-8", "replace")
    else:
        caption = meta.get("caption") if isinstance(meta.get("caption"), str) else None
    uid = meta.get("uid") if isinstance(meta.get("uid"), str) and meta.get("uid") else derived_uid(key)
    record = new_record(uid, meta.get("url"), caption, source, position, {})
    for name, kind in COPIED_FIELDS.items():
        if name in meta:
            record[name] = _coerce(meta[name], kind)
    record["key"] = key
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


class _ReadShard(beam.DoFn):
    def process(self, path: str):
        for position, (key, members) in enumerate(iter_shard(path)):
            beam.metrics.Metrics.counter("read", "rows").inc()
            yield sample_record(key, members, path, position)


def match_inputs(input_glob: str) -> List[str]:
    """The shard files a glob (or comma-separated globs) names; an error when there are none."""
    from paircurate.run import RunError

    paths: List[str] = []
    for pattern in [p for p in input_glob.split(",") if p]:
        try:
            found = FileSystems.match([pattern])[0].metadata_list
        except Exception as exc:
            raise RunError(f"cannot list {pattern}: {exc}") from None
        paths.extend(sorted(m.path for m in found if m.path.endswith((".tar", ".tar.gz", ".tgz"))))
    if not paths:
        raise RunError(f"no .tar shards match {input_glob}")
    return paths


def run_score(input_glob: str, output_dir: str, config: Config, overwrite: bool = False,
              extra_args: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """Rescore WebDataset shards; write the ledger (and kept shards if a filter is set); return stats."""
    from paircurate.graph import OutputLayout, write_outputs
    from paircurate.run import beam_options, finalise, input_rows, prepare_output, wait_until_done
    from paircurate.transforms.clip import ScoreAndFilter

    if not config.clip.enabled:
        raise ConfigError("paircurate score needs clip.enabled: true (it only scores)")
    clip = config.clip
    filtering = clip.min_score is not None or clip.keep_fraction is not None
    paths = match_inputs(input_glob)
    layout = OutputLayout(output_dir)
    stage = ScoreAndFilter(clip, output_dir)  # fails fast when the weights cannot be had
    prepare_output(output_dir, overwrite)
    started = time.time()
    from paircurate.beam_util import make_pipeline

    pipeline = make_pipeline(config.runner.runner, beam_options(config, extra_args))
    records = (pipeline
               | "ShardPaths" >> beam.Create(paths)
               | "Spread" >> beam.Reshuffle()
               | "ReadShard" >> beam.ParDo(_ReadShard())
               | "Clip" >> stage)
    write_outputs(records, layout, config.output.samples_per_shard, pa.schema([]),
                  write_shards=filtering)
    result = pipeline.run()
    wait_until_done(result)
    threshold = (clip.min_score if clip.min_score is not None
                 else _ledger_threshold(layout.metadata) if filtering else None)
    return finalise(layout, config, started, input_rows(result),
                    {"rescored_from": input_glob, "input_shards": len(paths), "clip_threshold": threshold})


def _ledger_threshold(metadata_dir: str) -> Optional[float]:
    """The lowest score kept: the threshold the filter applied (for stats)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    lowest: Optional[float] = None
    for meta in FileSystems.match([FileSystems.join(metadata_dir, "*.parquet")])[0].metadata_list:
        with FileSystems.open(meta.path) as handle:
            table = pq.read_table(handle, columns=["status", "clip_score"])
        ok = table.filter(pc.equal(table["status"], Status.OK.value))["clip_score"]
        value = pc.min(ok).as_py() if len(ok) else None
        if value is not None and (lowest is None or value < lowest):
            lowest = value
    return lowest


__all__ = ["run_score", "sample_record", "derived_uid"]
