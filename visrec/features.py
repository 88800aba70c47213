"""Running a network over images for training: the frozen trunk's pooled features (computed once and
cached on disk, phase 1's input and the benchmarks' untuned baseline), inference over a loader, and
files (caches, checkpoints) written so that an interruption never leaves half of one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from visrec.errors import CatalogueError
from visrec.fs import replacing
from visrec.images import ImageDataset, ImageItem, ImageLimits, Preprocess, collate_images
from visrec.model import VisrecNet

log = logging.getLogger(__name__)

StageProgress = Callable[[str, int, int], None]  # (stage, done, total)


def pooled_features(
    model: VisrecNet,
    refs: Sequence[str],
    pre: Preprocess,
    device: torch.device,
    *,
    batch_size: int,
    workers: int,
    limits: ImageLimits | None = None,
    cache_dir: Path | None = None,
    progress: StageProgress | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """The frozen trunk's pooled features of the images (eval mode), and the positions that decoded.

    With `cache_dir`, they are kept in a file named by the trunk's weights, the preprocessing and the
    image references, so any later call with the same three reads them back instead of recomputing.
    """
    path = None
    if cache_dir is not None:
        digest = hashlib.sha256(json.dumps([pre.model_dump(), list(refs)]).encode())
        for name, tensor in model.backbone.state_dict().items():
            if not name.startswith("fc."):
                digest.update(tensor.cpu().numpy().tobytes())
        path = cache_dir / f"features-{digest.hexdigest()[:16]}.pt"
        if path.is_file():
            cached = torch.load(path, weights_only=True)
            log.info("pooled features read from %s", path)
            return cached["features"], cached["kept"]
    model.eval()
    loader = image_loader(ImageDataset(refs, pre, limits or ImageLimits()), batch_size, workers, device)
    feats, kept = infer(model.pooled, loader, device, "features", progress)
    if path is not None:
        atomic_save({"features": feats, "kept": kept}, path)
    return feats, kept


def infer(
    fn: Callable[[torch.Tensor], torch.Tensor],
    loader: DataLoader[ImageItem],
    device: torch.device,
    stage: str,
    progress: StageProgress | None,
) -> tuple[torch.Tensor, list[int]]:
    """`fn` over every image that decodes, in eval mode: the stacked outputs and their dataset indices."""
    outputs, kept = [], []
    with torch.inference_mode():
        for step, batch in enumerate(loader, 1):
            if batch.indices:
                outputs.append(fn(batch.pixels.to(device, non_blocking=True)).cpu())
                kept += batch.indices
            if progress:
                progress(stage, step, len(loader))
    if not outputs:
        raise CatalogueError(f"{stage}: no image could be decoded")
    return torch.cat(outputs), kept


def image_loader(
    dataset: ImageDataset, batch_size: int, workers: int, device: torch.device, **kw: Any
) -> DataLoader[ImageItem]:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_images,
        pin_memory=device.type == "cuda",
        **kw,
    )


def atomic_save(state: dict[str, Any], path: Path) -> None:
    """An interruption leaves the previous checkpoint, never half of one."""
    with replacing(path) as f:
        torch.save(state, f)
