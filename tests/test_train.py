from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from tests.helpers import MakeCatalogue, small_settings
from visrec.artefact import Manifest, load_artefact, read_manifest
from visrec.catalogue import read_catalogue
from visrec.config import Settings, TrainSettings
from visrec.embed import Embedder
from visrec.errors import CatalogueError
from visrec.estimate import Estimate, estimate
from visrec.images import ImageLimits, to_tensor
from visrec.model import CosineClassifier, build_model
from visrec.phases import Run
from visrec.splits import split_data, split_holdout
from visrec.train import export, train


def test_holdout_split_is_stratified_disjoint_and_seeded() -> None:
    labels = [0] * 10 + [1] * 5 + [2] * 2 + [3]
    train_pos, held = split_holdout(labels, 0.2, seed=1)
    assert set(train_pos).isdisjoint(held) and sorted(train_pos + held) == list(range(len(labels)))
    held_labels = [labels[i] for i in held]
    assert held_labels.count(0) == 2 and held_labels.count(1) == 1 and held_labels.count(2) == 1
    assert 3 not in held_labels  # a class of one stays in training
    assert split_holdout(labels, 0.2, seed=1) == (train_pos, held)
    assert split_holdout(labels, 0.2, seed=2) != (train_pos, held)


def test_training_reduces_the_loss_and_reports_topk(artefact: tuple[Path, Manifest]) -> None:
    _, manifest = artefact
    losses = manifest.training["losses"]
    assert losses["frozen"][-1] < losses["frozen"][0]
    assert len(losses["finetune"]) == 1
    # Three classes: the top 3 always holds the right one; top-1 is a count of the 9 held-out images.
    assert manifest.metrics["top3"] == 1.0
    assert manifest.metrics["top1"] * 9 == pytest.approx(round(manifest.metrics["top1"] * 9), abs=0.01)
    assert manifest.metrics["heldout_images"] == 9  # 20 % of 15 per class
    heldout = manifest.training["heldout_products"]  # what the reindex quality gate queries
    assert len(heldout) == 9 and heldout == sorted(heldout) and all(p.startswith("t") for p in heldout)


def test_learns_beyond_chance(make_catalogue: MakeCatalogue, tmp_path: Path) -> None:
    # Phase 1 on a random-init ResNet18's frozen features: measured 0.80-0.93 top-1 over seeds 0-2.
    # (Phase 2 is left out here: one Adam step at 1e-4 over a *random* backbone wrecks it; on
    # pretrained weights it does not, see the demo's figures.)
    settings = small_settings(tmp_path)
    settings = settings.model_copy(
        update={
            "train": settings.train.model_copy(
                update={"epochs_frozen": 30, "epochs_finetune": 0, "holdout": 0.25}
            )
        }
    )
    result = train(read_catalogue(make_catalogue(60)), settings, torch.device("cpu"))
    assert result.metrics["top1"] > 0.6  # chance is 1/3 for three shapes


def test_finetune_keeps_batchnorm_statistics(artefact: tuple[Path, Manifest]) -> None:
    """Phase 1's features were taken with BatchNorm in eval mode; phase 2 must not re-estimate it
    (that throws the warm start away). Random init starts BN at mean 0, var 1: it must still be."""
    state = torch.load(artefact[0] / artefact[1].weights_file, weights_only=True)
    means = [v for k, v in state.items() if k.endswith("running_mean")]
    variances = [v for k, v in state.items() if k.endswith("running_var")]
    assert means and all(torch.equal(m, torch.zeros_like(m)) for m in means)
    assert all(torch.equal(v, torch.ones_like(v)) for v in variances)


