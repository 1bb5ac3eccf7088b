"""CLIP scoring and filtering: every live pair gets a clip_score; a filter may mark some clip_filtered.

Filters (set at most one):

* ``clip.min_score``: absolute threshold, ``clip_score < min_score`` -> clip_filtered.
* ``clip.keep_fraction``: keep the top fraction of THIS run (DataComp style).  The
  cut is exact: with n scored pairs, k = ceil(keep_fraction * n) and the
  threshold is the k-th largest float32 score, found with two radix-histogram
  combines (high then low 16 bits of an order-preserving key), so memory stays
  bounded and nothing is approximated.  Pairs scoring exactly the threshold are
  all kept, so ties at the cut can keep a few more than k; never fewer.
* neither: score only.

A live record without a caption (input lists without a caption column) has
nothing to score: it keeps clip_score None and is not filtered.  Non-live
records pass through untouched.  Model, tokenizer and transform live in
clip_model.py; this module holds the filter arithmetic and the Beam wrapper.
Zero-shot tags and trained heads (clip_tags.py) are computed in the same
batch from the same image embeddings; ``clip.tag_max`` marks tag_filtered
after the score filter.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference

from paircurate.transforms.clip_model import (
    ClipConfig,
    ClipModelError,
    LoadedClip,
    ScoredBatch,
    load_clip,
    model_description,
    resolve_model,
)
from paircurate.transforms.clip_tags import (
    CLIP_COLUMNS,
    apply_tag_max,
    check_config,
    check_heads,
    parse_tag_max,
    parse_tags,
)
from paircurate.transforms.schema import Status, is_live, mark

__all__ = ["ScoreAndFilter", "OpenClipModelHandler", "ClipModelError", "model_description",
           "top_fraction_threshold", "kept_count", "embedding_schema"]

METRICS = "clip"
_HIGH_SHIFT = 16
_LOW_MASK = (1 << _HIGH_SHIFT) - 1


# ---------------------------------------------------------------------------
# filter arithmetic (pure)


def order_key(score: float) -> int:
    """An unsigned 32-bit key whose integer order is the float32 order of ``score``."""
    bits = int(np.array(score + 0.0, dtype=np.float32).view(np.uint32))  # + 0.0: -0.0 -> 0.0
    return bits ^ 0xFFFFFFFF if bits & 0x80000000 else bits | 0x80000000


def key_score(key: int) -> float:
    """The float32 value (as a Python float) of an order key."""
    bits = key ^ 0xFFFFFFFF if not key & 0x80000000 else key & 0x7FFFFFFF
    return float(np.array(bits, dtype=np.uint32).view(np.float32))


def kept_count(n: int, keep_fraction: float) -> int:
    """k = ceil(keep_fraction * n), computed on the decimal value (0.3 * 10 is 3, not 4)."""
    return math.ceil(Fraction(repr(float(keep_fraction))) * n)


def histogram(keys: Iterable[int], high: Optional[int] = None) -> Dict[int, int]:
    """Counts of the high 16 bits of keys, or of the low 16 bits of the keys under ``high``."""
    counts: Dict[int, int] = {}
    for key in keys:
        if high is None:
            bucket = key >> _HIGH_SHIFT
        elif key >> _HIGH_SHIFT == high:
            bucket = key & _LOW_MASK
        else:
            continue
        counts[bucket] = counts.get(bucket, 0) + 1
    return counts


def locate(counts: Mapping[int, int], rank: int) -> Tuple[int, int]:
    """(bucket, rank inside it) of the rank-th largest element (1-based) of a histogram."""
    seen = 0
    for bucket in sorted(counts, reverse=True):
        if seen + counts[bucket] >= rank:
            return bucket, rank - seen
        seen += counts[bucket]
    raise ValueError(f"rank {rank} beyond the {seen} elements counted")


def plan_cut(high_counts: Mapping[int, int], keep_fraction: float) -> Optional[Dict[str, int]]:
    """From the high histogram: n, k, and where the k-th largest score lies (None: nothing scored)."""
    n = sum(high_counts.values())
    if n == 0:
        return None
    k = min(n, max(1, kept_count(n, keep_fraction)))
    bucket, rank = locate(high_counts, k)
    return {"n": n, "k": k, "high": bucket, "rank": rank}


def finish_cut(low_counts: Mapping[int, int], plan: Optional[Mapping[str, int]]) -> Optional[float]:
    """The exact threshold score from the low histogram of the cut's high bucket."""
    if plan is None:
        return None
    low, _ = locate(low_counts, plan["rank"])
    return key_score((plan["high"] << _HIGH_SHIFT) | low)


