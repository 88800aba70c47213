"""The GPU run's tables (benchmarks/gpu_kit.py throughput-table, summary; docs/gpu.md): the markdown
rows of embed_throughput's --results lines, and summary.md of a run's results folder (what ran, how long,
and the rows for docs/quality.md and the README). Standard library only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


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
