"""decode_image: read_image's pixels and errors through the fast paths (simplejpeg, OpenCV's PNG
without PIL's header pass), and the loader workers' heap setting."""

import resource
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import ssageo.data.decode as decode
from ssageo.data.decode import decode_image
from ssageo.io import DataError, read_image
from test_io_decode import _textured

FILES = [  # name, PIL mode saved, save options, decoded by decode_image itself for mode "RGB"/"L"
    ("rgb420.jpg", "RGB", {"quality": 90}, ("RGB",)),
    ("rgb444.jpg", "RGB", {"quality": 95, "subsampling": 0}, ("RGB",)),
    ("progressive.jpg", "RGB", {"quality": 90, "progressive": True}, ("RGB",)),
    ("grey.jpg", "L", {"quality": 90}, ("RGB", "L")),
    ("rgb.png", "RGB", {}, ("RGB",)),
    ("grey.png", "L", {}, ("RGB", "L")),
    ("palette.png", "P", {}, ()),   # read_image's (PIL's) path
    ("rgba.png", "RGBA", {}, ()),
    ("grey16.png", "I;16", {}, ()),
]


@pytest.mark.parametrize("name,pil_mode,save,fast", FILES)
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_decoded_pixels_equal_read_images(tmp_path, monkeypatch, name, pil_mode, save, fast,
                                          mode):
    path = tmp_path / name
    image = Image.fromarray(_textured(96, 160))
    image = image.convert("L").convert("I;16") if pil_mode == "I;16" else image.convert(pil_mode)
    image.save(path, **save)
    want = read_image(path, mode)
    if mode in fast:  # the fast path decodes it alone: read_image is never called
        def refuse(*args, **kwargs):
            raise AssertionError("read_image called")

        monkeypatch.setattr(decode, "read_image", refuse)
    got = decode_image(path, mode)
    assert got.dtype == np.uint8 and got.flags.writeable and got.flags.c_contiguous
    assert got.shape == want.shape and np.array_equal(got, want)


def test_bad_files_raise_read_images_errors(tmp_path, monkeypatch):
    cut, missing, empty = tmp_path / "cut.jpg", tmp_path / "none.jpg", tmp_path / "empty.png"
    Image.fromarray(_textured(256, 256)).save(cut, quality=95)
    cut.write_bytes(cut.read_bytes()[:-3000])  # libjpeg alone would pad it with grey
    empty.write_bytes(b"")
    for path, message in ((cut, "cannot decode image"), (missing, "image file is missing"),
                          (empty, "image file is empty")):
        with pytest.raises(DataError, match=f"^{path}: {message}"):
            decode_image(path)
    big = tmp_path / "big.png"
    Image.fromarray(_textured(64, 64)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's decompression-bomb limit
    with pytest.raises(DataError, match=f"^{big}: image too large to decode safely"):
        decode_image(big)


def test_reduced_jpeg_decoding_is_read_images(tmp_path):
    path = tmp_path / "pano.jpg"
    Image.fromarray(_textured(128, 512)).save(path, quality=90)
    got = decode_image(path, min_size=(64, 256))
    assert got.shape == (64, 256, 3) and np.array_equal(got, read_image(path, min_size=(64, 256)))


class _Faults(Dataset):
    """In a worker: the page faults of a third round of five 1.7 MB image buffers (a CVUSA
    tile's size) alive together, after two such rounds were freed."""

    def __init__(self, path):
        self.path = path

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i):
        decode_image(self.path)
        faults = []
        for _ in range(3):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            images = [np.ones((750, 750, 3), np.uint8) for _ in range(5)]
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            del images
        return torch.tensor(faults[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt: Linux only")
def test_loader_workers_reuse_freed_image_buffers(tmp_path):
    path = tmp_path / "tile.png"
    Image.fromarray(_textured(64, 64)).save(path)
    faults = next(iter(DataLoader(_Faults(path), num_workers=1)))
    # glibc by default returns the freed heap top to the kernel: ~2,000 faults for 8.4 MB
    assert int(faults) < 100
