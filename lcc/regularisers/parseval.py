"""Parseval regularisation (Cisse et al. 2017; LGG paper Table 3's baseline), as a penalty.

The term is ``sum_l ||W_l W_l^T - I||_F^2`` over the weight matrices ``W_l`` of the chosen
layers (``nn.Linear``: ``(out, in)``; convolutions: the kernel unfolded to ``(out, in * kh *
kw)``; when a matrix has more rows than columns, ``W^T W - I``, the Gram matrix that can be the
identity). It keeps the layers close to Parseval tight frames (rows orthonormal, Lipschitz
constant <= 1 in L2).

This is a **penalty** added to the loss, not Cisse et al.'s constraint: they follow each SGD
step with the retraction ``W <- (1 + beta) W - beta W W^T W``. One plain SGD step on
``weight * term`` (learning rate ``lr``) moves ``W`` by ``-4 lr weight (W W^T - I) W``, which is
that retraction with ``beta = 4 lr weight``; momentum and the cross-entropy's own step make the
two differ. The paper's convexity constraint on aggregation layers (residual sums) is not
applied.

Which weights: ``modules=NAME,...`` (modules with a weight matrix: Linear, Conv); empty (the
default): every Linear and Conv layer of the model, as Cisse et al. The term reads weights, not
latents: nothing is hooked, and ``layers`` (which ``lcc train`` fills with its ``--layers``) is
not used.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(3, 2, bias=False))
>>> with torch.no_grad():
...     _ = model[0].weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]))
>>> reg = Parseval()
>>> reg.bind(model, num_classes=2)
>>> float(reg(None).detach())  # (2^2 - 1)^2
9.0
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lcc.errors import LCCInputError
from lcc.regularisers.base import OUTPUT, Regulariser
from lcc.regularisers.parseval_options import ParsevalOptions
from lcc.zoo.latents import check_layer_names

__all__ = ["Parseval", "ParsevalOptions", "parseval_penalty", "weight_matrix"]

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def weight_matrix(weight: Tensor) -> Tensor:
    """A layer's weight as a matrix: ``(out, in)``, a kernel unfolded to ``(out, in * k...)``.

    >>> weight_matrix(torch.zeros(8, 3, 5, 5)).shape
    torch.Size([8, 75])
    """
    return weight.reshape(weight.shape[0], -1)


def parseval_penalty(weight: Tensor) -> Tensor:
    """``||W W^T - I||_F^2`` (or ``||W^T W - I||_F^2`` when ``W`` has more rows than columns).

    >>> parseval_penalty(torch.eye(3)), parseval_penalty(torch.ones(1, 4))
    (tensor(0.), tensor(9.))
    """
    matrix = weight_matrix(weight)
    if matrix.dtype in (torch.float16, torch.bfloat16):
        matrix = matrix.float()
    gram = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return (gram - eye).pow(2).sum()


class Parseval(Regulariser):
    """The ``parseval`` regulariser (summary and options: :class:`ParsevalOptions`).

    ``modules``: modules with a weight matrix (default: every Linear and Conv layer); reads no
    latents (``layers`` is not used).
    """

    name = "parseval"
    Options = ParsevalOptions
    labeled_only = False

    def __init__(self, options: ParsevalOptions | None = None, **overrides: Any) -> None:
        super().__init__(options, **overrides)
        self._weighted: list[tuple[str, nn.Module]] = []

    @property
    def layers(self) -> tuple[str, ...]:
        """No latent is read: the logits pseudo-layer, which the trainer never hooks."""
        return (OUTPUT,)

    @property
    def penalised(self) -> tuple[str, ...]:
        """Names of the modules whose weights the term penalises (after :meth:`bind`)."""
        return tuple(name for name, _ in self._weighted)

    def bind(self, model: nn.Module, *, num_classes: int, sample: Any = None) -> None:
        """Find the weights to penalise."""
        named = {name: module for name, module in model.named_modules() if name}
        weighted = [name for name, module in named.items() if _has_matrix(module)]
        if self.options.modules:
            chosen = check_layer_names(model, self.options.modules)
            lacking = [name for name in chosen if not _has_matrix(named[name])]
            if lacking:
                shown = ", ".join(weighted[:8]) + (", ..." if len(weighted) > 8 else "")
                raise LCCInputError(
                    f"parseval penalises weight matrices, and layer(s) {lacking} have none; "
                    f"choose among: {shown or 'none'} (or leave modules empty for all)"
                )
        else:
            chosen = [name for name in weighted if isinstance(named[name], _WEIGHTED)]
            if not chosen:
                raise LCCInputError(
                    "parseval found no Linear or Conv layer in the model; pass modules=NAME,... "
                    "naming modules with a weight matrix"
                )
        # plain list: the modules stay the model's, not this regulariser's submodules
        self._weighted = [(name, named[name]) for name in chosen]

    def forward(self, batch: Any) -> Tensor:
        if not self._weighted:
            raise LCCInputError("parseval has no model yet; call bind(model, num_classes=...)")
        terms = [parseval_penalty(module.weight) for _, module in self._weighted]
        return torch.stack(terms).sum()


def _has_matrix(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, Tensor) and weight.ndim >= 2
