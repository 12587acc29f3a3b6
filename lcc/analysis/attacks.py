"""L-inf adversarial attacks (FGSM, PGD) on a classifier, through foolbox.

Perturbations live in **pixel units before normalisation**: images scaled to [0, 1] (uint8 /
255), ``eps`` is the L-inf radius in those units (``eps = 8/255`` is 8 grey levels), and every
adversarial image is clipped to [0, 1]. :class:`PixelModel` puts the dataset's normalisation
(the same float32 arithmetic as :class:`lcc.zoo.datasets.ImageTensorDataset`) in front of the
model, so an attack with ``eps = 0`` feeds the model exactly the clean test inputs.

- FGSM (Goodfellow et al. 2015): ``x + eps * sign(grad_x CE)``, one step, no random start
  (foolbox ``LinfFastGradientAttack``);
- PGD (Madry et al. 2018): ``steps`` steps of size ``alpha`` from a uniform random start in
  the eps-ball, each projected back onto the ball and [0, 1] (foolbox ``LinfPGD``); the random
  start is drawn from torch's RNG seeded with ``seed``.

>>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
>>> pixels = torch.full((3, 1, 2, 2), 0.5)
>>> adv = attack(PixelModel(model, mean=(0.5,), std=(0.25,)), pixels, torch.tensor([0, 1, 0]),
...              kind="fgsm", eps=0.1)
>>> round(float((adv - pixels).abs().max()), 6)
0.1
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lcc.errors import LCCInputError, check_integer, check_number

__all__ = ["ATTACKS", "PGDSpec", "PixelModel", "attack", "parse_eps_list", "parse_pgd"]

ATTACKS = ("fgsm", "pgd")


@dataclass(frozen=True)
class PGDSpec:
    """One PGD setting: L-inf radius, number of steps, step size (pixel units in [0, 1])."""

    eps: float
    steps: int
    alpha: float

    @property
    def key(self) -> str:
        """The setting as written on the command line (``EPS:STEPS:ALPHA``)."""
        return f"{self.eps:g}:{self.steps}:{self.alpha:g}"


def parse_eps_list(text: str, name: str = "--fgsm") -> list[float]:
    """``"0.01,0.1"`` -> ``[0.01, 0.1]``; every eps a finite number >= 0.

    >>> parse_eps_list("0, 8/255")
    [0.0, 0.03137254901960784]
    """
    pieces = filter(None, (part.strip() for part in str(text).split(",")))
    values = [_eps(piece, name) for piece in pieces]
    if not values:
        raise LCCInputError(f"{name} needs at least one eps, e.g. {name} 0.01,0.03")
    return values


def _eps(piece: str, name: str) -> float:
    try:
        if "/" in piece:
            top, _, bottom = piece.partition("/")
            value = float(top) / float(bottom)
        else:
            value = float(piece)
    except (ValueError, ZeroDivisionError):
        raise LCCInputError(
            f"{name}: cannot read eps {piece!r}; write numbers like 0.03 or 8/255"
        ) from None
    if not np.isfinite(value) or value < 0:
        raise LCCInputError(
            f"{name}: eps must be >= 0 (an L-inf radius in pixel units, [0, 1]), got {piece}"
        )
    if value > 1:
        raise LCCInputError(
            f"{name}: eps {piece} exceeds the pixel range [0, 1]; eps is in pixel units / 255"
        )
    return value


def parse_pgd(text: str) -> list[PGDSpec]:
    """``"EPS:STEPS:ALPHA[,EPS:STEPS:ALPHA...]"`` -> :class:`PGDSpec` list.

    >>> [s.key for s in parse_pgd("0.1:10:0.02, 8/255:20:2/255")]
    ['0.1:10:0.02', '0.0313725:20:0.00784314']
    """
    specs = []
    for piece in filter(None, (part.strip() for part in str(text).split(","))):
        parts = piece.split(":")
        if len(parts) != 3:
            raise LCCInputError(f"--pgd: write EPS:STEPS:ALPHA (e.g. 0.1:10:0.02), got {piece!r}")
        eps = _eps(parts[0], "--pgd")
        steps = check_integer(parts[1].strip(), "--pgd STEPS", 1)
        alpha = _eps(parts[2], "--pgd ALPHA")
        if alpha == 0:
            raise LCCInputError(f"--pgd: the step size ALPHA must be > 0, got {parts[2]}")
        specs.append(PGDSpec(eps, steps, alpha))
    if not specs:
        raise LCCInputError("--pgd needs EPS:STEPS:ALPHA, e.g. --pgd 0.1:10:0.02")
    return specs


class PixelModel(nn.Module):
    """``model`` fed with images in [0, 1]: ``x * 255 * (1 / (255 std)) - mean / std``, the float32
    arithmetic of :class:`lcc.zoo.datasets.ImageTensorDataset` (exact for ``x = uint8 / 255``)."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        std_a = np.asarray(std, np.float32).reshape(-1, 1, 1)
        mean_a = np.asarray(mean, np.float32).reshape(-1, 1, 1)
        self.register_buffer("scale", torch.from_numpy((1.0 / (255.0 * std_a)).astype(np.float32)))
        self.register_buffer("shift", torch.from_numpy((-mean_a / std_a).astype(np.float32)))

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.scale.to(x.dtype), self.shift.to(x.dtype)
        return self.model((x * 255.0) * scale + shift)


def _foolbox() -> Any:
    """foolbox, imported without its SciPy deprecation warning."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import foolbox
    except ImportError as error:
        raise LCCInputError(
            f"--fgsm/--pgd need foolbox ({error}); install it with "
            "`pip install -c constraints.txt -e '.[robustness]'`"
        ) from None
    return foolbox


def attack(
    model: nn.Module,
    pixels: Tensor,
    labels: Tensor,
    *,
    kind: str,
    eps: float,
    steps: int = 10,
    alpha: float | None = None,
    seed: int = 0,
) -> Tensor:
    """Adversarial versions of ``pixels`` (B, C, H, W) in [0, 1] against ``model`` (which takes
    [0, 1] images, e.g. a :class:`PixelModel`), L-inf radius ``eps``, clipped to [0, 1].

    ``kind``: ``fgsm`` or ``pgd`` (``steps`` of size ``alpha``, default ``2.5 eps / steps``,
    uniform random start seeded with ``seed``). The model is put in eval mode.
    """
    if kind not in ATTACKS:
        raise LCCInputError(f"attack {kind!r} is not one of {', '.join(ATTACKS)}")
    eps = check_number(eps, "eps", low=0.0)
    if pixels.numel() and (float(pixels.min()) < 0 or float(pixels.max()) > 1):
        raise LCCInputError("attack inputs must be images in [0, 1] (pixel values / 255)")
    fb = _foolbox()
    model.eval()
    fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0), device=pixels.device)
    if kind == "fgsm":
        method = fb.attacks.LinfFastGradientAttack(random_start=False)
    else:
        step = alpha if alpha is not None else 2.5 * eps / max(steps, 1)
        method = fb.attacks.LinfPGD(abs_stepsize=step, steps=int(steps), random_start=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, clipped, _ = method(fmodel, pixels, labels.to(pixels.device), epsilons=eps)
    return clipped.detach()
