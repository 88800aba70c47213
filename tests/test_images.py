from __future__ import annotations

import functools
import http.server
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visrec import images
from visrec.errors import ImageError
from visrec.images import (
    ImageDataset,
    ImageLimits,
    JpegPassThrough,
    Preprocess,
    collate_images,
    decode_image,
    load_image,
    preprocess_jpegs,
    to_tensor,
)
from visrec.urls import FetchPolicy

# The test servers listen on loopback, which the default fetch policy refuses.
LIMITS = ImageLimits(
    max_pixels=1_000_000, fetch=FetchPolicy(timeout_s=2, retries=2, allowed_hosts=("127.0.0.1",))
)


def _png(image: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def _damaged_png() -> bytes:
    """A real PNG whose compressed pixel data is overwritten: header fine, pixels corrupt."""
    data = bytearray(_png(Image.effect_noise((64, 64), 50).convert("RGB")))
    start = data.index(b"IDAT") + 20
    data[start : start + 200] = bytes(200)
    return bytes(data)


def _jpeg() -> bytes:
    rng = np.random.default_rng(0)
    return _png(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG", quality=90)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file"),
        (_damaged_png(), "corrupt"),
        (b"just some text, not a picture", "not an image in a supported format"),
        (_jpeg()[:400], "corrupt or truncated"),  # truncated JPEG
        (_png(Image.new("1", (2000, 2000))), "above the limit"),  # more pixels than allowed
    ],
    ids=["empty", "corrupt", "not-an-image", "truncated-jpeg", "too-many-pixels"],
)
def test_bad_images_raise_image_error(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        decode_image(data, LIMITS)


def test_missing_file_and_wrong_extension(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="file not found"):
        load_image(str(tmp_path / "nope.jpg"), LIMITS)
    (tmp_path / "really-a-png.jpg").write_bytes(_png(Image.new("RGB", (5, 5), "red")))
    assert load_image(str(tmp_path / "really-a-png.jpg"), LIMITS).getpixel((0, 0)) == (255, 0, 0)


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    decoded = decode_image(_png(image, "JPEG", exif=exif), LIMITS)
    assert decoded.size == (20, 40)


@pytest.mark.parametrize(
    ("image", "pixel"),
    [
        (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
        (Image.new("L", (4, 4), 128), (128, 128, 128)),
        (Image.new("RGBA", (4, 4), (0, 0, 0, 0)), (255, 255, 255)),  # transparent → white
        (Image.new("P", (4, 4), 0), (0, 0, 0)),
        (Image.new("I;16", (4, 4), 65535), (0, 0, 0)),  # flat 16-bit: no range to stretch
    ],
    ids=["cmyk", "grey", "rgba", "palette", "16-bit"],
)
def test_modes_become_rgb(image: Image.Image, pixel: tuple[int, int, int]) -> None:
    fmt = "TIFF" if image.mode == "CMYK" else "PNG"
    decoded = decode_image(_png(image, fmt), LIMITS)
    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == pixel


def test_to_tensor_pads_to_square_and_normalises() -> None:
    pre = Preprocess(input_size=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    tensor = to_tensor(Image.new("RGB", (40, 10), (0, 0, 0)), pre)
    assert tensor.shape == (3, 16, 16)
    assert torch.allclose(tensor[:, 0, 8], torch.ones(3))  # top band: white padding
    assert torch.allclose(tensor[:, 8, 8], torch.zeros(3))  # middle: the black product


def test_dataset_reports_failures_without_raising(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    good.write_bytes(_png(Image.new("RGB", (8, 8), "blue")))
    (tmp_path / "bad.png").write_bytes(b"garbage")
    refs = [str(good), str(tmp_path / "bad.png"), str(tmp_path / "missing.png"), str(good)]
    batch = collate_images([ImageDataset(refs, Preprocess(input_size=8), LIMITS)[i] for i in range(4)])
    assert batch.indices == [0, 3]
    assert batch.pixels.shape == (2, 3, 8, 8)
    assert [i for i, _ in batch.failures] == [1, 2]


def _photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth random photo (upscaled noise), so that resampling differences show."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


SIZES = [(256, 256), (256, 256), (300, 200), (97, 413), (32, 32), (40, 30), (1000, 700)]


def _encoded(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def test_jpegs_preprocessed_on_the_device_match_the_host_path() -> None:
    # torchvision's CPU decoder stands in for nvJPEG here: the same code path but the device.
    pre = Preprocess(input_size=32)
    jpegs = [_png(_photo(w, h, i), "JPEG", quality=90) for i, (w, h) in enumerate(SIZES)]
    on_device = preprocess_jpegs([_encoded(d) for d in jpegs], pre, torch.device("cpu"))
    host = torch.stack([to_tensor(decode_image(d, LIMITS), pre) for d in jpegs])
    assert on_device.shape == host.shape == (len(SIZES), 3, 32, 32)
    # Pillow resizes in 8 bits, torch in floats: at most about one grey level apart.
    assert (on_device - host).abs().max() < 0.03
    assert (on_device[4] == host[4]).all()  # already the input size: no resize, identical


def test_a_batch_the_device_refuses_is_decoded_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    # nvJPEG refusing a JPEG that libjpeg takes cannot happen on this machine's CPU decoder: simulated.
    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("nvjpegDecodeBatched failed")

    monkeypatch.setattr(images, "decode_jpeg", refuse)
    pre = Preprocess(input_size=16)
    jpegs = [_png(_photo(w, h, i), "JPEG") for i, (w, h) in enumerate(SIZES[:3])]
    decoded = preprocess_jpegs([_encoded(d) for d in jpegs], pre, torch.device("cpu"))
    assert torch.equal(decoded, torch.stack([to_tensor(decode_image(d, LIMITS), pre) for d in jpegs]))


def test_pass_through_leaves_only_plain_jpegs_encoded(tmp_path: Path) -> None:
    rotated = Image.Exif()
    rotated[0x0112] = 6
    files = {
        "plain.jpg": _png(_photo(64, 48, 0), "JPEG"),
        "grey.jpg": _png(_photo(64, 48, 1).convert("L"), "JPEG"),
        "cmyk.jpg": _png(_photo(64, 48, 2).convert("CMYK"), "JPEG"),
        "rotated.jpg": _png(_photo(64, 48, 3), "JPEG", exif=rotated),
        "photo.png": _png(_photo(64, 48, 4)),
        "truncated.jpg": _jpeg()[:400],
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    refs = [str(tmp_path / name) for name in files]
    dataset = JpegPassThrough(
        refs, Preprocess(input_size=16), LIMITS, annotate=lambda image: {"w": image.width}
    )
    batch = collate_images([dataset[i] for i in range(len(refs))])
    assert batch.indices == [2, 3, 4, 0, 1]  # decoded here first, then the encoded ones
    assert batch.pixels.shape == (3, 3, 16, 16)
    assert [bytes(e.numpy()) for e in batch.encoded] == [files["plain.jpg"], files["grey.jpg"]]
    assert [(i, "corrupt or truncated" in error) for i, error in batch.failures] == [(5, True)]
    # Pillow decoded every JPEG at half scale (a quarter of 48 px would not cover 16) for `annotate`;
    # the rotated one is turned upright (24 px wide).
    assert [extra["w"] for extra in batch.extras] == [32, 24, 64, 32, 32]


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[str]:
    """A real HTTP server on loopback serving tmp_path."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_url_images(tmp_path: Path, http_root: str) -> None:
    (tmp_path / "ok.png").write_bytes(_png(Image.new("RGB", (6, 6), "green")))
    assert load_image(f"{http_root}/ok.png", LIMITS).size == (6, 6)
    with pytest.raises(ImageError, match="HTTP 404"):
        load_image(f"{http_root}/missing.png", LIMITS)


def test_unreachable_url_fails_after_bounded_retries() -> None:
    with pytest.raises(ImageError, match="cannot connect"):
        load_image("http://127.0.0.1:9/x.png", LIMITS)  # discard port: nothing listens