def top_fraction_threshold(scores: Sequence[float], keep_fraction: float) -> Optional[float]:
    """The score at which the top ``keep_fraction`` of ``scores`` starts (same arithmetic as the pipeline)."""
    keys = [order_key(s) for s in scores]
    plan = plan_cut(histogram(keys), keep_fraction)
    return finish_cut(histogram(keys, plan["high"]), plan) if plan else None


def filter_error(score: float, threshold: float) -> str:
    """E.g. 'clip_score: 0.1234 < 0.28' (float32 shortest forms, so unequal values print unequal)."""
    return f"clip_score: {np.float32(score)} < {np.float32(threshold)}"


def apply_threshold(record: Dict[str, Any], threshold: Optional[float]) -> Dict[str, Any]:
    """Mark a scored record clip_filtered when its score is below ``threshold`` (None: keep)."""
    score = record.get("clip_score")
    if threshold is not None and score is not None and is_live(record) and score < threshold:
        mark(record, Status.CLIP_FILTERED, filter_error(score, threshold))
        beam.metrics.Metrics.counter(METRICS, "filtered").inc()
    return record


def image_bytes(record: Mapping[str, Any], reader=None) -> bytes:
    """The stored (resized) image of a record, as the CLIP stage reads it: the one place that does.

    Carried in the record, or read from staging by its reference (``reader``: a StagedReader).
    """
    from paircurate.transforms.staging import image_bytes as carried_or_staged

    return carried_or_staged(record, reader)


def wants_score(record: Mapping[str, Any]) -> bool:
    """Live, with an image and a caption: there is a pair to score."""
    return (is_live(record) and record.get("caption") is not None
            and bool(record.get("image") or record.get("image_ref")))


def embedding_schema(dim: int) -> pa.Schema:
    return pa.schema([pa.field("uid", pa.string(), nullable=False),
                      pa.field("image_embedding", pa.list_(pa.float16(), dim)),
                      pa.field("text_embedding", pa.list_(pa.float16(), dim))])


def embedding_table(rows: Sequence[Tuple[str, np.ndarray, np.ndarray]]) -> pa.Table:
    """(uid, image emb, text emb) rows -> an Arrow table of fixed-size float16 lists."""
    dim = len(rows[0][1])
    image = np.stack([r[1] for r in rows]).astype(np.float16)
    text = np.stack([r[2] for r in rows]).astype(np.float16)
    return pa.table([pa.array([r[0] for r in rows], pa.string()),
                     pa.FixedSizeListArray.from_arrays(pa.array(image.ravel(), pa.float16()), dim),
                     pa.FixedSizeListArray.from_arrays(pa.array(text.ravel(), pa.float16()), dim)],
                    schema=embedding_schema(dim))


# ---------------------------------------------------------------------------
# Beam


