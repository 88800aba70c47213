"""The GPU kit without a GPU (benchmarks/gpu_kit.py, scripts/gpu_kit.sh and scripts/gpu_run.sh;
docs/gpu.md): the weight pack's round trip on the real packaged weights, the kit's checksums, size
accounting and wheel pins, and a dry run of the device call on the CPU through every step.

Nothing here downloads the real kit's wheels or needs it built: `scripts/gpu_kit.sh` is run by hand
(docs/gpu.md records its size), and the dry run builds a tiny kit of its own.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmark scripts import each other as top-level modules
import gpu_kit  # noqa: E402

RESULTS = [
    "environment.json",
    "gpu_run.log",
    "quality.json",
    "quality.md",
    "summary.md",
    "throughput.jsonl",
    "throughput.md",
]


def test_packed_weights_restore_to_the_same_embeddings_within_the_tolerance(tmp_path: Path) -> None:
    """The real imgsim ResNet50 through the pack (10-bit, per output channel) and back to fp32: the
    embeddings of sample photos stay within gpu_kit.TOLERANCE of the original weights' (0.5 %)."""
    state, source = gpu_kit.backbone_state("packaged")
    pack = gpu_kit.quantise(state, 10, source)
    gpu_kit.write_pack(pack, tmp_path / "w.npz", preset=None)  # xz is the slow part; tested below
    gpu_kit.restore(tmp_path / "w.npz", tmp_path / "w.pth")
    figures = gpu_kit.compare_embeddings(tmp_path / "w.pth", image_size=64, images=8)
    assert figures["max_relative_l2"] <= gpu_kit.TOLERANCE, figures
    assert figures["min_cosine"] > 0.9999, figures

    restored = torch.load(tmp_path / "w.pth", weights_only=True)
    assert list(restored) == list(state) and not any(k.startswith("fc.") for k in restored)
    for name, original in state.items():
        if original.is_floating_point() and original.dim() >= 2:
            step = original.reshape(len(original), -1).abs().amax(1) / 511  # one level of 10 bits
            error = (restored[name] - original).reshape(len(original), -1).abs().amax(1)
            assert torch.all(error <= step / 2 * 1.0001 + 1e-12), name
        else:  # BatchNorm and the like travel as they are
            assert torch.equal(restored[name], original), name


def test_a_pack_file_round_trips_exactly_and_its_digest_is_checked(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = {
        "conv.weight": torch.randn(8, 3, 3, 3),
        "silent.weight": torch.zeros(2, 4),  # a channel of zeros must not divide by zero
        "bn.weight": torch.rand(8),
        "bn.num_batches_tracked": torch.tensor(7),
    }
    pack = gpu_kit.quantise(state, 10, {"source": "test"})
    gpu_kit.write_pack(pack, tmp_path / "p.npz", preset=0)
    read = gpu_kit.read_pack(tmp_path / "p.npz")
    assert read.meta["compression"] == "xz"
    again, first = gpu_kit.dequantise(read), gpu_kit.dequantise(pack)
    assert all(np.array_equal(again[k], first[k]) for k in first)

    gpu_kit.restore(tmp_path / "p.npz", tmp_path / "p.pth")
    restored = torch.load(tmp_path / "p.pth", weights_only=True)
    assert torch.equal(restored["silent.weight"], torch.zeros(2, 4))
    assert torch.equal(restored["bn.weight"], state["bn.weight"])
    assert restored["bn.num_batches_tracked"].item() == 7
    assert (restored["conv.weight"] - state["conv.weight"]).abs().max() < 0.01

    read.meta["restored_sha256"] = "0" * 64  # what a damaged or mismatched pack looks like
    gpu_kit.write_pack(read, tmp_path / "bad.npz", preset=None)
    with pytest.raises(ValueError, match="digest"):
        gpu_kit.restore(tmp_path / "bad.npz", tmp_path / "bad.pth")


def _fake_kit(root: Path) -> Path:
    kit = root / "kit"
    (kit / "weights").mkdir(parents=True)
    (kit / "wheels").mkdir()
    (kit / "weights" / "w.npz").write_bytes(os.urandom(1 << 20))
    (kit / "wheels" / "a-1.0-py3-none-any.whl").write_bytes(b"wheel")
    gpu_kit.write_sums(kit)
    return kit


def test_the_kit_checksums_name_each_missing_damaged_or_unlisted_file(tmp_path: Path) -> None:
    kit = _fake_kit(tmp_path)
    assert gpu_kit.verify_sums(kit) == []
    listed = subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=kit, capture_output=True)
    assert listed.returncode == 0  # the file sha256sum reads, too

    (kit / "weights" / "w.npz").write_bytes(b"damaged")
    (kit / "wheels" / "a-1.0-py3-none-any.whl").unlink()
    (kit / "stray.txt").write_text("x")
    problems = gpu_kit.verify_sums(kit)
    assert len(problems) == 3
    assert any("w.npz: sha256 differs" in p for p in problems)
    assert any("a-1.0-py3-none-any.whl: listed in SHA256SUMS but missing" in p for p in problems)
    assert any("stray.txt: not in SHA256SUMS" in p for p in problems)


