"""The GPU kit's weight pack (benchmarks/gpu_kit.py pack-weights, restore-weights, check-weights;
docs/gpu.md): the packaged ResNet50 weights (imgsim 0.1.2's model.pth, 100 MB) in fewer bytes, since the
GPU machine reaches no registry and a call carries at most 64 MiB.

Each conv kernel is quantised per output channel to `bits` (10) signed levels, its high and low bytes
xz-compressed apart, BatchNorm and biases kept in fp32; restored there to an fp32 checkpoint
(`restore-weights`, checked against the digest the pack records). A plain fp16 state dict does not fit:
47 MB raw, 40 MB xz-compressed, beside the data's 26 MB and the tree's ~2 MB. 10 bits: 28 MB, and
embeddings within `TOLERANCE` of the original weights' (`check-weights`: 0.34 % at most measured).

Only the standard library and numpy are imported at the top; torch and visrec where they are used.
"""

from __future__ import annotations

import hashlib
import json
import lzma
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

# Largest relative L2 difference allowed between an image's embedding from the restored weights and from
# the original ones (check-weights, tests/test_gpu_kit.py). Measured: 0.34 % at 128 px, 16 sample images.
TOLERANCE = 0.005
PACK_FORMAT = "visrec-weightpack/1"


@dataclass
class Pack:
    """A state dict in fewer bytes: conv kernels as per-output-channel integers of `meta["bits"]` bits
    (int16 here, split into high and low bytes), the other floats as they are."""

    meta: dict[str, Any]
    hi: np.ndarray  # uint8: the high bytes of every quantised value, tensor after tensor
    lo: np.ndarray  # uint8: the low bytes
    scales: np.ndarray  # float32: one per output channel of each quantised tensor
    raw: np.ndarray  # float32: the tensors kept as they are (BatchNorm, biases)
    ints: np.ndarray  # int64: integer tensors (BatchNorm's num_batches_tracked)


def quantise(state: dict[str, torch.Tensor], bits: int, source: dict[str, Any]) -> Pack:
    """Pack `state`: float tensors of two or more dimensions to `bits`-bit levels per output channel
    (the largest magnitude of each channel maps to the top level, so nothing is clipped)."""
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be 2..16, not {bits}")
    top = 2 ** (bits - 1) - 1
    entries, qs, scales, raws, ints = [], [], [], [], []
    for name, tensor in state.items():
        array = tensor.detach().cpu().numpy()
        entry: dict[str, Any] = {"name": name, "shape": list(array.shape), "dtype": str(array.dtype)}
        if array.dtype.kind == "f" and array.ndim >= 2:
            w = array.astype(np.float32).reshape(array.shape[0], -1)
            scale = (np.abs(w).max(axis=1) / top).astype(np.float32)
            scale[scale == 0] = 1
            qs.append(np.clip(np.rint(w / scale[:, None]), -top, top).astype(np.int16).ravel())
            scales.append(scale)
            entry["kind"] = "quantised"
        elif array.dtype.kind == "f":
            raws.append(array.astype(np.float32).ravel())
            entry["kind"] = "raw"
        else:
            ints.append(array.astype(np.int64).ravel())
            entry["kind"] = "int"
        entries.append(entry)
    q = np.concatenate(qs) if qs else np.empty(0, np.int16)
    halves = q.astype("<i2").view(np.uint8).reshape(-1, 2)
    pack = Pack(
        meta={
            "format": PACK_FORMAT,
            "bits": bits,
            "source": source,
            "tensors": entries,
            "compression": "none",
        },
        hi=np.ascontiguousarray(halves[:, 1]),
        lo=np.ascontiguousarray(halves[:, 0]),
        scales=np.concatenate(scales) if scales else np.empty(0, np.float32),
        raw=np.concatenate(raws) if raws else np.empty(0, np.float32),
        ints=np.concatenate(ints) if ints else np.empty(0, np.int64),
    )
    pack.meta["restored_sha256"] = state_digest(dequantise(pack))
    return pack


