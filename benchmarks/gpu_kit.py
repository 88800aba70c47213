"""The GPU kit: what the lent GPU machine lacks for `scripts/gpu_run.sh`, and the checks and tables of
that run (docs/gpu.md). `scripts/gpu_kit.sh` builds the kit here; `scripts/gpu_run.sh` uses it there.

The GPU machine (one H200; Python 3.12 with torch 2.11 and torchvision 0.26) reaches no registry and
takes at most 64 MiB of files a call, working tree included. Of what the run needs it lacks:
- pydantic, pydantic-core, pydantic-settings and their small dependencies: carried as cp312 wheels
  (~2.9 MB). Not qdrant-edge-py (36 MB): the run measures embedding throughput without a sync and
  searches exactly (`quality.py --search exact`), so it needs no Qdrant engine;
- the packaged ResNet50 weights (imgsim 0.1.2's model.pth, 100 MB): carried as a *weight pack*, each
  conv kernel quantised per output channel to `bits` (10) signed levels, its high and low bytes
  xz-compressed apart, BatchNorm and biases kept in fp32; restored to an fp32 checkpoint there
  (`restore-weights`, checked against the digest the pack records). A plain fp16 state dict does not
  fit: 47 MB raw, 40 MB xz-compressed, beside the data's 26 MB and the tree's ~2 MB. 10 bits: 28 MB,
  and embeddings within `TOLERANCE` of the original weights' (`check-weights`: 0.34 % at most measured);
- Fashion-MNIST (Debian's dataset-fashion-mnist, 31 MB as gzip): the same idx files xz-compressed
  (26 MB), read as they are by `common.read_idx`.

Every file of the kit is listed in its SHA256SUMS (`sha256sum -c` reads it too). This module imports
only the standard library and numpy at the top, so the checksum and size steps run before anything is
installed; torch and visrec are imported where they are used.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib
import json
import lzma
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


ROOT = Path(__file__).resolve().parents[1]
SUMS = "SHA256SUMS"
WEIGHTS_FILE = "weights/imgsim-0.1.2-resnet50-q10.npz"  # under the kit
DATA_DIR = "fashion-mnist"  # under the kit
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# Largest relative L2 difference allowed between an image's embedding from the restored weights and from
# the original ones (check-weights, tests/test_gpu_kit.py). Measured: 0.34 % at 128 px, 16 sample images.
TOLERANCE = 0.005
PACK_FORMAT = "visrec-weightpack/1"
# The wheels the kit carries: the distributions visrec's GPU run imports that the machine lacks, each at
# its constraints.txt pin (scripts/gpu_kit.sh downloads them).
KIT_DISTRIBUTIONS = (
    "annotated-types",
    "pydantic",
    "pydantic-core",
    "pydantic-settings",
    "python-dotenv",
    "typing-extensions",  # pydantic-core 2.50 needs >= 4.16; the machine's may be older
    "typing-inspection",
)
# The GPU machine's Python packages (the device tool's KINDS.md, read on 2026-11-17): the dry run's
# emulated site holds only these and the kit's, so an import the GPU machine would fail fails here too.
ON_GPU_MACHINE = _words(
    """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
    certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
    cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils
    execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet
    httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax
    jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
    lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib
    mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
    networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
    nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
    nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink
    nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax
    opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
    pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
    pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
    pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
    scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
    shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
    tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
    torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
    typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
    zipp
    """
)
# What the run imports (preflight imports each: a missing one is one line, in seconds, not minutes in).
RUN_MODULES = (
    "numpy",
    "PIL",
    "torch",
    "torchvision",
    "pydantic",
    "pydantic_settings",
    "rich",
    "httpx",
    "visrec.config",
    "visrec.train",
    "visrec.embed",
    "visrec.ingest",
    "quality",
    "embed_throughput",
)


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- the weight pack ----------------------------------------------------------------------------------


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


# --- data ---------------------------------------------------------------------------------------------


def pack_data(source: Path, out: Path, preset: int = 9) -> None:
    """Fashion-MNIST's four idx .gz files (Debian's) as .xz files in `out`; each checked to decompress to
    the original bytes."""
    out.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES:
        original = gzip.decompress((source / f"{name}.gz").read_bytes())
        packed = lzma.compress(original, preset=preset)
        if lzma.decompress(packed) != original:
            raise ValueError(f"{name}: xz round trip failed")
        (out / f"{name}.xz").write_bytes(packed)


def tiny_data(out: Path, train: int, test: int) -> None:
    """A Fashion-MNIST of `train` + `test` images, taken from the bundled sample (itself Fashion-MNIST
    test images), for dry runs: the same files, xz-compressed as in the kit."""
    from PIL import Image

    from common import SAMPLE_CATALOGUE, catalogue_rows

    # The sample's category names, in Fashion-MNIST's label order (scripts/make_sample_catalogue.py).
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag"]
    names.append("Ankle boot")
    rows = catalogue_rows()
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))[: train + test]]
    pixels = np.stack(
        [np.asarray(Image.open(SAMPLE_CATALOGUE.parent / r["image"]).convert("L")) for r in rows]
    )
    labels = np.array([names.index(r["category"]) for r in rows], np.uint8)
    out.mkdir(parents=True, exist_ok=True)
    for prefix, part in (("train", slice(0, train)), ("t10k", slice(train, train + test))):
        images, classes = pixels[part], labels[part]
        header = b"\0\0\x08\x03" + b"".join(int(n).to_bytes(4, "big") for n in images.shape)
        (out / f"{prefix}-images-idx3-ubyte.xz").write_bytes(
            lzma.compress(header + images.tobytes(), preset=0)
        )
        header = b"\0\0\x08\x01" + len(classes).to_bytes(4, "big")
        (out / f"{prefix}-labels-idx1-ubyte.xz").write_bytes(
            lzma.compress(header + classes.tobytes(), preset=0)
        )


# --- checksums and sizes ------------------------------------------------------------------------------


def kit_files(kit: Path) -> list[Path]:
    return sorted(p for p in kit.rglob("*") if p.is_file() and p.name != SUMS)


def write_sums(kit: Path) -> None:
    """SHA256SUMS in `sha256sum` format, paths relative to the kit."""
    lines = [f"{sha256(p)}  {p.relative_to(kit).as_posix()}\n" for p in kit_files(kit)]
    (kit / SUMS).write_text("".join(lines))


def verify_sums(kit: Path) -> list[str]:
    """One line per problem: a listed file missing or changed, a file not listed."""
    sums = kit / SUMS
    if not sums.is_file():
        return [f"{sums}: missing (build the kit with scripts/gpu_kit.sh and carry it)"]
    problems, listed = [], set()
    for line in sums.read_text().splitlines():
        digest, name = line.split("  ", 1)
        listed.add(name)
        path = kit / name
        if not path.is_file():
            problems.append(f"{path}: listed in {SUMS} but missing")
        elif sha256(path) != digest:
            problems.append(f"{path}: sha256 differs from {SUMS} (damaged in transfer?)")
    problems += [f"{p}: not in {SUMS}" for p in kit_files(kit) if p.relative_to(kit).as_posix() not in listed]
    return problems


def tree_bytes(root: Path = ROOT) -> int:
    """What the device tool sends besides carried paths: tracked and untracked-not-ignored files (and a
    `shared/` folder in the checkout, where there is one)."""
    listed = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    files = {root / os.fsdecode(name) for name in listed if name}
    shared = root / "shared"
    if shared.is_dir():
        files |= {p for p in shared.rglob("*") if p.is_file()}
    return sum(p.stat().st_size for p in files if p.is_file() and not p.is_symlink())


def size_report(kit: Path, limit_mib: float) -> tuple[bool, str]:
    kit_b = sum(p.stat().st_size for p in kit.rglob("*") if p.is_file())
    tree_b = tree_bytes()
    parts = {
        d.name: sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
        for d in kit.iterdir()
        if d.is_dir()
    }
    total = (kit_b + tree_b) / 2**20
    detail = ", ".join(f"{name} {b / 2**20:.1f}" for name, b in sorted(parts.items()))
    line = (
        f"kit {kit_b / 2**20:.1f} MiB ({detail}) + working tree {tree_b / 2**20:.1f} MiB = {total:.1f} MiB "
        f"of the {limit_mib:g} MiB allowed (the device call carries at most 64 MiB)"
    )
    return total <= limit_mib, line


# --- the emulated GPU machine (dry runs) --------------------------------------------------------------


def emulate_site(out: Path, keep: Iterable[str] = ()) -> int:
    """A folder of links to this interpreter's installed packages that the GPU machine has too (or the
    kit carries, or `keep`): on `python -S` with it as PYTHONPATH, an import the GPU machine would fail
    fails here. Returns the number of distributions linked."""
    site = Path(sysconfig.get_paths()["purelib"])
    wanted = {_norm(n) for n in (*ON_GPU_MACHINE, *KIT_DISTRIBUTIONS, *keep)}
    out.mkdir(parents=True, exist_ok=True)
    linked = 0
    for info in sorted(site.glob("*.dist-info")):
        name = _metadata_name(info)
        record = info / "RECORD"
        if name is None or _norm(name) not in wanted or not record.is_file():
            continue
        tops = {line.split(",", 1)[0].split("/", 1)[0] for line in record.read_text().splitlines() if line}
        for top in tops | {info.name}:
            source, target = site / top, out / top
            if top and not top.startswith("..") and source.exists() and not target.exists():
                target.symlink_to(source)
        linked += 1
    return linked


def _metadata_name(info: Path) -> str | None:
    metadata = info / "METADATA"
    if not metadata.is_file():
        return None
    for line in metadata.read_text(errors="replace").splitlines():
        if line.startswith("Name:"):
            return line.split(":", 1)[1].strip()
        if not line:
            break
    return None


# --- preflight ----------------------------------------------------------------------------------------


def preflight(kit: Path, device: str, need_weights: bool) -> tuple[list[str], list[str], dict[str, Any]]:
    """(problems, warnings, environment): every check the run depends on, in seconds. A problem stops
    the run before it starts; a warning drops one variant (say, nvJPEG)."""
    problems: list[str] = []
    warnings: list[str] = []
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "kit": str(kit),
    }
    problems += verify_sums(kit)
    for name in IDX_FILES:
        if not (kit / DATA_DIR / f"{name}.xz").is_file():
            problems.append(f"{kit / DATA_DIR / name}.xz: missing (Fashion-MNIST)")
    if need_weights and not (kit / WEIGHTS_FILE).is_file():
        problems.append(f"{kit / WEIGHTS_FILE}: missing (the packed ResNet50 weights)")
    sys.path.insert(0, str(Path(__file__).parent))  # the benchmark scripts, as their own runs see them
    versions: dict[str, str] = {}
    for module in RUN_MODULES:
        try:
            imported = importlib.import_module(module)
        except Exception as exc:  # any import failure is one line
            problems.append(f"import {module}: {type(exc).__name__}: {exc}")
            continue
        version = getattr(imported, "__version__", None)
        if isinstance(version, str):
            versions[module] = version
    env["versions"] = versions
    free = shutil.disk_usage(os.environ.get("TMPDIR", "/tmp")).free / 2**30
    env["tmp_free_gib"] = round(free, 1)
    if free < 2:
        problems.append(f"{free:.1f} GiB free in the temp folder: the run writes ~1.5 GiB")
    env["workers"] = loader_workers(os.cpu_count() or 1, warnings, env)
    if "torch" not in versions:
        return problems, warnings, env
    import torch

    env["cuda_available"] = torch.cuda.is_available()
    if device == "cuda":
        if not torch.cuda.is_available():
            problems.append("torch sees no CUDA device (torch.cuda.is_available() is False)")
            return problems, warnings, env
        props = torch.cuda.get_device_properties(0)
        env |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
        try:
            a = torch.randn(1024, 1024, device="cuda")
            torch.cuda.synchronize()
            env["matmul_check"] = float((a @ a).abs().mean().item())
        except Exception as exc:
            problems.append(f"a CUDA matrix product failed: {type(exc).__name__}: {exc}")
    if not problems:
        warnings += _decode_check(device, env)
    if device == "cuda" and not (shutil.which("cc") or shutil.which("gcc")):
        warnings.append(
            "no C compiler on the PATH: torch.compile (Triton) may fail; its variant is tried last"
        )
    return problems, warnings, env


def loader_workers(cores: int, warnings: list[str], env: dict[str, Any]) -> int:
    """How many loader workers the run uses: the cores less two (the main process, the pin-memory thread),
    at most 14, and no more than /dev/shm holds: workers hand batches over through it, two in flight
    each, the largest 512 images of 224 px in fp32 (308 MB)."""
    workers = max(1, min(14, cores - 2))
    shm = Path("/dev/shm")
    if shm.is_dir():
        free = shutil.disk_usage(shm).free
        env["shm_free_gib"] = round(free / 2**30, 1)
        fit = max(1, free // (2 * 512 * 3 * 224 * 224 * 4))
        if fit < workers:
            warnings.append(f"/dev/shm has {free / 2**30:.1f} GiB free: loader workers capped at {fit}")
            workers = fit
    return workers


def _decode_check(device: str, env: dict[str, Any]) -> list[str]:
    """Whether torchvision decodes a JPEG on `device` (nvJPEG on CUDA): the --decode-on-device variant."""
    import io

    import torch
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, "JPEG")
    data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    try:
        decoded = decode_jpeg([data], mode=ImageReadMode.RGB, device=device)
        env["decode_on_device"] = list(decoded[0].shape)
    except Exception as exc:
        env["decode_on_device"] = None
        return [f"JPEG decoding on {device} failed ({type(exc).__name__}: {exc}): that variant is skipped"]
    return []


# --- tables -------------------------------------------------------------------------------------------


def variant_name(r: dict[str, Any]) -> str:
    parts = [r["precision"]]
    parts += ["channels-last"] * bool(r["channels_last"])
    parts += ["compile"] * bool(r["compile"])
    parts += ["decode on device"] * bool(r["decode_on_device"])
    return ", ".join(parts)


def throughput_table(results: Sequence[dict[str, Any]]) -> str:
    """The markdown rows of embed_throughput's --results lines: one row a variant and batch size."""
    lines = [
        "| variant (ResNet50, model input px) | batch | model only img/s | decode + preprocess img/s "
        "| top-10 overlap with fp32 | compile warm-up s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        for batch, rate in r["model_only"].items():
            overlap = f"{r['overlap']:.3f}" if r.get("overlap") is not None else "–"
            compile_s = f"{r['compile_s']:.0f}" if r.get("compile_s") is not None else "–"
            lines.append(
                f"| {variant_name(r)}, {r['input_size']} px | {batch} | {rate:,.0f} | {r['decode']:,.0f} "
                f"| {overlap} | {compile_s} |"
            )
    if results:
        r = results[0]
        lines += [
            "",
            f"{r['device_name']} ({r['device']}), torch {r['torch']}; {r['count']} JPEGs of "
            f"{r['jpeg_size']} px, {r['workers']} decoding workers, weights: {r['weights']}. Decoding: by "
            "the workers, or checked by them and decoded on the device (nvJPEG) with --decode-on-device. "
            "Model only: preprocessed batches already in host memory.",
        ]
    return "\n".join(lines) + "\n"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary(results: Path, steps: Path) -> str:
    """summary.md: what ran, how long, and the rows for docs/quality.md and the README."""
    env = (
        json.loads((results / "environment.json").read_text())
        if (results / "environment.json").is_file()
        else {}
    )
    lines = [
        "# GPU run summary",
        "",
        f"Machine: {env.get('gpu', 'no GPU')} ({env.get('gpu_memory_gib', '?')} GiB), "
        f"{env.get('cpus')} CPUs, Python {env.get('python')}, "
        f"torch {env.get('versions', {}).get('torch', '?')}, CUDA {env.get('cuda')}, "
        f"cuDNN {env.get('cudnn')}.",
        "",
        "| step | status | seconds | note |",
        "| --- | --- | --- | --- |",
    ]
    for line in steps.read_text().splitlines() if steps.is_file() else []:
        name, status, seconds, note = (line.split("\t") + ["", "", ""])[:4]
        lines.append(f"| {name} | {status} | {seconds} | {note} |")
    throughput = read_jsonl(results / "throughput.jsonl")
    if throughput:
        lines += ["", "## Embedding throughput", "", throughput_table(throughput)]
        best = max(throughput, key=lambda r: max(r["model_only"].values()))
        batch, rate = max(best["model_only"].items(), key=lambda kv: kv[1])
        plain = [r for r in throughput if variant_name(r) == "fp32"]
        base = f" (fp32 {max(plain[0]['model_only'].values()):,.0f})" if plain else ""
        lines += [
            "README row:",
            "",
            f"| ResNet50 embedding on one {env.get('gpu', 'GPU')} ({best['input_size']} px, model only) "
            f"| {rate:,.0f} img/s with {variant_name(best)} at batch {batch}{base}; decoding "
            f"{max(r['decode'] for r in throughput):,.0f} img/s | `scripts/gpu_run.sh` (docs/gpu.md) |",
        ]
    quality = results / "quality.json"
    if quality.is_file():
        q = json.loads(quality.read_text())
        ours = next((r for name, r in q["rows"].items() if name.endswith("(ours)")), None)
        m, cfg = q["train_metrics"], q["settings"]
        per_epoch = (
            (q.get("plan") or {}).get("finetune_images") or cfg.get("finetune_images") or m["train_images"]
        )
        ran = len(q.get("train_losses", {}).get("finetune", []))
        stopped = ", training stopped at the deadline" if m.get("stopped_at_deadline") else ""
        lines += ["", "## Quality (benchmarks/quality.py)", "", (results / "quality.md").read_text()]
        if ours:
            lines += [
                "README row:",
                "",
                f"| Fashion-MNIST, the paper's recipe on one {env.get('gpu', 'GPU')} "
                f"({cfg['image_size']} px, "
                f"{cfg['epochs_frozen']} + {ran} of {cfg['epochs_finetune']} epochs, {int(per_epoch):,} of "
                f"{int(m['train_images']):,} images a phase-2 epoch{stopped}) | top-1 {m['top1']:.3f}, "
                f"top-3 {m['top3']:.3f}; retrieval P@10 {ours['p@10']:.3f}, mAP@10 {ours['map@10']:.3f} "
                "| `scripts/gpu_run.sh` (docs/gpu.md) |",
            ]
    return "\n".join(lines) + "\n"


# --- command line -------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("pack-weights", help="the ResNet50 trunk's weights as a weight pack")
    c.add_argument("out", type=Path)
    c.add_argument("--source", default="packaged", help="'packaged' (imgsim) or 'random' (tiny kits)")
    c.add_argument("--bits", type=int, default=10)
    c.add_argument("--preset", type=int, default=6, help="xz preset of the byte streams; -1: uncompressed")
    c = sub.add_parser("restore-weights", help="a weight pack back to an fp32 checkpoint, digest-checked")
    c.add_argument("pack", type=Path)
    c.add_argument("out", type=Path)
    c = sub.add_parser("check-weights", help="embeddings from restored vs packaged weights")
    c.add_argument("pack", type=Path)
    c.add_argument("--image-size", type=int, default=224)
    c.add_argument("--images", type=int, default=32)
    c.add_argument("--json", type=Path)
    c = sub.add_parser("pack-data", help="Debian's Fashion-MNIST .gz files as .xz")
    c.add_argument("source", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--preset", type=int, default=9)
    c = sub.add_parser("tiny-data", help="a tiny Fashion-MNIST from the bundled sample (dry runs)")
    c.add_argument("out", type=Path)
    c.add_argument("--train", type=int, default=300)
    c.add_argument("--test", type=int, default=100)
    c = sub.add_parser("checksums", help="write the kit's SHA256SUMS")
    c.add_argument("kit", type=Path)
    c = sub.add_parser("verify", help="check the kit against its SHA256SUMS; one line per problem")
    c.add_argument("kit", type=Path)
    c = sub.add_parser("size", help="kit + working tree, against the limit")
    c.add_argument("kit", type=Path)
    c.add_argument("--limit-mib", type=float, default=60)
    c = sub.add_parser("emulate-site", help="links to the installed packages the GPU machine has too")
    c.add_argument("out", type=Path)
    c = sub.add_parser("preflight", help="check everything the run needs; one line per problem")
    c.add_argument("--kit", type=Path, required=True)
    c.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    c.add_argument("--json", type=Path, required=True)
    c = sub.add_parser("throughput-table", help="markdown rows of embed_throughput --results lines")
    c.add_argument("results", type=Path)
    c = sub.add_parser("summary", help="summary.md of a run's results folder")
    c.add_argument("results", type=Path)
    c.add_argument("--steps", type=Path, required=True)
    args = p.parse_args(argv)

    if args.command == "pack-weights":
        state, source = backbone_state(args.source)
        source["original_file_sha256"] = source.pop("sha256", None)
        pack = quantise(state, args.bits, source)
        write_pack(pack, args.out, None if args.preset < 0 else args.preset)
        print(f"{args.out}: {args.out.stat().st_size / 2**20:.1f} MiB, {args.bits}-bit, from {args.source}")
    elif args.command == "restore-weights":
        started = time.perf_counter()
        meta = restore(args.pack, args.out)
        print(
            f"{args.out}: fp32 weights restored from {meta['bits']}-bit pack in "
            f"{time.perf_counter() - started:.1f} s, digest {meta['restored_sha256'][:16]}… checked"
        )
    elif args.command == "check-weights":
        restored = args.pack.with_suffix(".restored.pth")
        restore(args.pack, restored)
        try:
            figures = compare_embeddings(restored, args.image_size, args.images)
        finally:
            restored.unlink()
        print(json.dumps(figures))
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
        if figures["max_relative_l2"] > TOLERANCE:
            print(f"restored embeddings differ by more than {TOLERANCE:.1%}", file=sys.stderr)
            return 1
    elif args.command == "pack-data":
        pack_data(args.source, args.out, args.preset)
    elif args.command == "tiny-data":
        tiny_data(args.out, args.train, args.test)
    elif args.command == "checksums":
        write_sums(args.kit)
    elif args.command == "verify":
        problems = verify_sums(args.kit)
        for line in problems:
            print(f"kit: {line}", file=sys.stderr)
        if problems:
            return 1
        print(f"kit: {len(kit_files(args.kit))} files match {args.kit / SUMS}")
    elif args.command == "size":
        ok, line = size_report(args.kit, args.limit_mib)
        print(line)
        return 0 if ok else 1
    elif args.command == "emulate-site":
        print(f"{args.out}: {emulate_site(args.out)} distributions the GPU machine has (or the kit carries)")
    elif args.command == "preflight":
        problems, warnings, env = preflight(args.kit, args.device, need_weights=True)
        env |= {"problems": problems, "warnings": warnings}
        args.json.write_text(json.dumps(env, indent=2, default=str) + "\n")
        for line in warnings:
            print(f"preflight: warning: {line}", file=sys.stderr)
        for line in problems:
            print(f"preflight: {line}", file=sys.stderr)
        if problems:
            return 1
        print(
            f"preflight: all checks passed: {env.get('gpu', args.device)}, python {env['python']}, "
            f"torch {env['versions'].get('torch')}, torchvision {env['versions'].get('torchvision')}, "
            f"pydantic {env['versions'].get('pydantic')}"
        )
    elif args.command == "throughput-table":
        sys.stdout.write(throughput_table(read_jsonl(args.results)))
    elif args.command == "summary":
        sys.stdout.write(summary(args.results, args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
