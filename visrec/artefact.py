"""The exported embedder: `weights-<sha>.pt` + `manifest.json` in one folder, written atomically.

The manifest carries everything serving needs to use the weights the way training did (backbone,
classes, preprocessing, embedding layer and size) and what a person needs to trust them (weight
source and sha256, metrics, version). Serving reads this module, never the training code.
"""

from __future__ import annotations

import hashlib
import io
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from visrec.config import Loss
from visrec.errors import ModelError
from visrec.fs import replacing, write_atomically
from visrec.manifest import (
    HELDOUT_PRODUCTS,
    MANIFEST,
    Manifest,
    Preprocess,
    WeightInfo,
    artefact_for,
    read_manifest,
    sha256_file,
)
from visrec.model import VisrecNet, build_model

__all__ = [
    "HELDOUT_PRODUCTS",
    "Manifest",
    "artefact_for",
    "load_artefact",
    "read_manifest",
    "save_artefact",
]


def save_artefact(
    model: VisrecNet,
    out_dir: Path,
    *,
    backbone: str,
    pretrained: WeightInfo,
    classes: list[str],
    preprocess: Preprocess,
    metrics: dict[str, float],
    training: dict[str, Any],
    loss: Loss = "softmax",
) -> Manifest:
    """Write the artefact to `out_dir`, replacing any previous one there without a moment when none is
    readable: the weights go to a new file named by their hash, then the manifest that names them
    replaces the old one in one atomic step, then the old weights go."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buffer)
    digest = hashlib.sha256(buffer.getbuffer()).hexdigest()
    weights_file = f"weights-{digest[:16]}.pt"
    with replacing(out_dir / weights_file) as f:
        f.write(buffer.getbuffer())  # no second copy of the weights in memory
    manifest = Manifest(
        model_version=f"{backbone}-{digest[:12]}",
        backbone=backbone,
        pretrained=pretrained,
        classes=classes,
        loss=loss,
        preprocess=preprocess,
        metrics=metrics,
        training=training,
        weights_file=weights_file,
        weights_sha256=digest,
        created_at=datetime.now(UTC),
    )
    write_atomically(out_dir / MANIFEST, manifest.model_dump_json(indent=2) + "\n")
    for old in out_dir.glob("weights*.pt"):
        if old.name != weights_file:
            old.unlink(missing_ok=True)
    return manifest


def load_artefact(artefact_dir: Path, device: torch.device) -> tuple[VisrecNet, Manifest]:
    """The exported network in eval mode on `device`, weights checked against the manifest."""
    manifest = read_manifest(artefact_dir)
    weights = artefact_dir / manifest.weights_file
    if not weights.is_file() or sha256_file(weights) != manifest.weights_sha256:
        raise ModelError(f"{weights}: missing or does not match the manifest's sha256")
    # The head the loss needs; a normalised softmax's temperature is a buffer, loaded with the weights.
    model = build_model(manifest.backbone, len(manifest.classes), manifest.loss)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval(), manifest