def dequantise(pack: Pack) -> dict[str, np.ndarray]:
    """The float32 (and integer) arrays a pack restores to, in the original order. Deterministic: the
    same bits on every machine (one float32 product per weight)."""
    q = np.stack([pack.lo, pack.hi], axis=1).reshape(-1).view("<i2")
    out: dict[str, np.ndarray] = {}
    qi = si = ri = ii = 0
    for entry in pack.meta["tensors"]:
        shape = tuple(entry["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        if entry["kind"] == "quantised":
            channels = shape[0]
            values = q[qi : qi + count].reshape(channels, -1).astype(np.float32)
            out[entry["name"]] = (values * pack.scales[si : si + channels, None]).reshape(shape)
            qi, si = qi + count, si + channels
        elif entry["kind"] == "raw":
            out[entry["name"]] = pack.raw[ri : ri + count].reshape(shape).astype(np.float32)
            ri += count
        else:
            out[entry["name"]] = pack.ints[ii : ii + count].reshape(shape).astype(entry["dtype"])
            ii += count
    return out


def state_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over each array's name, dtype, shape and bytes, in order."""
    digest = hashlib.sha256()
    for name, array in arrays.items():
        digest.update(json.dumps([name, str(array.dtype), list(array.shape)]).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def write_pack(pack: Pack, path: Path, preset: int | None = 6) -> None:
    """An .npz of the pack; with `preset`, the two byte streams xz-compressed at that preset."""
    meta = dict(pack.meta, compression="none" if preset is None else "xz")

    def stream(b: np.ndarray) -> np.ndarray:
        return b if preset is None else np.frombuffer(lzma.compress(b.tobytes(), preset=preset), np.uint8)

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez(
            f,
            meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
            hi=stream(pack.hi),
            lo=stream(pack.lo),
            scales=pack.scales,
            raw=pack.raw,
            ints=pack.ints,
        )


def read_pack(path: Path) -> Pack:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes())
        if meta.get("format") != PACK_FORMAT:
            raise ValueError(f"{path}: not a {PACK_FORMAT} file ({meta.get('format')!r})")

        def stream(name: str) -> np.ndarray:
            data = z[name]
            return data if meta["compression"] == "none" else np.frombuffer(lzma.decompress(data), np.uint8)

        return Pack(meta, stream("hi"), stream("lo"), z["scales"], z["raw"], z["ints"])


def backbone_state(source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The ResNet50 trunk's state (torchvision names, no `fc`: visrec trains its own) from `source`
    ('packaged': imgsim's sha256-checked file; 'random': seeded, for tiny kits), and what it is."""
    import torch

    from visrec.model import build_model, load_pretrained

    torch.manual_seed(0)
    model = build_model("resnet50", 2)
    info = load_pretrained(model, "resnet50", source)
    state = {k: v for k, v in model.backbone.state_dict().items() if not k.startswith("fc.")}
    return state, info.model_dump()


def restore(pack_path: Path, out: Path) -> dict[str, Any]:
    """Write the pack's fp32 checkpoint (torchvision layout, loadable as `TrainSettings.weights`) to `out`
    after checking it against the digest the pack records; returns the pack's metadata."""
    import torch

    pack = read_pack(pack_path)
    arrays = dequantise(pack)
    digest = state_digest(arrays)
    if digest != pack.meta["restored_sha256"]:
        raise ValueError(f"{pack_path}: restored weights' digest {digest} != {pack.meta['restored_sha256']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: torch.from_numpy(v.copy()) for k, v in arrays.items()}, out)
    return pack.meta


def compare_embeddings(restored: Path, image_size: int, images: int) -> dict[str, float]:
    """Embeddings (the 1000-d `fc` layer, seeded) and pooled features of `images` sample photos from
    the packaged weights and from the `restored` checkpoint: the largest and mean relative L2
    difference, and the smallest cosine."""
    import torch

    from visrec.images import ImageLimits, Preprocess, load_image, to_tensor
    from visrec.model import build_model, load_pretrained

    from common import SAMPLE_CATALOGUE, catalogue_rows

    rows = catalogue_rows()
    step = max(1, len(rows) // images)
    pre = Preprocess(input_size=image_size)
    x = torch.stack(
        [
            to_tensor(load_image(str(SAMPLE_CATALOGUE.parent / r["image"]), ImageLimits()), pre)
            for r in rows[::step][:images]
        ]
    )

    def outputs(weights: str) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        model = build_model("resnet50", 2)
        load_pretrained(model, "resnet50", weights)
        model.eval()
        with torch.inference_mode():
            return model.embed(x), model.pooled(x)

    (e0, p0), (e1, p1) = outputs("packaged"), outputs(str(restored))
    rel = (e1 - e0).norm(dim=1) / e0.norm(dim=1)
    rel_pooled = (p1 - p0).norm(dim=1) / p0.norm(dim=1)
    cosine = torch.nn.functional.cosine_similarity(e0, e1, dim=1)
    return {
        "images": len(x),
        "image_size": image_size,
        "max_relative_l2": rel.max().item(),
        "mean_relative_l2": rel.mean().item(),
        "max_relative_l2_pooled": rel_pooled.max().item(),
        "min_cosine": cosine.min().item(),
        "tolerance": TOLERANCE,
    }