def test_training_needs_two_categories(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text("id,image,category\na,a.png,x\nb,b.png,x\n")
    with pytest.raises(CatalogueError, match="at least 2 categories"):
        train(read_catalogue(tmp_path / "c.csv"), small_settings(tmp_path), torch.device("cpu"))


def _with(settings: Settings, **train: object) -> Settings:
    return settings.model_copy(update={"train": settings.train.model_copy(update=train)})


def test_fit_validation_and_heldout_never_share_an_image(tmp_path: Path) -> None:
    rows = "".join(f"p{i},img/{i}.png,{'abc'[i % 3]}\n" for i in range(90))
    (tmp_path / "c.csv").write_text("id,image,category\n" + rows)
    catalogue = read_catalogue(tmp_path / "c.csv")
    cfg = _with(small_settings(tmp_path), holdout=0.2, validation=0.1).train
    classes, fit, val, held = split_data(catalogue, cfg)
    assert classes == ["a", "b", "c"]
    assert len(held.refs) == 18 and len(val.refs) == 6 and len(fit.refs) == 66
    assert not (
        set(fit.refs) & set(val.refs) or set(fit.refs) & set(held.refs) or set(val.refs) & set(held.refs)
    )
    assert sorted(val.labels) == [0, 0, 1, 1, 2, 2]  # stratified
    assert [f"{p[1:]}.png" for p in held.ids] == [Path(r).name for r in held.refs]  # aligned
    assert not set(held.ids) & (set(fit.ids) | set(val.ids))
    assert split_data(catalogue, cfg) == (classes, fit, val, held)  # seeded

    # A separate test catalogue is the held-out split; the whole catalogue is then for fitting/validation.
    (tmp_path / "t.csv").write_text("id,image,category\nt1,img/t1.png,a\nt2,img/t2.png,c\n")
    _, fit, val, held = split_data(catalogue, cfg, read_catalogue(tmp_path / "t.csv"))
    assert held.labels == [0, 2] and len(fit.refs) + len(val.refs) == 90
    (tmp_path / "u.csv").write_text("id,image,category\nt1,img/t1.png,zebra\n")
    with pytest.raises(CatalogueError, match="not in the training catalogue"):
        split_data(catalogue, cfg, read_catalogue(tmp_path / "u.csv"))


class Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_to_the_same_model(make_catalogue: MakeCatalogue, tmp_path: Path) -> None:
    catalogue = read_catalogue(make_catalogue(45))
    settings = _with(small_settings(tmp_path), validation=0.2, epochs_finetune=2, patience=0)
    straight = train(catalogue, _with(settings, work_dir=tmp_path / "straight"), torch.device("cpu"))
    assert len(straight.validation["frozen"]) == 3 and len(straight.validation["finetune"]) == 2

    def stop_in_epoch_2(stage: str, done: int, total: int) -> None:
        if stage == "finetune" and done > total // 2:  # the phase's steps: its second epoch's first
            raise Interrupted

    resumable = _with(settings, work_dir=tmp_path / "resumed")
    with pytest.raises(Interrupted):
        train(catalogue, resumable, torch.device("cpu"), stop_in_epoch_2)
    assert (tmp_path / "resumed" / "frozen.pt").is_file() and (tmp_path / "resumed" / "finetune.pt").is_file()
    resumed = train(catalogue, resumable, torch.device("cpu"))
    assert resumed.losses == straight.losses and resumed.validation == straight.validation
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_a_deadline_stops_training_cleanly_and_still_evaluates(
    make_catalogue: MakeCatalogue, tmp_path: Path
) -> None:
    """`stop_at` (quality.py --deadline-s, the GPU run): no phase-1 epoch and no phase-2 step starts after
    it, an epoch cut short is validated, and the held-out split is evaluated all the same."""
    catalogue = read_catalogue(make_catalogue(45))
    settings = _with(small_settings(tmp_path), validation=0.2, epochs_finetune=2, work_dir=tmp_path / "work")
    passed = train(catalogue, settings, torch.device("cpu"), stop_at=time.monotonic())
    assert len(passed.losses["frozen"]) == 1 and passed.losses["finetune"] == []  # the first epoch runs
    assert passed.metrics["stopped_at_deadline"] == 1 and passed.heldout is not None
    assert 0 <= passed.metrics["top1"] <= 1
    assert not (tmp_path / "work" / "frozen.pt").exists()  # a cut phase 1 is not resumed as if whole

    deadline = time.monotonic() + 5
    steps: list[tuple[int, int]] = []

    def reach_the_deadline(stage: str, done: int, total: int) -> None:
        if stage == "finetune":
            steps.append((done, total))
            time.sleep(max(0.0, deadline - time.monotonic()))

    settings = _with(settings, epochs_frozen=0, batch_size=4, work_dir=None)
    cut = train(catalogue, settings, torch.device("cpu"), reach_the_deadline, stop_at=deadline)
    # One step of the first epoch, of the whole phase's; the second epoch never starts.
    assert steps == [(1, 2 * math.ceil(cut.metrics["train_images"] / 4))]
    assert len(cut.losses["finetune"]) == 1 and len(cut.validation["finetune"]) == 1
    assert cut.metrics["stopped_at_deadline"] == 1 and cut.heldout is not None


def test_validation_keeps_the_best_epoch_and_stops_early(
    make_catalogue: MakeCatalogue, tmp_path: Path
) -> None:
    # lr 1.0 on phase 2 wrecks a random backbone: validation must catch it, stop, and keep phase 1's model.
    settings = _with(small_settings(tmp_path), validation=0.2, epochs_finetune=5, lr_finetune=1.0, patience=1)
    result = train(read_catalogue(make_catalogue(45)), settings, torch.device("cpu"))
    best_frozen = max(result.validation["frozen"])
    assert all(top1 <= best_frozen for top1 in result.validation["finetune"])
    assert len(result.validation["finetune"]) == 1  # patience 1: the first worse epoch stops phase 2
    assert result.metrics["best_epoch_finetune"] == 0  # phase 1's model kept


def test_normalized_softmax_trains_exports_and_embeds_unit_1000d(
    make_catalogue: MakeCatalogue, tmp_path: Path
) -> None:
    """The retrieval-first variant: a cosine classifier on the 1000-d embedding. It trains in both phases,
    exports with its loss in the manifest, and serving (which reads the manifest, not the settings)
    rebuilds it and embeds unit-length 1000-d vectors, the ones training evaluated."""
    catalogue = read_catalogue(make_catalogue(45))
    settings = _with(small_settings(tmp_path), loss="normalized-softmax", temperature=0.1, epochs_frozen=5)
    result = train(catalogue, settings, torch.device("cpu"))
    assert result.losses["frozen"][-1] < result.losses["frozen"][0] and len(result.losses["finetune"]) == 1
    assert result.metrics["top3"] == 1.0  # three classes: the top 3 always holds the right one
    held = result.metrics["heldout_images"]
    assert held > 0 and result.metrics["top1"] * held == pytest.approx(
        round(result.metrics["top1"] * held), abs=0.01
    )
    assert result.heldout is not None
    norms = result.heldout.embeddings.norm(dim=1)
    assert result.heldout.embeddings.shape[1] == 1000 and torch.allclose(norms, torch.ones_like(norms))
    assert result.heldout.logits.abs().max() <= 1 / 0.1 + 1e-4  # cosines over the temperature

    manifest = export(result, settings)
    assert manifest.loss == "normalized-softmax" and manifest.embedding_dim == 1000
    assert manifest.training["loss"] == "normalized-softmax" and manifest.training["temperature"] == 0.1
    assert read_manifest(settings.artefact) == manifest
    model, _ = load_artefact(settings.artefact, torch.device("cpu"))
    assert isinstance(model.head, CosineClassifier) and float(model.head.temperature) == pytest.approx(0.1)

    refs = [str(tmp_path / "images" / f"p{i}.png") for i in range(6)]
    embedder = Embedder(settings.artefact, torch.device("cpu"), settings.embed)
    vectors = next(embedder.embed_refs(refs, ImageLimits())).vectors
    assert vectors.shape == (6, 1000) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    # What the index gets is what training evaluated: the exported model embeds as the trained one did.
    pixels = torch.stack([to_tensor(Image.open(r).convert("RGB"), manifest.preprocess) for r in refs])
    with torch.inference_mode():
        trained = result.model.eval().embed(pixels).numpy()
    np.testing.assert_allclose(vectors, trained, rtol=1e-4, atol=1e-5)


def test_loss_settings_are_checked() -> None:
    assert TrainSettings().loss == "softmax"  # the paper's recipe stays the default
    assert TrainSettings(loss="normalized-softmax", temperature=0.1).temperature == 0.1
    with pytest.raises(ValidationError, match="'softmax' or 'normalized-softmax'"):
        TrainSettings(loss="arcface")
    with pytest.raises(ValidationError, match="temperature applies to loss 'normalized-softmax' only"):
        TrainSettings(temperature=0.1)  # the paper's softmax has no temperature
    with pytest.raises(ValidationError, match="greater than 0"):
        TrainSettings(loss="normalized-softmax", temperature=0)
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        TrainSettings(loss="normalized-softmax", temperature=5)
    dumped = TrainSettings().model_dump()  # a dumped softmax setting (default temperature) validates again
    assert TrainSettings.model_validate(dumped) == TrainSettings()


def test_the_estimate_is_said_before_training_and_progress_spans_each_phase(
    make_catalogue: MakeCatalogue, tmp_path: Path
) -> None:
    """`announce` gets the time estimate before any work (timed here on the real model and images,
    extrapolated over the stages); phase 2's progress counts its steps over every epoch."""
    catalogue = read_catalogue(make_catalogue(30))
    settings = _with(small_settings(tmp_path), validation=0.2, epochs_frozen=1, epochs_finetune=2)
    settings = _with(settings, batch_size=8, finetune_images=12)  # phase 2: 2 batches an epoch
    estimates: list[Estimate] = []
    events: list[tuple[str, int, int]] = []

    def progress(stage: str, done: int, total: int) -> None:
        assert len(estimates) == 1  # said before any work
        events.append((stage, done, total))

    trained = train(catalogue, settings, torch.device("cpu"), progress, announce=estimates.append)
    guess = estimates[0]
    assert guess.probe_images == 8 and guess.device == "cpu"  # one batch, on this device
    infer, step = guess.seconds_per_image["infer"], guess.seconds_per_image["train"]
    assert 0 < infer < step and guess.seconds_per_step > 0  # backward costs more than forward alone
    fit, val = trained.metrics["train_images"], trained.metrics["validation_images"]
    held = trained.metrics["heldout_images"]
    assert guess.stages == {
        "features": pytest.approx((fit + val) * infer),
        "finetune": pytest.approx(2 * (12 * step + 2 * guess.seconds_per_step)),  # 2 epochs of 2 batches
        "validation": pytest.approx(2 * val * infer),
        "evaluate": pytest.approx(held * infer),
    }
    assert guess.seconds == pytest.approx(sum(guess.stages.values())) and not guess.long
    assert guess.message().startswith("estimated training time: about ") and "an estimate" in guess.message()

    steps = [(done, total) for stage, done, total in events if stage == "finetune"]
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]  # one count over both epochs, never reset


