import io

from PIL import Image

from paircurate.demo import encode, synthetic_image
from paircurate.transforms.resize import ImageConfig, decode_and_resize, make_resizer, probe_size
from paircurate.transforms.schema import new_record


def rec(raw):
    record = new_record("u1", "http://h", "caption", "s", 0, {})
    record["raw"] = raw
    return record


def bomb_png(width, height):
    # A tiny file that claims an enormous size: decoding it would need width*height pixels.
    image = Image.new("1", (width, height))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def test_resize_border_to_square():
    config = ImageConfig(image_size=64)
    image, _ = synthetic_image(1, (300, 150))
    out = decode_and_resize(rec(encode(image)), make_resizer(config), config)
    assert out["status"] == "ok"
    assert (out["width"], out["height"]) == (64, 64)
    assert (out["original_width"], out["original_height"]) == (300, 150)
    assert Image.open(io.BytesIO(out["image"])).size == (64, 64)
    assert out["image_format"] == "jpg"


def test_resize_keep_ratio_and_png():
    config = ImageConfig(image_size=50, resize_mode="keep_ratio", encode_format="png", encode_quality=6)
    image, _ = synthetic_image(2, (200, 100))
    out = decode_and_resize(rec(encode(image)), make_resizer(config), config)
    decoded = Image.open(io.BytesIO(out["image"]))
    assert decoded.format == "PNG" and decoded.size == (100, 50)


def test_corrupt_and_non_images_are_decode_failed():
    config = ImageConfig(image_size=32)
    resizer = make_resizer(config)
    image, _ = synthetic_image(3, (120, 120))
    body = encode(image)
    assert decode_and_resize(rec(b"<html></html>"), resizer, config)["error"].startswith("unidentified")
    truncated = decode_and_resize(rec(body[:300]), resizer, config)
    assert truncated["status"] == "decode_failed"
    assert decode_and_resize(rec(b""), resizer, config)["error"] == "empty"
    garbage = body[:20] + bytes(range(256)) * 4
    assert decode_and_resize(rec(garbage), resizer, config)["status"] == "decode_failed"


def test_decompression_bomb_refused_before_decoding():
    config = ImageConfig(image_size=32, max_image_pixels=10_000_000)
    raw = bomb_png(20000, 20000)
    assert len(raw) < 100_000
    out = decode_and_resize(rec(raw), make_resizer(config), config)
    assert out["status"] == "decode_failed"
    assert out["error"].startswith("decompression_bomb")
    assert out["image"] is None


def test_size_rules():
    config = ImageConfig(image_size=32, min_image_size=100, max_aspect_ratio=2.0)
    resizer = make_resizer(config)
    small, _ = synthetic_image(4, (80, 120))
    wide, _ = synthetic_image(5, (400, 120))
    assert decode_and_resize(rec(encode(small)), resizer, config)["error"] == "too_small"
    out = decode_and_resize(rec(encode(wide)), resizer, config)
    assert (out["status"], out["error"]) == ("size_filtered", "aspect_ratio")
    assert out["original_width"] == 400


def test_probe_size_reads_header_only():
    image, _ = synthetic_image(6, (321, 123))
    assert probe_size(encode(image)) == ((321, 123), None)
