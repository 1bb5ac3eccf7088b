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
    """What iter_samples should give, by tarfile: regular files with an extension, hidden ones left out."""
    samples = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for info in tar:
            key, ext = files.split_member(info.name)
            if not info.isfile() or not ext or os.path.basename(info.name).startswith("."):
                continue
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


def test_links_directories_hidden_files_and_odd_names_read_as_tarfile_reads_them():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "global"}) as tar:
        def add(name, data=b"", kind=tarfile.REGTYPE, **extra):
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(data) if kind == tarfile.REGTYPE else 0
            for attr, value in extra.items():
                setattr(info, attr, value)
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        add("shard", kind=tarfile.DIRTYPE)
        add("shard/0001.jpg", b"\xff\xd8 one")
        add("shard/0001.txt", "caf\u00e9 cr\u00e8me".encode())
        add("shard/0001.json", b"{}")
        add("shard/0002.jpg", kind=tarfile.SYMTYPE, linkname="0001.jpg")
        add("shard/0002.txt", kind=tarfile.LNKTYPE, linkname="shard/0001.txt")
        add("shard/.hidden.txt", b"not a sample")
        add("shard/README", b"no extension")
        add("shard/fifo.txt", kind=tarfile.FIFOTYPE)
        add("shard/\u00e9t\u00e9/0003.jpg", b"non-ASCII folder")  # pax path record
        add("shard/" + "x" * 150 + "/0004.jpg", b"long name")  # pax path record
        add("shard/0005.jpg", b"\x00" * 513)
    data = buf.getvalue()
    expected = reference(data)
    assert [k for k, _ in expected] == ["shard/0001", "shard/\u00e9t\u00e9/0003", "shard/" + "x" * 150 + "/0004",
                                        "shard/0005"]
    assert list(iter_samples(io.BytesIO(data))) == expected


def test_ustar_prefix_base256_sizes_and_undecodable_names_read_as_tarfile_reads_them():
    def header(name: bytes, size: int, prefix: bytes = b"", base256: bool = False, signed: bool = False) -> bytes:
        block = bytearray(plain_header("x", size))
        block[0:100] = name.ljust(100, b"\0")
        block[345:500] = prefix.ljust(155, b"\0")
        if base256:
            block[124:136] = b"\x80" + size.to_bytes(11, "big")
        return with_checksum(block, signed)

    def member(name, data, **kw):
        return header(name, len(data), **kw) + data + bytes(-len(data) % 512)

    data = (member(b"0001.jpg", b"image", prefix=b"some/folder") + member(b"0001.txt", b"caption", base256=True)
            + member(b"caf\xe9.txt", b"latin-1 name") + member(b"\xe9t\xe9.txt", b"signed", signed=True)
            + bytes(1024))
    expected = reference(data)
    assert [k for k, _ in expected] == ["some/folder/0001", "0001", "caf\udce9", "\udce9t\udce9"]
    assert list(iter_samples(io.BytesIO(data))) == expected


def three_samples(tar_format=tarfile.GNU_FORMAT):
    return tar_of([(f"{i:05d}.{ext}", b"x" * 700 if ext == "jpg" else b"caption") for i in range(3)
                   for ext in ("jpg", "txt")], tar_format)


def test_a_damaged_header_after_the_first_is_reported_not_taken_for_the_end():
    """tarfile's reader ends the archive without a word at a bad header after the first: the
    samples after it would be lost unseen.  Here the damage is an error, after what came before."""
    data = bytearray(three_samples())
    at = data.find(b"00001.jpg")
    data[at + 200] ^= 0xFF  # inside the header of sample 1's image: its checksum no longer holds
    with tarfile.open(fileobj=io.BytesIO(bytes(data)), mode="r|") as tar:
        assert len(list(tar)) == 2  # tarfile: two members, then a quiet end
    got = []
    with pytest.raises(files.CorruptShard, match=f"bad checksum in the header at byte {at}") as raised:
        for sample in iter_samples(io.BytesIO(bytes(data))):
            got.append(sample)
    assert [k for k, _ in got] == [] and raised.value.pending == "00000"  # sample 0 was being collected
    # Cut inside a header, inside a member's data, or inside its padding: each is an error too.
    whole = three_samples()
    second = whole.find(b"00001.jpg")
    for cut in (second + 100, second + 512 + 300, second + 512 + 750):
        with pytest.raises(files.CorruptShard):
            list(iter_samples(io.BytesIO(whole[:cut])))
    # The end of the stream right after a member (no end-of-archive blocks) is an end.
    end = whole.find(b"00002.txt") + 1024
    assert [k for k, _ in iter_samples(io.BytesIO(whole[:end]))] == ["00000", "00001", "00002"]


