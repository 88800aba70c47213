from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import export_nudged
from visrec.artefact import Manifest, load_artefact, read_manifest
from visrec.config import EmbedSettings
from visrec.embed import Embedder
from visrec.errors import ModelError
from visrec.images import ImageLimits


def test_manifest_describes_the_model(artefact: tuple[Path, Manifest]) -> None:
    path, manifest = artefact
    assert read_manifest(path) == manifest
    assert manifest.embedding_dim == 1000 and manifest.embedding_layer == "backbone.fc"
    assert manifest.loss == "softmax" and manifest.training["loss"] == "softmax"  # the paper's, by default
    assert manifest.classes == ["circle", "square", "triangle"]
    assert manifest.preprocess.input_size == 32
    assert {"top1", "top3"} <= set(manifest.metrics)
    assert manifest.model_version == f"resnet18-{manifest.weights_sha256[:12]}"


def test_export_load_round_trip_gives_identical_vectors(
    artefact: tuple[Path, Manifest], tmp_path: Path
) -> None:
    path, _ = artefact
    images = [tmp_path / f"{c}.png" for c in ("red", "blue")]
    for image, colour in zip(images, ("red", "blue"), strict=True):
        Image.new("RGB", (20, 30), colour).save(image)
    refs = [str(i) for i in images]
    settings = EmbedSettings(batch_size=8, workers=0)
    first = next(Embedder(path, torch.device("cpu"), settings).embed_refs(refs, ImageLimits())).vectors
    again = next(Embedder(path, torch.device("cpu"), settings).embed_refs(refs, ImageLimits())).vectors
    assert first.shape == (2, 1000) and first.dtype == np.float32
    np.testing.assert_array_equal(first, again)
    single = Embedder(path, torch.device("cpu")).embed_image(Image.open(images[0]).convert("RGB"))
    np.testing.assert_allclose(single, first[0], rtol=1e-5, atol=1e-5)


def test_tampered_or_missing_artefact(artefact: tuple[Path, Manifest], tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(artefact[0], copy)
    with (copy / artefact[1].weights_file).open("ab") as f:
        f.write(b"x")
    with pytest.raises(ModelError, match="sha256"):
        load_artefact(copy, torch.device("cpu"))
    with pytest.raises(ModelError, match="run `visrec train`"):
        read_manifest(tmp_path / "nothing")
    (copy / "manifest.json").write_text(json.dumps({"model_version": 1}))
    with pytest.raises(ModelError, match="invalid manifest"):
        read_manifest(copy)


def test_a_new_export_replaces_the_old_one_without_a_gap(
    artefact: tuple[Path, Manifest], tmp_path: Path
) -> None:
    """Exporting over an artefact writes the new weights beside the old ones, then switches the manifest
    (one atomic rename): a reader finds a complete artefact at every moment. The old weights go after."""
    out = tmp_path / "model"
    shutil.copytree(artefact[0], out)
    manifest = read_manifest(out)
    new = export_nudged(out, out)
    assert new.weights_file != manifest.weights_file
    assert sorted(p.name for p in out.iterdir()) == sorted([new.weights_file, "manifest.json"])
    assert read_manifest(out).model_version == new.model_version
    load_artefact(out, torch.device("cpu"))  # the weights match the manifest
