"""Zero-shot tags and trained heads on the CLIP image embeddings (no Beam here).

Tags (``clip.tags``): each named tag is a set of positive and a set of negative
text prompts.  For an image with L2-normalised embedding x and the tag's
prompts' normalised text embeddings t_1..t_m (positives P, negatives N),

    tag_<name> = sum over j in P of softmax_j(s * cos(x, t_j)),  j ranging over P and N,

with s = exp(model.logit_scale), CLIP's own logit scale (100 for OpenAI's and
LAION's trained models).  So it is the probability CLIP's zero-shot classifier
gives the positive prompts when it must choose among all the tag's prompts.
The prompts are encoded once per worker; the image embeddings are the ones
the score was computed from, so a tag costs one small matrix product.

Heads (``clip.heads``): a linear layer or a small MLP (a chain of Linear
layers) on the normalised image embedding, loaded from a safetensors or .pt
state dict, such as LAION's aesthetic predictor; its input size must be the
model's embedding size.  Its one output, after ``activation``, is
``head_<name>``.

``clip.tag_max`` marks live rows whose tag probability is above a limit
``tag_filtered`` (after the CLIP score filter: a row below the score
threshold stays ``clip_filtered``).

The values travel on the record as one dict, ``record["clip_columns"]``
({ledger column: float}), and become ledger columns (float32, null for rows
that were not scored) and keys of each sample's .json.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from paircurate.transforms.clip_model import ClipConfig
from paircurate.transforms.schema import Status, is_live, mark
from paircurate.transforms.settings import ConfigError

#: The record field that carries the values ({column name: float}).
CLIP_COLUMNS = "clip_columns"
TAG_PREFIX = "tag_"
HEAD_PREFIX = "head_"
NAME = re.compile(r"[a-z0-9_]+\Z")
#: Applied to a head's one output.
OUTPUT_ACTIVATIONS = ("none", "sigmoid")
#: Applied between a head's Linear layers (LAION's improved aesthetic MLP has none).
HIDDEN_ACTIVATIONS = ("relu", "none")
HEAD_KEYS = ("path", "activation", "hidden")


@dataclass(frozen=True)
class TagSpec:
    name: str
    positive: Tuple[str, ...]
    negative: Tuple[str, ...]

    @property
    def column(self) -> str:
        return TAG_PREFIX + self.name

    @property
    def prompts(self) -> Tuple[str, ...]:
        return self.positive + self.negative


@dataclass(frozen=True)
class HeadSpec:
    name: str
    path: str
    activation: str = "none"
    hidden: str = "relu"

    @property
    def column(self) -> str:
        return HEAD_PREFIX + self.name


# ---------------------------------------------------------------------------
# configuration (pure)


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise ConfigError(f"{where}: name {name!r} must be lower-case letters, digits and _ "
                          "(it becomes a ledger column)")
    return name


def _prompts(value: Any, where: str) -> Tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(p, str) and p.strip() for p in value)):
        raise ConfigError(f"{where}: expected a non-empty list of non-empty prompts, got {value!r}")
    return tuple(value)


def parse_tags(tags: Mapping[str, Any]) -> List[TagSpec]:
    """clip.tags -> TagSpecs, in the config's order; ConfigError naming the first problem."""
    if not isinstance(tags, Mapping):
        raise ConfigError(f"clip.tags: expected a mapping of tag names, got {tags!r}")
    out = []
    for name, spec in tags.items():
        where = f"clip.tags.{name}"
        _check_name(name, "clip.tags")
        if not isinstance(spec, Mapping) or set(spec) != {"positive", "negative"}:
            raise ConfigError(f"{where}: expected a mapping with exactly the keys positive and negative "
                              f"(lists of prompts), got {spec!r}")
        out.append(TagSpec(name, _prompts(spec["positive"], where + ".positive"),
                           _prompts(spec["negative"], where + ".negative")))
    return out