class OpenClipModelHandler(ModelHandler[Dict[str, Any], PredictionResult, LoadedClip]):
    """RunInference handler: records in, PredictionResult(record, ScoredBatch row) out.

    The model is loaded once per worker process (Beam's Shared) and used by all
    its threads; batches are exactly ``batch_size`` pairs (the last of a bundle
    fewer).  With share_model_across_processes one copy serves every process
    on the machine (calls go through LoadedClip.score, so they cross processes).
    """

    def __init__(self, config: ClipConfig, staging: Optional[str] = None,
                 image_embeddings: bool = False):
        super().__init__(min_batch_size=config.batch_size, max_batch_size=config.batch_size,
                         large_model=config.share_model_across_processes)
        self._config = config
        self._staging = staging
        self._reader = None
        self._embeddings = config.save_embeddings or image_embeddings

    def pair_images(self, batch: Sequence[Dict[str, Any]]) -> List[bytes]:
        """The image bytes of a batch: carried in the records, or read from staging by reference."""
        from paircurate.transforms.staging import StagedReader

        if self._reader is None and self._staging:
            self._reader = StagedReader(self._staging)
        return [image_bytes(r, self._reader) for r in batch]

    def load_model(self) -> LoadedClip:
        return load_clip(self._config)

    def run_inference(self, batch: Sequence[Dict[str, Any]], model: LoadedClip,
                      inference_args: Optional[Dict[str, Any]] = None) -> Iterable[PredictionResult]:
        scored: ScoredBatch = model.score(self.pair_images(batch), [r["caption"] for r in batch],
                                          embeddings=self._embeddings)
        out = []
        for i, record in enumerate(batch):
            emb = ((scored.image_embeddings[i], scored.text_embeddings[i])
                   if scored.image_embeddings is not None else None)
            columns = {name: float(v[i]) for name, v in scored.columns.items()} if scored.columns else None
            out.append(PredictionResult(record, (scored.scores[i], scored.errors[i], emb, columns)))
        return out

    def get_num_bytes(self, batch: Sequence[Dict[str, Any]]) -> int:
        # The default pickles the whole batch just to measure it.
        return sum(len(r.get("image") or b"") + len((r.get("caption") or "").encode("utf-8")) for r in batch)

    def get_metrics_namespace(self) -> str:
        return METRICS


class _AttachScore(beam.DoFn):
    """(uid, PredictionResult) -> the record with its clip_score; embeddings to a side output.

    With ``carry_image_embedding`` (semantic dedup) the record also carries its image
    embedding in the transient field semantic.EMBEDDING_FIELD, float16 bytes.
    """

    def __init__(self, save_embeddings: bool = True, carry_image_embedding: bool = False):
        self._save, self._carry = save_embeddings, carry_image_embedding

    def setup(self):  # counters made once: making one is a few microseconds a pair
        self._undecodable = beam.metrics.Metrics.counter(METRICS, "undecodable")
        self._scored = beam.metrics.Metrics.counter(METRICS, "scored")

    def process(self, element):
        uid, result = element
        record = result.example
        if record["uid"] != uid:  # cannot happen unless a handler reorders a batch
            raise RuntimeError(f"CLIP result for {uid} attached to {record['uid']}")
        score, error, emb, columns = result.inference
        if record.get("image_ref"):  # bytes read back from staging for the model: not needed further
            record["image"] = None
        if error is not None:
            # The decode stage accepted these bytes; the model's decoder did not.
            mark(record, Status.DECODE_FAILED, f"not_image: clip: {error}")
            self._undecodable.inc()
        else:
            record["clip_score"] = float(score)  # a float32 value, as the ledger stores it
            if columns:
                record[CLIP_COLUMNS] = columns  # tag_<name>, head_<name>
            self._scored.inc()
            if emb is not None and self._carry:
                from paircurate.transforms.semantic import EMBEDDING_FIELD, embedding_bytes
                record[EMBEDDING_FIELD] = embedding_bytes(emb[0])
            if emb is not None and self._save:
                yield beam.pvalue.TaggedOutput("embeddings", (uid, emb[0], emb[1]))
        yield record


class TopFractionThreshold(beam.PTransform):
    """Scores -> a single threshold (or None when nothing was scored); exact, two combines."""

    def __init__(self, keep_fraction: float):
        super().__init__()
        self._fraction = keep_fraction

    def expand(self, scores):
        fraction = self._fraction
        keys = scores | "OrderKey" >> beam.Map(order_key)
        plan = (keys
                | "HighCounts" >> beam.CombineGlobally(_HistogramFn()).without_defaults()
                | "Plan" >> beam.Map(plan_cut, fraction))
        plan_view = beam.pvalue.AsSingleton(plan, default_value=None)
        low = (keys
               | "InCutBucket" >> beam.Filter(lambda k, p: p is not None and k >> _HIGH_SHIFT == p["high"],
                                              plan_view)
               | "LowCounts" >> beam.CombineGlobally(_HistogramFn(low=True)))
        return low | "Threshold" >> beam.Map(lambda counts, p: finish_cut(counts, p), plan_view)


