"""The exported embedder: `weights-<sha>.pt` + `manifest.json` in one folder, written atomically.

The manifest carries everything serving needs to use the weights the way training did (backbone,
classes, preprocessing, embedding layer and size) and what a person needs to trust them (weight
source and sha256, metrics, version). Serving reads this module, never the training code.
"""

from __future__ import annotations

import hashlib
import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field, ValidationError

from visrec.config import Loss
from visrec.errors import ModelError
from visrec.fs import replacing, write_atomically
from visrec.images import Preprocess
from visrec.model import EMBEDDING_DIM, EMBEDDING_LAYER, VisrecNet, WeightInfo, build_model, sha256_file

MANIFEST = "manifest.json"
WEIGHTS = "weights.pt"  # what artefacts made before weights files were named by their hash call it
FORMAT_VERSION = 1
# The `training` entry listing the ids of the held-out products (never trained on); absent in older manifests.
HELDOUT_PRODUCTS = "heldout_products"


class Manifest(BaseModel):
    format_version: int = FORMAT_VERSION
    model_version: str  # backbone + the weights' hash: what every indexed point records
    backbone: str
    pretrained: WeightInfo
    classes: list[str] = Field(min_length=2)
    embedding_dim: int = EMBEDDING_DIM
    embedding_layer: str = EMBEDDING_LAYER
    # What trained the head, and so how to build it: with "normalized-softmax" the embeddings are
    # unit-length. Manifests from before the option say nothing: they were all the paper's softmax.
    loss: Loss = "softmax"
    preprocess: Preprocess
    metrics: dict[str, float] = {}
    training: dict[str, Any] = {}
    weights_file: str = WEIGHTS
    weights_sha256: str
    created_at: datetime


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


def read_manifest(artefact_dir: Path) -> Manifest:
    """The manifest alone (cheap: no weights); raises `ModelError` if missing or invalid."""
    path = artefact_dir / MANIFEST
    try:
        return Manifest.model_validate(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ModelError(f"no exported model at {artefact_dir}: run `visrec train` first") from None
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ModelError(f"{path}: invalid manifest ({exc})") from exc


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


def artefact_for(collection_metadata: dict[str, str], configured: Path) -> Path:
    """The artefact whose model made a collection's vectors, to embed query photos in the same space.

    The collection records the artefact that built it; `configured` (the settings' artefact) is used
    when that path is not readable here (another machine) or the collection predates the record.
    Raises `ModelError` when neither holds the collection's model: a photo embedded by another model
    would be compared in the wrong space.
    """
    wanted = collection_metadata.get("model_version")
    if wanted is None:
        return configured
    recorded = Path(collection_metadata.get("artefact", ""))
    for candidate in (recorded, configured):
        try:
            if read_manifest(candidate).model_version == wanted:
                return candidate
        except ModelError:
            continue
    raise ModelError(
        f"the live collection was built by model {wanted} (artefact {recorded}), which is not readable "
        f"here, and {configured} holds another model: deploy that artefact and point VISREC_ARTEFACT at it"
    )
