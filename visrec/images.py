"""Images: read bytes (file or URL), decode once safely, preprocess as the model's manifest says.

Every failure becomes an `ImageError` with a reason a person can act on; batch loading turns those into
per-item failures so one bad photo never stops a run.
"""

from __future__ import annotations

import errno
import io
import logging
import math
import os
import stat
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from visrec.config import ApiSettings, IngestSettings
from visrec.errors import ImageError
from visrec.fetch import Fetcher
from visrec.manifest import Preprocess
from visrec.urls import FetchPolicy, is_url

log = logging.getLogger(__name__)

# Formats Pillow may decode here: what shops publish. Others (EPS runs Ghostscript, and a dozen rare
# formats with little-used parsers) are refused before any parser sees the bytes.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


_DEFAULT = IngestSettings()
ANY_FOLDER = (os.sep,)  # `ImageLimits.allowed_roots` for a resolved path anywhere, opened without links


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on one image: bytes read, pixels decoded, how remote images are fetched (defaults:
    IngestSettings' own), and where local ones may be opened.

    `allowed_roots`: None for files the operator names, opened as given; for a catalogue's photos, the
    folders they may lie in: a path must lie inside one, and is opened one folder at a time without
    following any symbolic link (`open_local`), so a file swapped for a link after the catalogue was read
    (and its paths resolved and checked) is refused when opened. `from_settings` gives `ANY_FOLDER`
    (no link anywhere on the way); `within` pins the catalogue's own folders."""

    max_pixels: int = _DEFAULT.max_image_pixels
    max_bytes: int = _DEFAULT.max_image_bytes
    fetch: FetchPolicy = FetchPolicy()
    allowed_roots: tuple[str, ...] | None = None

    def within(self, *roots: str | Path) -> ImageLimits:
        """These limits for photos that must lie inside `roots` (resolved), opened without links."""
        return replace(self, allowed_roots=tuple(os.path.realpath(root) for root in roots))

    @classmethod
    def from_settings(cls, ingest: IngestSettings) -> ImageLimits:
        """Catalogue photos, at sync and training: resolved paths, opened without following links."""
        fetch = FetchPolicy.from_settings(ingest)
        return cls(ingest.max_image_pixels, ingest.max_image_bytes, fetch, allowed_roots=ANY_FOLDER)

    @classmethod
    def for_uploads(cls, api: ApiSettings) -> ImageLimits:
        """Photos uploaded to the HTTP service (never fetched: a caller cannot make it fetch a URL)."""
        return cls(api.max_upload_pixels, api.max_upload_bytes)


def read_image_bytes(ref: str, limits: ImageLimits, fetcher: Fetcher | None = None) -> bytes:
    """The raw bytes of an image given as an absolute path or an http(s) URL (through `fetcher`, the
    caller's pooled client, or a one-off one). Raises `ImageError`."""
    if is_url(ref):
        if fetcher is None:
            one_off = Fetcher(limits.fetch)
            try:
                return one_off.fetch(ref, limits.max_bytes)
            finally:
                one_off.close()
        return fetcher.fetch(ref, limits.max_bytes)
    return read_local_image(ref, limits)


def read_local_image(ref: str, limits: ImageLimits) -> bytes:
    """The raw bytes of a local image file, at most `limits.max_bytes`. Raises `ImageError`."""
    with open_local(ref, limits.allowed_roots) as file:
        size = os.fstat(file.fileno()).st_size
        if size > limits.max_bytes:
            raise ImageError(f"{ref}: {size} bytes, above the limit of {limits.max_bytes}")
        try:
            data = file.read(limits.max_bytes + 1)
        except OSError as exc:
            raise ImageError(f"{ref}: cannot read: {exc.strerror or exc}") from exc
    if len(data) > limits.max_bytes:  # it grew since fstat
        raise ImageError(f"{ref}: more than {limits.max_bytes} bytes, above the limit")
    return data


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def open_local(ref: str, roots: Sequence[str] | None = None) -> BinaryIO:
    """A local image file opened for reading; raises `ImageError` (missing, not a regular file, a link
    where none may be, outside `roots`).

    With `roots` (resolved folders), the path must lie inside one of them and is opened from the file
    system's root one folder at a time, each with O_NOFOLLOW: no symbolic link is followed anywhere on
    the way, so what is opened is the file at that very path, inside the root, whatever was swapped
    since the path was checked. Catalogue paths are stored resolved (links followed once, when the
    catalogue was read and checked), so a link found now is a swap. A FIFO or a device is refused
    without blocking (O_NONBLOCK, then fstat). Without `roots`, the path is opened as given.
    """
    try:
        if roots is None:
            fd = os.open(ref, os.O_RDONLY | os.O_NONBLOCK | _CLOEXEC)
        else:
            fd = _open_without_links(ref, roots)
    except ImageError:
        raise
    except FileNotFoundError as exc:
        raise ImageError(f"{ref}: file not found") from exc
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        if isinstance(exc, OSError) and exc.errno in (errno.ELOOP, errno.EMLINK):
            raise ImageError(
                f"{ref}: a symbolic link, refused (the catalogue's photos are opened without links)"
            ) from exc
        if isinstance(exc, OSError) and exc.errno == errno.ENOTDIR:
            raise ImageError(f"{ref}: file not found") from exc
        raise ImageError(f"{ref}: cannot read: {getattr(exc, 'strerror', None) or exc}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or a device would block or never end
            raise ImageError(f"{ref}: not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _open_without_links(ref: str, roots: Sequence[str]) -> int:
    """`ref`, inside one of `roots`, opened component by component with O_NOFOLLOW."""
    if not _NOFOLLOW or os.open not in os.supports_dir_fd:
        raise ImageError(f"{ref}: this system cannot open files without following links")
    path = os.path.abspath(ref)
    if not any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots):
        raise ImageError(f"{ref}: outside the catalogue's folder and the image roots")
    parts = [part for part in path.split(os.sep) if part]
    if not parts:
        raise ImageError(f"{ref}: not a regular file")
    folder = os.open(os.sep, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = os.O_RDONLY | _NOFOLLOW | _CLOEXEC | (os.O_NONBLOCK if last else _DIRECTORY)
            try:
                inner = os.open(part, flags, dir_fd=folder)
            except OSError as exc:
                # A link met with O_NOFOLLOW: ELOOP, or ENOTDIR where a folder was expected.
                if exc.errno in (errno.ELOOP, errno.EMLINK, errno.ENOTDIR) and _is_link(part, folder):
                    raise OSError(errno.ELOOP, "a symbolic link") from exc
                raise
            if last:
                return inner
            os.close(folder)
            folder = inner
        raise AssertionError("unreachable: the last part returns")
    finally:
        os.close(folder)


def _is_link(name: str, folder: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode)
    except OSError:
        return False


def decode_image(
    data: bytes, limits: ImageLimits, name: str = "image", draft: int | None = None
) -> Image.Image:
    """Decode to an RGB image, EXIF orientation applied, pixel count bounded.

    `draft`: a JPEG may come back scaled down by libjpeg (1/2, 1/4 or 1/8, several times faster) as long
    as both sides stay ≥ `draft` pixels; every byte is still decoded, so corruption is still caught.
    Raises `ImageError` for empty, corrupt, truncated, non-image or oversized input.
    """
    if not data:
        raise ImageError(f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = image.size  # header only: checked before any pixel is decoded
            if width * height > limits.max_pixels:
                raise ImageError(f"{name}: {width}x{height} pixels, above the limit of {limits.max_pixels}")
            if draft:
                image.draft(None, (draft, draft))
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not an image in a supported format ({', '.join(IMAGE_FORMATS)})") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: decompression bomb refused ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # Pillow's truncated/corrupt-data errors
        raise ImageError(f"{name}: corrupt or truncated image ({exc})") from exc
    except Exception as exc:  # untrusted bytes reach many parsers: any failure is this image's, not the run's
        raise ImageError(f"{name}: cannot decode ({type(exc).__name__}: {exc})") from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith(("I", "F")):
        # 16-bit, 32-bit and float greyscale (either byte order): scale to 8 bits instead of clipping
        # everything to white; numpy reads every such mode, Pillow's own conversions do not.
        pixels = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        image = Image.fromarray(((pixels - lo) * scale).clip(0, 255).astype(np.uint8), "L")
    elif image.mode in {"RGBA", "LA", "PA"} or (image.mode == "P" and "transparency" in image.info):
        # Transparent product cut-outs go on white, as a shop shows them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_image(ref: str, limits: ImageLimits) -> Image.Image:
    """Read and decode one image by path or URL; raises `ImageError`."""
    return decode_image(read_image_bytes(ref, limits), limits, name=ref)


def _fit(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """Width and height with the long side scaled to `size`, and the left/top offsets centring them."""
    scale = size / max(width, height)
    fit_w, fit_h = max(1, round(width * scale)), max(1, round(height * scale))
    return fit_w, fit_h, (size - fit_w) // 2, (size - fit_h) // 2


def to_tensor(image: Image.Image, pre: Preprocess) -> torch.Tensor:
    """Fit the long side to the model's input size, pad to a square, normalise: a (3, S, S) tensor.

    The padding goes on after resizing: padding first turned a 1x40000 strip (40k pixels, within any
    pixel limit) into a 40000x40000 canvas of 4.8 GB.
    """
    size = pre.input_size
    fit_w, fit_h, left, top = _fit(*image.size, size)
    image = TF.resize(image, [fit_h, fit_w], InterpolationMode(pre.interpolation), antialias=True)
    if (fit_w, fit_h) != (size, size):
        image = ImageOps.expand(image, (left, top, size - fit_w - left, size - fit_h - top), pre.pad_fill)
    tensor = TF.pil_to_tensor(image)
    return TF.normalize(tensor.float().div_(255), list(pre.mean), list(pre.std))


def plain_jpeg(data: bytes) -> bool:
    """A JPEG that any decoder renders as Pillow does: 8-bit RGB or greyscale, no EXIF rotation.

    torchvision ignores EXIF orientation on CUDA and nvJPEG has no CMYK, so those stay with Pillow.
    Call it on bytes that `decode_image` accepted.
    """
    image = Image.open(io.BytesIO(data))
    return (
        image.format == "JPEG"
        and image.mode in {"RGB", "L"}
        and image.getexif().get(ExifTags.Base.Orientation, 1) == 1
    )


def preprocess_jpegs(encoded: Sequence[torch.Tensor], pre: Preprocess, device: torch.device) -> torch.Tensor:
    """Decode plain JPEGs (1-D uint8 tensors of their bytes) on `device`, nvJPEG on CUDA, and preprocess
    them there as `to_tensor` does: a (N, 3, S, S) batch on `device`.

    nvJPEG fails a whole batch for one JPEG it does not take (and takes fewer variants than libjpeg):
    such a batch is decoded by Pillow on the host instead, slower and the same.
    """
    try:
        with warnings.catch_warnings():
            # Deprecated in torchvision 0.29 for TorchCodec; it still is torchvision's nvJPEG path.
            warnings.simplefilter("ignore", DeprecationWarning)
            images = decode_jpeg(list(encoded), mode=ImageReadMode.RGB, device=device)
    except RuntimeError as exc:
        log.warning("decoding %d JPEGs on %s failed (%s); decoding on the host", len(encoded), device, exc)
        host = [to_tensor(decode_image(e.numpy().tobytes(), ImageLimits()), pre) for e in encoded]
        return torch.stack(host).to(device)
    size = pre.input_size
    fill = torch.tensor(pre.pad_fill, dtype=torch.float32, device=device).div_(255)
    batch = fill.view(1, 3, 1, 1).repeat(len(images), 1, size, size)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault((image.shape[1], image.shape[2]), []).append(i)
    for (height, width), members in by_shape.items():  # one resize per shape: catalogues repeat sizes
        fit_w, fit_h, left, top = _fit(width, height, size)
        group = torch.stack([images[i] for i in members]).float().div_(255)
        group = TF.resize(group, [fit_h, fit_w], InterpolationMode(pre.interpolation), antialias=True)
        batch[members, :, top : top + fit_h, left : left + fit_w] = group.clamp_(0, 1)
    return TF.normalize(batch, list(pre.mean), list(pre.std))


ImageItem = tuple[int, torch.Tensor | None, str | None, dict[str, Any]]  # (index, pixels, error, extras)
Annotate = Callable[[Image.Image], dict[str, Any]]  # more facts from the decoded image, e.g. its colour


class ImageDataset(Dataset[ImageItem]):
    """Images by reference, decoded once in DataLoader workers; a failure is returned, not raised.

    `annotate`, if given, runs on the same decoded image (no second decode) and its dict travels along.
    Each worker process fetches remote images through its own pooled client (`Fetcher`).
    """

    def __init__(
        self,
        refs: Sequence[str],
        pre: Preprocess,
        limits: ImageLimits,
        hflip_p: float = 0.0,
        annotate: Annotate | None = None,
    ) -> None:
        self.refs, self.pre, self.limits, self.hflip_p, self.annotate = refs, pre, limits, hflip_p, annotate
        self.fetcher = Fetcher(limits.fetch)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> ImageItem:
        ref = self.refs[index]
        try:
            tensor, image = self._load(ref)
            extras = self.annotate(image) if self.annotate else {}
        except ImageError as exc:
            return index, None, str(exc), {}
        except Exception as exc:  # whatever one image does, it fails alone and the run goes on
            return index, None, f"{ref}: {type(exc).__name__}: {exc}", {}
        return index, tensor, None, extras

    def _load(self, ref: str) -> tuple[torch.Tensor, Image.Image]:
        """The model's input for one image, and the decoded image (for `annotate`)."""
        image = decode_image(read_image_bytes(ref, self.limits, self.fetcher), self.limits, name=ref)
        tensor = to_tensor(image, self.pre)
        if self.hflip_p and torch.rand(()) < self.hflip_p:
            tensor = tensor.flip(-1)
        return tensor, image


class JpegPassThrough(ImageDataset):
    """For decoding on the embedding device: a plain JPEG comes back as its bytes (a 1-D uint8 tensor),
    any other image preprocessed here (a CMYK or rotated JPEG from its reduced-scale decode, which still
    covers the input size).

    Pillow still decodes every JPEG here, at a reduced scale: cheap, it refuses corrupt files with the
    same errors as the host path, and `annotate` gets its image.
    """

    def _load(self, ref: str) -> tuple[torch.Tensor, Image.Image]:
        data = read_image_bytes(ref, self.limits, self.fetcher)
        image = decode_image(data, self.limits, name=ref, draft=self.pre.input_size)
        if plain_jpeg(data):
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), image
        return to_tensor(image, self.pre), image


@dataclass
class ImageBatch:
    """Indices into the dataset of the images that decoded, and their extras: first those in `pixels`,
    then those in `encoded` (JPEG bytes left for the device to decode); then the failures."""

    indices: list[int]
    pixels: torch.Tensor
    failures: list[tuple[int, str]]
    extras: list[dict[str, Any]]
    encoded: list[torch.Tensor]

    def pin_memory(self) -> ImageBatch:
        self.pixels = self.pixels.pin_memory()
        return self


def collate_images(items: list[ImageItem]) -> ImageBatch:
    """DataLoader collate: stack the decoded images, keep encoded ones apart, set the failures aside."""
    decoded = [(i, t, extra) for i, t, _, extra in items if t is not None and t.dim() == 3]
    encoded = [(i, t, extra) for i, t, _, extra in items if t is not None and t.dim() == 1]
    failures = [(i, error) for i, t, error, _ in items if t is None and error is not None]
    pixels = torch.stack([t for _, t, _ in decoded]) if decoded else torch.empty(0)
    good = decoded + encoded
    return ImageBatch(
        [i for i, _, _ in good], pixels, failures, [extra for _, _, extra in good], [t for _, t, _ in encoded]
    )


class AugmentedImages(ImageDataset):
    """Product-photo augmentation: a mirror and a random square crop keeping ≥ `crop_scale` of the area,
    resized back. Geometry only: colour stays exact."""

    def __init__(
        self, refs: Sequence[str], pre: Preprocess, limits: ImageLimits, hflip: float, crop_scale: float
    ):
        super().__init__(refs, pre, limits, hflip_p=hflip)
        self.crop_scale = crop_scale

    def __getitem__(self, index: int) -> ImageItem:
        index, tensor, error, extras = super().__getitem__(index)
        if tensor is None or self.crop_scale >= 1:
            return index, tensor, error, extras
        size = tensor.shape[-1]
        scale = self.crop_scale + (1 - self.crop_scale) * torch.rand(()).item()
        side = max(1, round(size * math.sqrt(scale)))
        top, left = (int(v) for v in torch.randint(0, size - side + 1, (2,)))
        return (
            index,
            TF.resized_crop(tensor, top, left, side, side, [size, size], antialias=True),
            error,
            extras,
        )
