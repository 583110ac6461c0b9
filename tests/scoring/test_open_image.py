"""``max_pixels`` decides which headers are decoded, above Pillow's own decompression-bomb limit as below it."""

import io
import struct
import zlib

import pytest
from PIL import Image

from pipeline.scoring.preprocess import ImageError, PreprocessConfig, decode_image, open_image

WIDTH, HEIGHT = 20_000, 10_000  # 200 MP: over Pillow's hard limit (2 * MAX_IMAGE_PIXELS = 178,956,970)


def _png_header(width: int, height: int) -> bytes:
    """A PNG of an IHDR and no pixel data: nothing to decode, so the test allocates nothing."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def _tiff_header(width: int, height: int) -> bytes:
    """An 8x8 TIFF whose tags declare ``width`` x ``height``: Pillow checks the size again when it loads a TIFF."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "TIFF")
    data = bytearray(buffer.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for entry in range(ifd + 2, ifd + 2 + 12 * struct.unpack_from("<H", data, ifd)[0], 12):
        tag = struct.unpack_from("<H", data, entry)[0]
        if tag in (256, 257, 278):  # ImageWidth, ImageLength, RowsPerStrip, as LONGs
            struct.pack_into("<HHII", data, entry, tag, 4, 1, width if tag == 256 else height)
    return bytes(data)


@pytest.fixture
def pillow_limit(monkeypatch):
    """Pillow's module-global limit, put back after the test (accepting a 200 MP image raises it)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    return Image.MAX_IMAGE_PIXELS


@pytest.mark.parametrize("header", [_png_header, _tiff_header], ids=["png", "tiff"])
def test_max_pixels_above_pillows_limit_lets_a_larger_header_through(header, pillow_limit):
    data = header(WIDTH, HEIGHT)
    assert WIDTH * HEIGHT > 2 * pillow_limit
    assert open_image(data, max_pixels=300_000_000).size == (WIDTH, HEIGHT)
    with pytest.raises(ImageError) as refused:  # the header is all there is: the decoder finds no pixels
        decode_image(data, PreprocessConfig(max_pixels=300_000_000))
    assert str(refused.value).startswith("truncated or corrupt image data")
    assert "bomb" not in str(refused.value) and "over the limit" not in str(refused.value)


@pytest.mark.parametrize(("max_pixels", "note"), [(199_999_999, ""),
                                                  (99_999_999, ", more than twice: a likely decompression bomb")])
def test_max_pixels_below_the_size_refuses_it_with_the_projects_message(max_pixels, note, pillow_limit):
    message = f"image is 20000x10000 = 200000000 pixels, over the limit of {max_pixels} (max_pixels){note}"
    for header in (_png_header, _tiff_header):
        with pytest.raises(ImageError) as refused:
            decode_image(header(WIDTH, HEIGHT), PreprocessConfig(max_pixels=max_pixels))
        assert str(refused.value) == message
    assert Image.MAX_IMAGE_PIXELS == pillow_limit  # nothing allowed past Pillow's limit: left as it was
