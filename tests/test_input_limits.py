"""Cheap checks first, and oversized inputs as WorkbenchErrors (issue 10, items 7 and 8):
images over PIL's pixel limit or with corrupt data, prompts far over the context, absurd
dataset sizes."""
from __future__ import annotations

import io
import struct
import warnings
import zlib

import pytest
from PIL import Image

from workbench.conditions import load_image
from workbench.errors import WorkbenchError


# -- images ------------------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int) -> bytes:
    """A few dozen bytes: a PNG header that declares ``width x height`` RGB pixels, and almost no data."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + _chunk(b"IEND", b""))


def real_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_a_header_declaring_a_huge_image_is_refused_without_decoding(tmp_path):
    f = tmp_path / "bomb.png"
    f.write_bytes(png_declaring(100_000, 100_000))
    assert f.stat().st_size < 100
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(WorkbenchError) as err:
        load_image(f)
    assert "10000000000 pixels" in err.value.message and f"limit of {limit} pixels" in err.value.message
    assert str(f) in err.value.message and "downscale" in err.value.fix


def test_over_the_warning_limit_is_an_error_too_and_the_limit_is_left_alone(tmp_path, monkeypatch):
    """PIL only warns between MAX_IMAGE_PIXELS and twice that, and then decodes the whole image."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # so a 40 x 40 image (1600 pixels) is "large"
    f = tmp_path / "big.png"
    f.write_bytes(real_png(40, 40))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(WorkbenchError, match=r"1600 pixels, over the limit of 1000 pixels"):
            load_image(f)
    assert caught == []  # no DecompressionBombWarning printed either
    assert Image.MAX_IMAGE_PIXELS == 1000
    small = tmp_path / "small.png"
    small.write_bytes(real_png(20, 20))
    assert load_image(small).size == (20, 20)
    # the caller's warning filters are untouched: PIL's warning still only warns outside load_image
    with pytest.warns(Image.DecompressionBombWarning):
        Image.open(f).close()


@pytest.mark.parametrize(
    "name, data",
    [
        ("truncated", real_png(64, 64)[:-40]),
        ("header only", png_declaring(8, 8)),  # declares 8 x 8 pixels, holds 16 bytes
        ("empty", b""),
        ("not an image", b"GIF89a" + b"\0" * 20),
        ("garbage", b"\x89PNG\r\n\x1a\n" + b"\xff" * 64),
    ],
)
def test_truncated_or_corrupt_images(tmp_path, name, data):
    f = tmp_path / "x.png"
    f.write_bytes(data)
    with pytest.raises(WorkbenchError, match="cannot read image") as err:
        load_image(f)
    assert str(f) in err.value.message and "\n" not in err.value.message
