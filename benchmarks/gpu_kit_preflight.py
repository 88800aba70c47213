"""The GPU machine, emulated and checked (benchmarks/gpu_kit.py emulate-site, preflight; docs/gpu.md):
for dry runs, a site folder of links to only the installed packages the GPU machine has too (or the kit
carries), so an import that would fail there fails here; and preflight, every check the run depends on,
in seconds, before anything is measured: a missing piece is one line, not a failure minutes in.

Only the standard library is imported at the top; torch, torchvision and Pillow where they are used.
"""

from __future__ import annotations

import importlib
import os
import platform
import shutil
import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gpu_kit_files import verify_sums
from gpu_kit_layout import (
    DATA_DIR,
    IDX_FILES,
    KIT_DISTRIBUTIONS,
    ON_GPU_MACHINE,
    RUN_MODULES,
    WEIGHTS_FILE,
    _norm,
)

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


def preflight(
    kit: Path, device: str, need_weights: bool, min_free_gib: float = 2.0
) -> tuple[list[str], list[str], dict[str, Any]]:
    """(problems, warnings, environment): every check the run depends on, in seconds. A problem stops
    the run before it starts; a warning drops one variant (say, nvJPEG). `min_free_gib`: the temp space
    the run needs (the full run writes ~1.5 GiB; a dry run's tiny sizes far less)."""
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
    if free < min_free_gib:
        problems.append(f"{free:.1f} GiB free in the temp folder: the run needs {min_free_gib:g} GiB")
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