def test_the_size_counts_the_kit_and_the_working_tree_against_the_limit(tmp_path: Path) -> None:
    kit = _fake_kit(tmp_path)
    tree = gpu_kit.tree_bytes()
    assert 1 << 20 < tree < 60 << 20  # the checkout that travels: MiBs, not the ignored .venv
    ok, line = gpu_kit.size_report(kit, 60)
    assert ok and re.search(r"kit 1\.0 MiB \(weights 1\.0, wheels 0\.0\) \+ working tree [\d.]+ MiB", line)
    ok, line = gpu_kit.size_report(kit, tree / 2**20)  # the tree alone fills this limit
    assert not ok
    assert gpu_kit.main(["size", str(kit), "--limit-mib", "1"]) == 1


def test_the_kit_carries_one_pinned_wheel_for_each_missing_dependency() -> None:
    """scripts/gpu_kit.sh downloads each of KIT_DISTRIBUTIONS at its constraints.txt pin (one version);
    every requirement of those packages is itself carried or already on the GPU machine."""
    pins = (ROOT / "constraints.txt").read_text().splitlines()
    norm = gpu_kit._norm
    for name in gpu_kit.KIT_DISTRIBUTIONS:
        assert len([p for p in pins if norm(p.split("==")[0]) == norm(name)]) == 1, name
    there = {norm(n) for n in (*gpu_kit.KIT_DISTRIBUTIONS, *gpu_kit.ON_GPU_MACHINE)}
    for name in gpu_kit.KIT_DISTRIBUTIONS:
        for requirement in importlib.metadata.requires(name) or []:
            if "extra ==" in requirement:
                continue
            needed = re.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0]
            assert norm(needed) in there, f"{name} needs {needed}"
    assert {"qdrant-edge-py", "qdrant-client"}.isdisjoint(there)  # the run needs no Qdrant engine


def test_a_missing_piece_stops_the_run_at_once_with_one_line(tmp_path: Path) -> None:
    """An empty kit: the checksum step says so and the run stops in seconds, a summary written."""
    (tmp_path / "kit").mkdir()
    started = time.monotonic()
    run = subprocess.run(
        [
            "bash",
            "scripts/gpu_run.sh",
            "--dry-run",
            "--kit",
            str(tmp_path / "kit"),
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=ROOT,
        env=os.environ | {"PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1 and time.monotonic() - started < 60
    assert "SHA256SUMS: missing (build the kit with scripts/gpu_kit.sh and carry it)" in run.stdout
    assert "| checksums | failed (exit 1) |" in (tmp_path / "out" / "summary.md").read_text()


def test_preflight_names_each_missing_file_of_the_kit(tmp_path: Path) -> None:
    kit = _fake_kit(tmp_path)
    problems, _, env = gpu_kit.preflight(kit, "cpu", need_weights=True, min_free_gib=0)
    assert sorted(problems) == sorted(
        [f"{kit / gpu_kit.DATA_DIR / name}.xz: missing (Fashion-MNIST)" for name in gpu_kit.IDX_FILES]
        + [f"{kit / gpu_kit.WEIGHTS_FILE}: missing (the packed ResNet50 weights)"]
    )
    assert {"torch", "pydantic", "pydantic_settings"} <= set(env["versions"])
    assert 1 <= env["workers"] <= 14  # loader workers: the cores less two, as /dev/shm allows


def test_preflight_stops_a_run_the_temp_folder_cannot_hold(tmp_path: Path) -> None:
    kit = _fake_kit(tmp_path)
    problems, _, env = gpu_kit.preflight(kit, "cpu", need_weights=False, min_free_gib=1e9)
    assert [p for p in problems if "free in the temp folder" in p] == [
        f"{env['tmp_free_gib']:.1f} GiB free in the temp folder: the run needs 1e+09 GiB"
    ]


@pytest.mark.slow  # ~2.5 min on 2 cores: eight Python processes, each importing torch
def test_the_dry_run_goes_through_every_step_and_writes_every_result(tmp_path: Path) -> None:
    """scripts/gpu_run.sh --dry-run: a tiny kit, this machine's Python restricted to the packages the GPU
    machine has or the kit carries, tiny sizes on the CPU; every step runs and every file is written."""
    out = tmp_path / "out"
    run = subprocess.run(
        ["bash", "scripts/gpu_run.sh", "--dry-run", "--out", str(out)],
        cwd=ROOT,
        env=os.environ | {"PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.returncode == 0, run.stdout[-4000:]
    assert sorted(p.name for p in out.iterdir()) == RESULTS
    summary = (out / "summary.md").read_text()
    step_rows = [
        line for line in summary.splitlines() if re.match(r"\| [a-z].* \| (ok|failed|skipped)", line)
    ]
    assert len(step_rows) == 10 and all("| ok |" in row for row in step_rows), summary
    throughput = [json.loads(line) for line in (out / "throughput.jsonl").read_text().splitlines()]
    assert [gpu_kit.variant_name(r) for r in throughput] == [
        "fp32",
        "bf16, channels-last",
        "bf16, channels-last, decode on device",
        "bf16, channels-last, compile",
    ]
    rows = [line for line in (out / "throughput.md").read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 2 + 4 * 2  # header, rule, 4 variants × 2 batch sizes
    quality = json.loads((out / "quality.json").read_text())
    assert "visrec fine-tuned (ours)" in quality["rows"] and quality["plan"]["budget_s"] > 0
    assert "README row:" in summary and "Fashion-MNIST, the paper's recipe" in summary
    environment = json.loads((out / "environment.json").read_text())
    assert environment["problems"] == [] and environment["versions"]["pydantic"]
