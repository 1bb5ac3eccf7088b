"""Shared fixtures: a loopback image server and input-list builders."""
from __future__ import annotations

import glob
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from paircurate.demo import encode, synthetic_image  # noqa: E402
from paircurate.imageserver import ImageServer, Route  # noqa: E402


@pytest.fixture
def image_server():
    """A loopback HTTP server; tests add routes to ``server.routes``."""
    with ImageServer() as server:
        yield server


@pytest.fixture
def serve_images(image_server):
    """serve_images(n) -> list of (url, caption, jpeg bytes) for n generated images."""
    def make(n, prefix="img", seed=0):
        items = []
        for i in range(n):
            image, caption = synthetic_image(seed * 100000 + i)
            body = encode(image)
            path = f"/{prefix}/{i}.jpg"
            image_server.routes[path] = Route(body)
            items.append((image_server.url(path), caption, body))
        return items
    return make



def ledger(root):
    """Every ledger row of a finished run, in file order."""
    return [r for f in sorted(glob.glob(os.path.join(root, "metadata", "*.parquet")))
            for r in pq.read_table(f).to_pylist()]


def shard_keys(root):
    """The sample keys of a finished run's shards, as a WebDataset reader sees them."""
    import webdataset as wds

    shards = sorted(glob.glob(os.path.join(root, "shards", "*.tar")))
    return [s["__key__"] for s in wds.WebDataset(shards, shardshuffle=False)] if shards else []

def generated_rows(server, n, prefix, seed):
    """(routes, rows) for n generated images under /PREFIX/i.jpg: a route table to serve, and input rows."""
    routes, rows = {}, []
    for i in range(n):
        image, caption = synthetic_image(seed + i)
        routes[f"/{prefix}/{i}.jpg"] = Route(encode(image))
        rows.append({"url": server.url(f"/{prefix}/{i}.jpg"), "caption": caption})
    return routes, rows


def write_parquet(path, rows, row_group_size=None):
    """Write rows (list of dicts) as a Parquet input list."""
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, str(path), row_group_size=row_group_size)
    return str(path)


@pytest.fixture
def parquet_input(tmp_path):
    def make(rows, name="input.parquet", row_group_size=None):
        return write_parquet(tmp_path / name, rows, row_group_size)
    return make
