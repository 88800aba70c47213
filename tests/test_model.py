from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision import models

from visrec.errors import ModelError
from visrec.model import BACKBONES, EMBEDDING_DIM, CosineClassifier, build_model, load_pretrained


def test_embedding_is_the_1000d_fc_below_the_head() -> None:
    model = build_model("resnet18", num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        embedding = model.embed(x)
        assert embedding.shape == (2, EMBEDDING_DIM)
        assert torch.equal(model(x), model.head(embedding))
    assert isinstance(model.head, torch.nn.Sequential)  # the paper's head: the default loss, softmax
    assert [m.out_features for m in model.head if isinstance(m, torch.nn.Linear)] == [256, 64, 4]


def test_normalized_softmax_head_is_a_cosine_classifier_on_the_unit_embedding() -> None:
    model = build_model("resnet18", num_classes=4, loss="normalized-softmax", temperature=0.05).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        embedding = model.embed(x)
        raw = model.backbone.fc(model.pooled(x))
        assert embedding.shape == (3, EMBEDDING_DIM)
        torch.testing.assert_close(embedding, raw / raw.norm(dim=1, keepdim=True))
        assert isinstance(model.head, CosineClassifier)
        weight = model.head.weight / model.head.weight.norm(dim=1, keepdim=True)
        torch.testing.assert_close(model(x), embedding @ weight.T / 0.05)
        torch.testing.assert_close(model.head(7 * raw), model(x))  # the scale of its input is ignored
    assert model.head.weight.shape == (4, EMBEDDING_DIM) and "head.temperature" in model.state_dict()


def test_unknown_backbone_and_too_few_classes() -> None:
    with pytest.raises(ModelError, match="unknown backbone"):
        build_model("vgg16", 3)
    with pytest.raises(ModelError, match="at least 2 classes"):
        build_model("resnet18", 1)
    with pytest.raises(ModelError, match="unknown loss 'arcface'"):
        build_model("resnet18", 3, loss="arcface")  # type: ignore[arg-type]


def test_packaged_resnet50_weights_load_checked() -> None:
    model = build_model("resnet50", 3)
    before = model.backbone.conv1.weight.clone()
    info = load_pretrained(model, "resnet50", "packaged")
    packaged = BACKBONES["resnet50"].packaged
    assert packaged is not None
    assert info.sha256 == packaged.sha256
    assert not torch.equal(before, model.backbone.conv1.weight)
    assert info.trained_from_scratch == ["backbone.fc", "head"]  # imgsim's fc is 768-d: ours is trained


def test_checkpoint_file_in_torchvision_layout(tmp_path: Path) -> None:
    reference = models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    model = build_model("resnet18", 3)
    info = load_pretrained(model, "resnet18", str(tmp_path / "r18.pth"))
    assert torch.equal(model.backbone.fc.weight, reference.fc.weight)
    assert info.trained_from_scratch == ["head"] and info.sha256


def test_wrong_checkpoints_are_refused(tmp_path: Path) -> None:
    torch.save(models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ModelError, match="do not fit"):
        load_pretrained(build_model("resnet50", 3), "resnet50", str(tmp_path / "r18.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a loadable"):
        load_pretrained(build_model("resnet18", 3), "resnet18", str(tmp_path / "junk.pth"))
    with pytest.raises(ModelError, match="not found"):
        load_pretrained(build_model("resnet18", 3), "resnet18", str(tmp_path / "none.pth"))
    with pytest.raises(ModelError, match="no packaged weights"):
        load_pretrained(build_model("resnet18", 3), "resnet18", "packaged")


def test_offline_imagenet_download_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache: the download is attempted
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # and cannot succeed, with or without internet
    with pytest.raises(ModelError, match="could not download"):
        load_pretrained(build_model("resnet18", 3), "resnet18", "imagenet")