def test_measuring_the_estimate_changes_nothing_training_computes(
    make_catalogue: MakeCatalogue, tmp_path: Path
) -> None:
    """The probe trains a copy: the model's weights, gradients and mode, and the random state training
    draws from (augmentation, shuffles), are as they were."""
    settings = _with(small_settings(tmp_path), batch_size=8)
    classes, fit, val, held = split_data(read_catalogue(make_catalogue(12)), settings.train)
    model = build_model("resnet18", len(classes), "softmax", settings.train.temperature)
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    random_state = torch.get_rng_state()
    run = Run(settings.train, settings, torch.device("cpu"), None, fit, val)
    guess = estimate(run, model, len(held.refs))
    assert guess is not None and guess.seconds > 0
    assert torch.equal(torch.get_rng_state(), random_state) and model.training
    assert all(torch.equal(tensor, weights[name]) for name, tensor in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_a_long_estimate_names_the_demos_quick_settings() -> None:
    def estimate(seconds: float, cfg: TrainSettings) -> Estimate:
        return Estimate({"finetune": seconds}, 16, {"infer": 0.1, "train": 0.3}, 0.1, "cpu", cfg)

    assert estimate(60, TrainSettings()).message().count("\n") == 0  # a minute: no advice
    long = estimate(227, TrainSettings()).message()  # the paper's recipe: 224 px, 10 + 10 epochs
    assert "about 3 min 47 s on cpu" in long
    assert "--image-size 64 --epochs-frozen 10 --epochs-finetune 1" in long  # as scripts/demo.sh
    variables = "VISREC_TRAIN__IMAGE_SIZE=64 VISREC_TRAIN__EPOCHS_FROZEN=10 VISREC_TRAIN__EPOCHS_FINETUNE=1"
    assert variables in long
    demo = (Path(__file__).parents[1] / "scripts" / "demo.sh").read_text()
    assert 'train "$catalogue" --image-size 64 --epochs-frozen 10 --epochs-finetune 1\n' in demo
    quick = TrainSettings(image_size=64, epochs_frozen=10, epochs_finetune=1)
    assert "already the demo's quick settings" in estimate(4000, quick).message()
    assert "about 1 h 6 min" in estimate(4000, quick).message()
