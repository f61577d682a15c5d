"""read_image's OpenCV decoding: PIL's pixels, PIL's errors, and the reduced (DCT-scaled) decode."""

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from ssageo.data.transforms import resize
from ssageo.io import DataError, read_image


def _textured(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Photo-like RGB: smooth shading, edges (blocks) and fine noise, so JPEG has work to do."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([128 + 80 * np.sin(x / 37.0 + c) * np.cos(y / 23.0 - c) for c in range(3)], -1)
    blocks = rng.integers(0, 2, (h // 32 + 1, w // 32 + 1, 1)).repeat(32, 0).repeat(32, 1)
    img = img + 60 * blocks[:h, :w] + rng.normal(0, 12, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _pil(path, mode="RGB") -> np.ndarray:
    with Image.open(path) as img:
        return np.array(img.convert(mode))


@pytest.mark.parametrize("name,pil_mode,save", [
    ("rgb420.jpg", "RGB", {"quality": 90}),
    ("rgb444.jpg", "RGB", {"quality": 95, "subsampling": 0}),
    ("progressive.jpg", "RGB", {"quality": 90, "progressive": True}),
    ("grey.jpg", "L", {"quality": 90}),
    ("rgb.png", "RGB", {}),
    ("grey.png", "L", {}),
    ("palette.png", "P", {}),   # PIL's path (OpenCV would expand the palette its own way)
    ("rgba.png", "RGBA", {}),   # PIL's path
])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_decoded_pixels_equal_pils(tmp_path, name, pil_mode, save, mode):
    path = tmp_path / name
    Image.fromarray(_textured(96, 160)).convert(pil_mode).save(path, **save)
    got = read_image(path, mode)
    assert got.dtype == np.uint8 and got.flags.writeable and got.flags.c_contiguous
    assert np.array_equal(got, _pil(path, mode))


def test_exif_orientation_is_ignored_as_pil_does(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": OpenCV's imread would apply it by default
    Image.fromarray(_textured(64, 160)).save(path, quality=95, exif=exif.tobytes())
    got = read_image(path)
    assert got.shape == (64, 160, 3) and np.array_equal(got, _pil(path))


def test_truncated_files_are_refused_not_grey_filled(tmp_path):
    jpg, png = tmp_path / "cut.jpg", tmp_path / "cut.png"
    Image.fromarray(_textured(256, 256)).save(jpg, quality=95)
    Image.fromarray(_textured(256, 256)).save(png)
    # OpenCV decodes both without an error (libjpeg pads a cut JPEG with grey)
    jpg.write_bytes(jpg.read_bytes()[:-3000])
    png.write_bytes(png.read_bytes()[:-12])  # only the IEND chunk is missing
    assert cv2.imread(str(jpg)) is not None
    with pytest.raises(DataError, match=f"{jpg}: cannot decode image \\(image file is truncated"):
        read_image(jpg)
    # a PNG without IEND goes to PIL, which decodes what is there or names the file
    try:
        assert np.array_equal(read_image(png), _pil(png))
    except DataError as exc:
        assert str(exc).startswith(f"{png}: cannot decode image")


def test_trailing_bytes_after_the_end_marker_still_decode(tmp_path):
    path = tmp_path / "trailer.jpg"
    buffer = io.BytesIO()
    Image.fromarray(_textured(64, 64)).save(buffer, format="JPEG", quality=90)
    path.write_bytes(buffer.getvalue() + b"camera trailer " * 50)
    assert np.array_equal(read_image(path), _pil(path))


def test_reduced_decode_stays_at_least_the_working_size(tmp_path):
    tile, pano = tmp_path / "tile.jpg", tmp_path / "pano.jpg"
    Image.fromarray(_textured(750, 750)).save(tile, quality=95)
    Image.fromarray(_textured(1024, 2048)).save(pano, quality=95)
    # CVUSA: 750 / 2 = 375 < 384, so the tile decodes in full; VIGOR's panorama at 1/2
    assert read_image(tile, min_size=(384, 384)).shape == (750, 750, 3)
    assert read_image(pano, min_size=(384, 768)).shape == (512, 1024, 3)
    assert read_image(pano, min_size=(100, 200)).shape == (128, 256, 3)  # 1/8
    grey = tmp_path / "grey.jpg"
    Image.fromarray(_textured(1024, 2048)).convert("L").save(grey, quality=95)
    assert read_image(grey, "L", min_size=(384, 768)).shape == (512, 1024)
    png = tmp_path / "tile.png"  # PNG has no DCT scaling: always decoded in full
    Image.fromarray(_textured(640, 640)).save(png)
    assert read_image(png, min_size=(64, 64)).shape == (640, 640, 3)


def test_reduced_decode_then_resize_is_close_to_full_decode_then_resize(tmp_path):
    """The reference decodes in full (cv2.imread) and resizes with INTER_LINEAR_EXACT. Libjpeg's
    1/2 scaling averages each 2x2 block in the DCT domain first, so the reduced result is the
    same picture with less aliased fine detail. On this image, whose per-pixel noise (sigma 12)
    is the worst case for aliasing, they differ by 3.4 grey levels of 255 on average (0.3-0.7 on
    ssageo synth's VIGOR-size panoramas) and the mean colour by < 0.5 level: smaller than what
    the colour jitter (+-15 %) moves, but not equal - hence ``data.decode: full`` stays the
    presets' default and ``reduced`` is an option."""
    path = tmp_path / "pano.jpg"
    Image.fromarray(_textured(1024, 2048, seed=1)).save(path, quality=95)
    full = resize(read_image(path), (384, 768)).astype(np.int16)
    reduced = resize(read_image(path, min_size=(384, 768)), (384, 768)).astype(np.int16)
    diff = np.abs(full - reduced)
    assert diff.mean() < 4.0, diff.mean()
    assert np.abs(full.mean(axis=(0, 1)) - reduced.mean(axis=(0, 1))).max() < 0.5
    assert diff.any()  # not the same pixels: the option is not a free lunch


def png_zlib_level(path) -> tuple[int, tuple[int, ...]]:
    """(the FLEVEL field of a PNG's zlib stream: 0 fastest .. 3 maximum compression, the row
    filter types used) of an 8-bit grey PNG."""
    import zlib

    data, at, stream = open(path, "rb").read(), 8, b""
    while at < len(data):  # chunks: length, type, data, CRC
        size = int.from_bytes(data[at:at + 4], "big")
        if data[at + 4:at + 8] == b"IDAT":
            stream += data[at + 8:at + 8 + size]
        at += 12 + size
    width = int.from_bytes(data[16:20], "big")
    rows = zlib.decompress(stream)
    return stream[1] >> 6, tuple(sorted(set(rows[::width + 1])))  # filter byte, then the row


def test_labels_are_written_to_decode_fast_with_the_same_pixels(tmp_path, synth_world):
    from ssageo.data.decode import decode_image
    from ssageo.data.transforms import resize_label
    from ssageo.io import write_image

    label = resize_label(((_textured(94, 94)[..., 0] > 128) * 255).astype(np.uint8), (750, 750))
    write_image(tmp_path / "label.png", label, label=True)
    write_image(tmp_path / "image.png", label)
    assert png_zlib_level(tmp_path / "label.png") == (1, (0,))  # zlib level 3, no filters
    assert png_zlib_level(tmp_path / "image.png")[0] == 2  # PIL's default, level 6
    for name in ("label.png", "image.png"):  # the same 8-bit grey 0/255 PNG, read alike
        assert np.array_equal(decode_image(tmp_path / name, mode="L"), label)
        assert np.array_equal(_pil(tmp_path / name, "L"), label)
    # `ssageo synth` writes its label maps so (`ssageo priors`: tests/test_priors.py)
    world = synth_world("cvusa")
    labels = (world / "sat_BEV_label").rglob("*.png")
    assert {png_zlib_level(p) for p in labels} == {(1, (0,))}
