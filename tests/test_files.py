"""The shard reader (transforms/files.iter_samples) returns exactly the bytes tarfile extracts."""
from __future__ import annotations

import gzip
import io
import os
import tarfile

import pytest

from paircurate.transforms import files
from paircurate.transforms.files import OversizedMember, iter_samples


def tar_of(members, tar_format):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tar_format) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def reference(data):
    """(key, {ext: bytes}) by tarfile's random-access reader, for comparison."""
    samples = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for info in tar:
            key, ext = files.split_member(info.name)
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = tar.extractfile(info).read()
    return samples


# Sizes either side of the reader's buffer and of tar's 512-byte blocks, so members
# start, end and straddle buffer refills at every offset that matters.
BUFFER = files._TAR_BUFFER
SIZES = [0, 1, 511, 512, 513, BUFFER - 513, BUFFER - 512, BUFFER - 1, BUFFER, BUFFER + 1,
         BUFFER + 511, 2 * BUFFER + 700, 3 * BUFFER]


def members(long_names=False):
    out = []
    for i, size in enumerate(SIZES):
        key = ("d" * 120 + "/" if long_names else "") + f"{i:09d}"
        out.append((f"{key}.jpg", os.urandom(size)))
        out.append((f"{key}.txt", f"caption {i}".encode()))
    return out


@pytest.mark.parametrize("tar_format,long_names", [(tarfile.USTAR_FORMAT, False),
                                                   (tarfile.GNU_FORMAT, False), (tarfile.GNU_FORMAT, True),
                                                   (tarfile.PAX_FORMAT, False), (tarfile.PAX_FORMAT, True)])
@pytest.mark.parametrize("compress", [False, True])
def test_members_across_buffer_boundaries_read_as_tarfile_extracts_them(tar_format, long_names, compress):
    data = tar_of(members(long_names), tar_format)
    expected = reference(data)
    stream = gzip.compress(data) if compress else data
    assert list(iter_samples(io.BytesIO(stream))) == expected
    assert len(expected) == len(SIZES)


def test_oversized_and_skipped_members_keep_the_stream_in_step():
    data = tar_of(members(), tarfile.GNU_FORMAT)
    limit = BUFFER
    got = list(iter_samples(io.BytesIO(data), extensions={"jpg"}, max_member_bytes=limit))
    for (key, sample), (ref_key, ref) in zip(got, reference(data)):
        assert key == ref_key and set(sample) == {"jpg"}
        if len(ref["jpg"]) > limit:
            assert sample["jpg"] == OversizedMember(f"{key}.jpg", len(ref["jpg"]))
        else:
            assert sample["jpg"] == ref["jpg"]
    assert len(got) == len(SIZES)