def parse_heads(heads: Mapping[str, Any]) -> List[HeadSpec]:
    """clip.heads -> HeadSpecs (files are not read here); ConfigError naming the first problem."""
    if not isinstance(heads, Mapping):
        raise ConfigError(f"clip.heads: expected a mapping of head names, got {heads!r}")
    out = []
    for name, spec in heads.items():
        where = f"clip.heads.{name}"
        _check_name(name, "clip.heads")
        if isinstance(spec, str):
            spec = {"path": spec}
        if not isinstance(spec, Mapping) or not isinstance(spec.get("path"), str) or not spec["path"]:
            raise ConfigError(f"{where}: expected {{path: FILE, activation: none|sigmoid, hidden: relu|none}}, "
                              f"got {spec!r}")
        unknown = sorted(set(spec) - set(HEAD_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(HEAD_KEYS)}")
        activation = spec.get("activation", "none")
        hidden = spec.get("hidden", "relu")
        if activation not in OUTPUT_ACTIVATIONS:
            raise ConfigError(f"{where}.activation={activation!r}: must be one of {', '.join(OUTPUT_ACTIVATIONS)}")
        if hidden not in HIDDEN_ACTIVATIONS:
            raise ConfigError(f"{where}.hidden={hidden!r}: must be one of {', '.join(HIDDEN_ACTIVATIONS)}")
        out.append(HeadSpec(name, spec["path"], activation, hidden))
    return out


def parse_tag_max(tag_max: Mapping[str, Any], tags: Sequence[TagSpec]) -> Dict[str, float]:
    """clip.tag_max -> {tag name: limit in [0, 1]}; a tag that clip.tags does not define is an error."""
    if not isinstance(tag_max, Mapping):
        raise ConfigError(f"clip.tag_max: expected a mapping of tag names to probabilities, got {tag_max!r}")
    known = [t.name for t in tags]
    out = {}
    for name, limit in tag_max.items():
        if name not in known:
            raise ConfigError(f"clip.tag_max names tag {name!r}, which clip.tags does not define "
                              f"(defined: {', '.join(known) or 'none'})")
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 <= limit <= 1:
            raise ConfigError(f"clip.tag_max.{name}={limit!r}: must be a probability between 0 and 1")
        out[name] = float(limit)
    return out


def check_config(clip: ClipConfig) -> None:
    """The tag and head settings are well formed (head files are checked when the stage is built)."""
    parse_tag_max(clip.tag_max, parse_tags(clip.tags))
    parse_heads(clip.heads)


def ledger_columns(clip: ClipConfig) -> List[str]:
    """The ledger columns the CLIP stage adds: tag_<name> per tag, then head_<name> per head."""
    if not clip.enabled:
        return []
    return [t.column for t in parse_tags(clip.tags)] + [h.column for h in parse_heads(clip.heads)]


# ---------------------------------------------------------------------------
# arithmetic (torch tensors on any device)


def tag_probabilities(image_emb, prompt_emb, logit_scale: float, tags: Sequence[TagSpec]):
    """(n, len(tags)) probabilities from normalised image (n, d) and prompt (sum of prompts, d) embeddings.

    ``prompt_emb`` holds each tag's prompts in turn, positives first (TagSpec.prompts).
    """
    import torch

    logits = logit_scale * (image_emb @ prompt_emb.T)
    columns, start = [], 0
    for tag in tags:
        end = start + len(tag.prompts)
        probs = torch.softmax(logits[:, start:end], dim=-1)
        columns.append(probs[:, :len(tag.positive)].sum(dim=-1))
        start = end
    return torch.stack(columns, dim=-1) if columns else logits.new_zeros((logits.shape[0], 0))


# ---------------------------------------------------------------------------
# heads


def read_state_dict(path: str) -> Dict[str, Any]:
    """A head's tensors from a .safetensors or .pt file (local, gs://, s3://); ConfigError if unreadable."""
    import torch
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            data = handle.read()
    except Exception as exc:  # noqa: BLE001 - any filesystem's "not there"
        raise ConfigError(f"head file {path}: cannot be read: {exc}") from None
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors
            state = load_safetensors(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - damaged file, pickled module, ...
        raise ConfigError(f"head file {path}: not a safetensors file or a torch state dict saved with "
                          f"torch.save(module.state_dict()): {type(exc).__name__}: {exc}") from None
    if isinstance(state, Mapping) and set(state) == {"state_dict"} and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"head file {path}: expected a mapping of tensor names to tensors")
    return dict(state)


def _natural(key: str) -> Tuple[Any, ...]:
    """Sort key: 'layers.10.weight' after 'layers.2.weight'."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split("."))


def linear_chain(state: Mapping[str, Any], path: str) -> List[Tuple[Any, Optional[Any]]]:
    """[(weight (out, in), bias or None)] of a chain of Linear layers, in order; ConfigError otherwise.

    Layers are ordered by their names (numbers compared as numbers), and each
    one's input size must be the previous one's output size; the last gives one value.
    """
    layers: Dict[str, Dict[str, Any]] = {}
    for key, tensor in state.items():
        prefix, _, kind = key.rpartition(".")
        if kind not in ("weight", "bias"):
            raise ConfigError(f"head file {path}: tensor {key!r} is not the weight or bias of a Linear layer")
        layers.setdefault(prefix, {})[kind] = tensor
    if not layers:
        raise ConfigError(f"head file {path}: holds no tensors")
    chain = []
    for prefix in sorted(layers, key=_natural):
        weight, bias = layers[prefix].get("weight"), layers[prefix].get("bias")
        if weight is None or weight.dim() != 2:
            raise ConfigError(f"head file {path}: layer {prefix or '(top)'!r} is not a Linear layer "
                              "(needs a 2-D weight)")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ConfigError(f"head file {path}: layer {prefix!r} has a bias of shape {tuple(bias.shape)} "
                              f"for {weight.shape[0]} outputs")
        if chain and chain[-1][0].shape[0] != weight.shape[1]:
            raise ConfigError(f"head file {path}: layer {prefix!r} takes {weight.shape[1]} inputs but the "
                              f"layer before gives {chain[-1][0].shape[0]}")
        chain.append((weight, bias))
    if chain[-1][0].shape[0] != 1:
        raise ConfigError(f"head file {path}: the last layer gives {chain[-1][0].shape[0]} values; a head "
                          "gives one")
    return chain


def head_input_size(path: str) -> int:
    return int(linear_chain(read_state_dict(path), path)[0][0].shape[1])


def build_head(spec: HeadSpec, embed_dim: Optional[int], model_name: str = "the model"):
    """The head as a torch module (fp32, eval mode), its input size checked against ``embed_dim``."""
    import torch

    chain = linear_chain(read_state_dict(spec.path), spec.path)
    size = int(chain[0][0].shape[1])
    if embed_dim is not None and size != embed_dim:
        raise ConfigError(f"clip.heads.{spec.name}: {spec.path} takes embeddings of size {size}, but "
                          f"{model_name} gives embeddings of size {embed_dim}")
    modules: List[Any] = []
    for i, (weight, bias) in enumerate(chain):
        if i and spec.hidden == "relu":
            modules.append(torch.nn.ReLU())
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            layer.weight.copy_(weight.float())
            if bias is not None:
                layer.bias.copy_(bias.float())
        modules.append(layer)
    if spec.activation == "sigmoid":
        modules.append(torch.nn.Sigmoid())
    return torch.nn.Sequential(*modules).eval()


def check_heads(clip: ClipConfig, embed_dim: int, model_name: str) -> None:
    """Every head file loads and takes embeddings of ``embed_dim`` (ConfigError naming file and sizes)."""
    for spec in parse_heads(clip.heads):
        build_head(spec, embed_dim, model_name)


# ---------------------------------------------------------------------------
# per worker


class TagsAndHeads:
    """The tag prompts encoded once, and the heads loaded, for one loaded model."""

    def __init__(self, clip: ClipConfig, model, tokenizer, device: str, embed_dim: Optional[int],
                 model_name: str = "the model"):
        import torch
        import torch.nn.functional as F

        self.tags = parse_tags(clip.tags)
        self.heads = [(spec.column, build_head(spec, embed_dim, model_name).to(device))
                      for spec in parse_heads(clip.heads)]
        self.prompt_emb = None
        self.logit_scale = 1.0
        if self.tags:
            prompts = [p for tag in self.tags for p in tag.prompts]
            with torch.inference_mode():
                encoded = model.encode_text(tokenizer(prompts).to(device))
                self.prompt_emb = F.normalize(encoded.float(), dim=-1)
                self.logit_scale = float(model.logit_scale.exp())

    @property
    def column_names(self) -> List[str]:
        return [t.column for t in self.tags] + [name for name, _ in self.heads]

    def columns(self, image_emb) -> Dict[str, np.ndarray]:
        """{column: float32 array (n,)} for normalised float32 image embeddings (n, d) on the device."""
        import torch

        out: Dict[str, np.ndarray] = {}
        with torch.inference_mode():
            if self.tags:
                probs = tag_probabilities(image_emb, self.prompt_emb, self.logit_scale, self.tags)
                probs = probs.cpu().numpy().astype(np.float32)
                for i, tag in enumerate(self.tags):
                    out[tag.column] = probs[:, i]
            for column, head in self.heads:
                out[column] = head(image_emb).squeeze(-1).cpu().numpy().astype(np.float32)
        return out


def tags_and_heads(clip: ClipConfig, model, tokenizer, device: str, embed_dim: Optional[int],
                   model_name: str = "the model") -> Optional[TagsAndHeads]:
    """A TagsAndHeads when the config has tags or heads, else None (nothing to compute)."""
    if not clip.tags and not clip.heads:
        return None
    return TagsAndHeads(clip, model, tokenizer, device, embed_dim, model_name)


# ---------------------------------------------------------------------------
# filter (pure)


def tag_filter_error(column: str, probability: float, limit: float) -> str:
    """E.g. 'tag_unsafe: 0.73 > 0.5' (float32 shortest forms)."""
    return f"{column}: {np.float32(probability)} > {np.float32(limit)}"


def apply_tag_max(record: Dict[str, Any], tag_max: Mapping[str, float]) -> Dict[str, Any]:
    """Mark a live record tag_filtered when a tag's probability is above its limit (the first, in order)."""
    if not tag_max or not is_live(record):
        return record
    columns = record.get(CLIP_COLUMNS) or {}
    for name, limit in tag_max.items():
        probability = columns.get(TAG_PREFIX + name)
        if probability is not None and probability > limit:
            return mark(record, Status.TAG_FILTERED, tag_filter_error(TAG_PREFIX + name, probability, limit))
    return record
