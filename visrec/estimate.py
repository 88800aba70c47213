"""How long `visrec train` will take here, said before it starts: a few images timed on this device
through the very model, input size and data training uses, then extrapolated over the run's stages
(phase 1's feature pass, phase 2's epochs and validations, the held-out evaluation).

It is an estimate: the probe is a small batch, a resumed run skips what its work folder holds, and
early stopping may end a phase sooner. When it is long, the message names the quick settings the demo
trains with (`scripts/demo.sh`)."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from visrec.config import TrainSettings
from visrec.images import AugmentedImages, ImageDataset, collate_images
from visrec.model import VisrecNet
from visrec.phases import Run, freeze_batchnorm

# Images timed on a CPU: few, as the probe costs their training step, but not so few that a batch's
# fixed costs dominate. At 224 px on a loaded 2-core machine (ResNet50, 48 products, 2 + 1 epochs), 8
# images estimated 153 s for stages that took 124 s (the probe ~45 s); 4 estimated 257 s for 164 s (the
# probe ~33 s). On an accelerator a whole batch is timed: a small one would leave it idle.
CPU_PROBE_IMAGES = 8
WARM_UP_IMAGES = 1
LONG_S = 120.0  # beyond this, the quick settings are suggested
# The demo's quick settings (scripts/demo.sh): 64 px inputs, phase 1 on cached features, one phase-2 epoch.
QUICK = {"image_size": 64, "epochs_frozen": 10, "epochs_finetune": 1}


@dataclass(frozen=True)
class Estimate:
    """Seconds each stage of a training run should take here, and what they were worked out from."""

    stages: dict[str, float]  # features, finetune, validation, evaluate
    probe_images: int
    seconds_per_image: dict[str, float]  # "infer" (no gradient), "train" (forward and backward)
    seconds_per_step: float  # Adam's step over every weight, once a batch whatever its size
    device: str
    cfg: TrainSettings

    @property
    def seconds(self) -> float:
        return sum(self.stages.values())

    @property
    def long(self) -> bool:
        return self.seconds > LONG_S

    def message(self) -> str:
        """What `visrec train` says before it starts: the estimate, and the quick settings when long."""
        cfg = self.cfg
        said = (
            f"estimated training time: about {duration(self.seconds)} on {self.device} (an estimate from "
            f"{self.probe_images} images timed here, extrapolated over {cfg.epochs_frozen} + "
            f"{cfg.epochs_finetune} epochs at {cfg.image_size} px; a run resumed from its work folder "
            "or stopped early takes less)"
        )
        if not self.long:
            return said
        if all(getattr(cfg, name) <= value for name, value in QUICK.items()):
            return f"{said}\nthese are already the demo's quick settings: a GPU trains faster (docs/gpu.md)"
        # All three, as the demo writes them: a line to copy, whatever this run already has.
        flags = " ".join(f"--{name.replace('_', '-')} {value}" for name, value in QUICK.items())
        variables = " ".join(f"VISREC_TRAIN__{name.upper()}={value}" for name, value in QUICK.items())
        return (
            f"{said}\nfor a quick model, as scripts/demo.sh trains it: {flags} (or {variables}); "
            "the full recipe is for a GPU"
        )


def duration(seconds: float) -> str:
    """`seconds` as a person reads it: 40 s, 3 min 47 s, 2 h 5 min."""
    seconds = max(1, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def estimate(run: Run, model: VisrecNet, held_out: int) -> Estimate | None:
    """Time a probe batch of the training images through `model` on `run.device` (decoding, a forward
    pass without gradients, a training step's forward and backward) and extrapolate over the run with
    `held_out` evaluation images; None when no probe image decodes (training then says what is wrong).
    Leaves the model and the random state training draws from as they were."""
    cfg = run.cfg
    size = min(cfg.batch_size, len(run.fit.refs))
    if run.device.type == "cpu":
        size = min(size, CPU_PROBE_IMAGES)
    refs = run.fit.refs[:size]
    with torch.random.fork_rng(devices=[]):  # the augmentation's draws: training's seeded ones stay its own
        decode = _decode_seconds(run.images(refs), refs)
        augmented = AugmentedImages(refs, run.pre, run.limits, cfg.hflip, cfg.crop_scale)
        decode_train = _decode_seconds(augmented, refs)
        pixels = collate_images([augmented[i] for i in range(len(refs))]).pixels.to(run.device)
        if not len(pixels):
            return None
        infer, train, step = _compute_seconds(model, pixels, cfg.lr_finetune)
    per_image = {
        "infer": _overlapped(infer, decode, run.workers) / len(pixels),
        "train": _overlapped(train, decode_train, run.workers) / len(pixels),
    }
    fit, val = len(run.fit.refs), len(run.val.refs)
    per_epoch = min(cfg.finetune_images or fit, fit)
    batches = math.ceil(per_epoch / cfg.batch_size)
    # Phase 1's epochs train the new layers on cached features, no image pass: small next to the
    # rest (about 1 s an epoch for the tests' ResNet18 on a loaded 2-core machine), left out.
    stages = {
        "features": (fit + val) * per_image["infer"] if cfg.epochs_frozen else 0.0,
        "finetune": cfg.epochs_finetune * (per_epoch * per_image["train"] + batches * step),
        "validation": cfg.epochs_finetune * val * per_image["infer"],
        "evaluate": held_out * per_image["infer"],
    }
    return Estimate(stages, len(pixels), per_image, step, str(run.device), cfg)


def _decode_seconds(dataset: ImageDataset, refs: Sequence[str]) -> float:
    started = time.perf_counter()
    for i in range(len(refs)):
        dataset[i]
    return time.perf_counter() - started


def _overlapped(compute: float, decode: float, workers: int) -> float:
    """A batch's time: DataLoader workers decode the next batches while this one computes."""
    return max(compute, decode / workers) if workers else compute + decode


def _compute_seconds(model: VisrecNet, pixels: torch.Tensor, lr: float) -> tuple[float, float, float]:
    """Seconds on `pixels` of a forward pass, of a training step's forward, loss and backward, and of
    its Adam step (over every weight: on small inputs it costs as much as the rest). On a copy of the
    model, so that the one training starts from is left exactly as it was. A step on one image first
    sets up kernels, memory and Adam's state, untimed; the timed step's forward stands for an
    inference pass (a little slower: autograd keeps what backward needs), which saves the probe one."""
    probe = copy.deepcopy(model)
    optimiser = torch.optim.Adam(probe.parameters(), lr=lr)
    probe.train()
    freeze_batchnorm(probe)  # as phase 2 trains: BatchNorm keeps its statistics
    _train_step(probe, optimiser, pixels[:WARM_UP_IMAGES])
    forward, backward, step = _train_step(probe, optimiser, pixels)
    return forward, forward + backward, step


def _train_step(
    model: nn.Module, optimiser: torch.optim.Optimizer, pixels: torch.Tensor
) -> tuple[float, float, float]:
    """One training step on `pixels`: the seconds of its forward (and loss), backward, and Adam step."""
    targets = torch.zeros(len(pixels), dtype=torch.long, device=pixels.device)  # class 0: any will do
    started = time.perf_counter()
    loss = nn.functional.cross_entropy(model(pixels), targets)
    _sync(pixels.device)
    forward = time.perf_counter()
    loss.backward()
    _sync(pixels.device)
    backward = time.perf_counter()
    optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    _sync(pixels.device)
    return forward - started, backward - forward, time.perf_counter() - backward


def _sync(device: torch.device) -> None:
    """Wait for an accelerator's queued work, so that the clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