class _HistogramFn(beam.CombineFn):
    """Sparse histogram of 16-bit buckets (high bits, or low bits with low=True)."""

    def __init__(self, low: bool = False):
        self._low = low

    def create_accumulator(self):
        return {}

    def add_input(self, acc, key):
        bucket = key & _LOW_MASK if self._low else key >> _HIGH_SHIFT
        acc[bucket] = acc.get(bucket, 0) + 1
        return acc

    def merge_accumulators(self, accs):
        merged: Dict[int, int] = {}
        for acc in accs:
            for bucket, count in acc.items():
                merged[bucket] = merged.get(bucket, 0) + count
        return merged

    def extract_output(self, acc):
        return acc


class ScoreAndFilter(beam.PTransform):
    """records -> records (same count): clip_score on every scored pair, clip_filtered per the filter.

    ``output_dir`` is needed only with ``save_embeddings`` (files go to
    output_dir/embeddings/part-*.parquet).  After expansion, ``threshold`` is
    a PCollection holding the filter's threshold (None when no filter applies).
    Disabled (clip.enabled false), it is the identity.
    """

    def __init__(self, config: ClipConfig, output_dir: Optional[str] = None,
                 staging: Optional[str] = None, image_embeddings: bool = False):
        super().__init__()
        self._config = config
        self._output_dir = output_dir
        self._staging = staging
        # Carry each scored record's image embedding (for semantic dedup, which drops it).
        self._image_embeddings = image_embeddings
        self.threshold = None
        if config.enabled:
            if config.save_embeddings and not output_dir:
                raise ClipModelError("clip.save_embeddings needs an output folder")
            resolved = resolve_model(config)  # weights missing: fail now, with one clear line, not on a worker
            check_config(config)
            if config.heads:  # a head that does not fit the model: fail now, naming file and sizes
                check_heads(config, _embedding_dim(config), resolved.name)

    def expand(self, records):
        config = self._config
        if not config.enabled:
            return records
        to_score, passing = records | "NeedsScore" >> beam.Partition(
            lambda r, _: 0 if wants_score(r) else 1, 2)
        results = (to_score
                   | "KeyByUid" >> beam.Map(lambda r: (r["uid"], r))
                   | "RunInference" >> RunInference(KeyedModelHandler(
                       OpenClipModelHandler(config, self._staging, self._image_embeddings)))
                   | "AttachScore" >> beam.ParDo(_AttachScore(config.save_embeddings, self._image_embeddings))
                   .with_outputs("embeddings", main="records"))
        scored = results.records
        if config.save_embeddings:
            from apache_beam.io.filesystems import FileSystems

            prefix = FileSystems.join(self._output_dir, "embeddings", "part")
            dim = _embedding_dim(config)
            (results.embeddings
             | "BatchEmbeddings" >> beam.BatchElements(min_batch_size=256, max_batch_size=8192)
             | "EmbeddingTable" >> beam.Map(embedding_table)
             | "WriteEmbeddings" >> beam.io.WriteToParquetBatched(
                 prefix, embedding_schema(dim), file_name_suffix=".parquet"))
        if config.min_score is not None:
            self.threshold = records.pipeline | "MinScore" >> beam.Create([float(config.min_score)])
        elif config.keep_fraction is not None:
            self.threshold = (scored
                              | "Scores" >> beam.FlatMap(
                                  lambda r: [r["clip_score"]] if r.get("clip_score") is not None else [])
                              | "TopFraction" >> TopFractionThreshold(config.keep_fraction))
        if self.threshold is not None:
            scored = scored | "Filter" >> beam.Map(
                apply_threshold, beam.pvalue.AsSingleton(self.threshold, default_value=None))
        tag_max = parse_tag_max(config.tag_max, parse_tags(config.tags))
        if tag_max:  # after the score filter: a row below the threshold stays clip_filtered
            scored = scored | "TagFilter" >> beam.Map(apply_tag_max, tag_max)
        return (scored, passing) | "Rejoin" >> beam.Flatten()


def _embedding_dim(config: ClipConfig) -> int:
    """The embedding width, read from the architecture's config (no weights are loaded)."""
    import open_clip

    name = resolve_model(config).name
    if name.startswith("local-dir:"):
        import json
        import os
        with open(os.path.join(name[len("local-dir:"):], "open_clip_config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        cfg = cfg.get("model_cfg", cfg)
    else:
        cfg = open_clip.get_model_config(name)
    if not cfg or "embed_dim" not in cfg:
        raise ClipModelError(f"cannot tell the embedding width of {name}")
    return int(cfg["embed_dim"])
