"""The exported model as far as it can be known without torch: its manifest (what made it, how it wants
its input, its version). The model layer's constants and records live here, below the embedding stage:
this module imports neither torch nor `visrec.embed` (`visrec.handle.ModelHandle` loads the network).

A sync with nothing to embed, and a command handed to a running service, import neither torch nor
torchvision (seconds of start-up on this machine): they read the manifest from here.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from visrec.config import Loss
from visrec.errors import ModelError

MANIFEST = "manifest.json"
WEIGHTS = "weights.pt"  # what artefacts made before weights files were named by their hash call it
FORMAT_VERSION = 1
# The `training` entry listing the ids of the held-out products (never trained on); absent in older manifests.
HELDOUT_PRODUCTS = "heldout_products"
EMBEDDING_DIM = 1000
EMBEDDING_LAYER = "backbone.fc"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightInfo(BaseModel):
    """Where the backbone's starting weights came from; goes into the manifest."""

    source: str
    sha256: str | None = None
    description: str = ""
    trained_from_scratch: list[str] = []  # top-level layers the source did not provide


class Preprocess(BaseModel):
    """How the model wants its input; stored in the artefact's manifest so ingest and query agree."""

    input_size: int = Field(ge=8)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    # Product photos are padded to a square, not cropped: a long dress keeps its hem.
    pad_fill: tuple[int, int, int] = (255, 255, 255)


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


def read_manifest(artefact_dir: Path) -> Manifest:
    """The manifest alone (cheap: no weights); raises `ModelError` if missing or invalid."""
    path = artefact_dir / MANIFEST
    try:
        return Manifest.model_validate(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ModelError(f"no exported model at {artefact_dir}: run `visrec train` first") from None
    except (OSError, json.JSONDecodeError, ValidationError) as exc:
        raise ModelError(f"{path}: invalid manifest ({exc})") from exc


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