def test_extended_headers_beyond_the_bound_are_refused():
    data = tar_of([("a" * (files.MAX_EXTENDED_HEADER + 10) + ".jpg", b"x")], tarfile.GNU_FORMAT)
    with pytest.raises(files.CorruptShard, match="extended header of"):
        list(iter_samples(io.BytesIO(data)))


@pytest.mark.parametrize("claimed,error", [("-5", "invalid pax size"), ("1000000000000000", "unexpected end of data"),
                                           ("five", "invalid pax size")])
def test_a_size_no_member_has_is_damage_and_allocates_nothing(claimed, error):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("0001.jpg")
        info.size, info.pax_headers = 3, {"size": claimed}
        tar.addfile(info, io.BytesIO(b"abc"))
    for limit in (None, 100):  # read whole (the report's reader) or refused as oversized (score's)
        with pytest.raises(files.CorruptShard, match=error):
            list(iter_samples(io.BytesIO(buf.getvalue()), max_member_bytes=limit))


def with_checksum(block, signed=False):
    """A header block with its checksum field set; some old tars summed the bytes as signed
    chars, and tarfile accepts either sum."""
    block = bytearray(block)
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(b - 256 if signed and b > 127 else b for b in block)
    return bytes(block)


def plain_header(name, size, kind=b"0"):
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


def padded(data):
    return data + bytes(-len(data) % 512)


MEMBER, END = plain_header("m.txt", 3) + padded(b"abc"), bytes(1024)


@pytest.mark.parametrize("record", [b"1" * 5000 + b" a=b\n",  # a length of 5,000 digits
                                    b"2 " * 20000 + b"=",  # quadratic for tarfile's old expression
                                    b"20 path=abcdef.txt\n",  # a length that is not the record's
                                    b"19 path=abcdef.txt\ngarbage", b"12 no-equals\n"])
def test_malformed_pax_records_are_damage(record):
    data = plain_header("p", len(record), b"x") + padded(record) + MEMBER + END
    with pytest.raises(files.CorruptShard, match="invalid pax header"):
        list(iter_samples(io.BytesIO(data)))


def test_solaris_extended_headers_and_pax_paths_read_as_tarfile_reads_them():
    for kind, record in ((b"X", b"19 path=abcdef.txt\n"), (b"x", b"21 path=dir/f.txt///\n")):
        data = plain_header("p", len(record), kind) + padded(record) + MEMBER + END
        expected = reference(data)
        assert expected and expected[0][0] in ("abcdef", "dir/f")
        assert list(iter_samples(io.BytesIO(data))) == expected


def test_a_negative_octal_size_is_damage():
    header = bytearray(plain_header("a.txt", 0))
    header[124:136] = b"-1000".ljust(11, b" ") + b"\0"
    header = with_checksum(header)
    with pytest.raises(files.CorruptShard, match="negative size"):
        list(iter_samples(io.BytesIO(bytes(header) + padded(b"y") + END)))


@pytest.mark.parametrize("magic", [b"BZh1", b"\x1f\x8b", b"\xfd7zXZ\x00"])
def test_a_plain_tar_whose_first_name_starts_like_a_compressed_stream_is_plain(magic):
    name = (magic + b"x.txt").decode("latin-1")  # xz's magic holds a NUL, which ends the name
    data = plain_header(name, 3) + padded(b"abc") + MEMBER + END
    expected = reference(data)
    assert expected[-1][0] == "m" and list(iter_samples(io.BytesIO(data))) == expected


def test_a_compressed_shard_whose_checksum_fails_is_damage():
    data = bytearray(gzip.compress(tar_of([("a.txt", b"AAAA" * 1000)], tarfile.GNU_FORMAT), compresslevel=0))
    at = data.find(b"AAAA")
    data[at] ^= 0x01  # one flipped bit in the member's bytes: only the gzip trailer's CRC tells
    with pytest.raises(files.CorruptShard, match="CRC|crc"):
        list(iter_samples(io.BytesIO(bytes(data))))
