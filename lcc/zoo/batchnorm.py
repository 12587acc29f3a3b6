"""BatchNorm statistics for the fresh latent pass of a refresh (``--refresh-bn``).

In eval mode a BatchNorm layer normalises with its running statistics, which lag the weights
while they change fast (fine-tuning at a large learning rate): the latents of an eval pass may
then be far from those the training forward produces (batch statistics), and LCC's targets are
computed in a space training never sees. Three ways to run the fresh pass:

- ``running``: eval mode, running statistics (the paper's reference code);
- ``batch``: :func:`batch_statistics`: every BatchNorm layer normalises with the statistics of
  the batch, as in training, while its running statistics stay untouched and every other layer
  (dropout) is in eval mode;
- ``recalibrate``: :func:`recalibrate` first re-estimates the running statistics on a seeded
  sample of the training set (precise BN: the equally weighted average of per-batch means and
  unbiased variances), then the pass runs in eval mode with them. The recalibrated statistics
  stay in the model (they are better estimates for evaluation too).

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
>>> before = model[1].running_mean.clone()
>>> with batch_statistics(model):
...     out = model(torch.randn(8, 2))
>>> bool(torch.equal(model[1].running_mean, before)), model.training, model[1].training
(True, True, True)
>>> bool(out.mean(0).abs().max() < 1e-5)  # normalised with the batch's own statistics
True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from lcc.engine.choices import REFRESH_BN
from lcc.errors import LCCInputError, check_choice
from lcc.zoo.latents import eval_mode, model_device

__all__ = [
    "RECALIBRATE_SAMPLES",
    "REFRESH_BN",
    "batch_norm_layers",
    "batch_statistics",
    "recalibrate",
]

#: Training samples whose batches re-estimate the running statistics (``recalibrate``).
RECALIBRATE_SAMPLES = 4096


def batch_norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers (1-d, 2-d, 3-d, sync, lazy) of ``model``."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block, except that BatchNorm layers normalise with the statistics
    of each batch and leave their running statistics (and ``num_batches_tracked``) untouched.
    A batch of one sample (which has no batch variance) is normalised with the running
    statistics. Every flag is restored on exit."""
    layers = batch_norm_layers(model)
    tracked = [layer.track_running_stats for layer in layers]
    hooks = [layer.register_forward_pre_hook(_batch_or_running) for layer in layers]
    with eval_mode(model):
        try:
            for layer in layers:
                layer.track_running_stats = False  # train mode without updating the buffers
            yield model
        finally:
            for hook in hooks:
                hook.remove()
            for layer, flag in zip(layers, tracked, strict=True):
                layer.track_running_stats = flag


def _batch_or_running(module: nn.Module, inputs: tuple[Any, ...]) -> None:
    """Batch statistics for a batch of several samples, running ones for a single sample."""
    module.training = inputs[0].shape[0] > 1


def recalibrate(
    model: nn.Module,
    dataset: Any,
    *,
    batch_size: int = 128,
    samples: int = RECALIBRATE_SAMPLES,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> int:
    """Re-estimate every BatchNorm layer's running statistics on ``samples`` rows of
    ``dataset`` (items ``(x, ...)``; drawn without replacement by ``seed``; all rows when there
    are fewer) in batches of ``batch_size``: each layer's running mean and variance become the
    average over the batches of the batch mean and unbiased variance (momentum ``None``), the
    other layers in eval mode. Returns the number of batches (0: the model has no BatchNorm).

    >>> from torch.utils.data import TensorDataset
    >>> data = TensorDataset(torch.randn(64, 2) * 3 + 1)
    >>> model = torch.nn.Sequential(torch.nn.BatchNorm1d(2))
    >>> recalibrate(model, data, batch_size=16, samples=64)
    4
    >>> bool(torch.allclose(model[0].running_mean, data.tensors[0].mean(0), atol=1e-5))
    True
    """
    layers = [layer for layer in batch_norm_layers(model) if layer.track_running_stats]
    if not layers:
        return 0
    n = len(dataset)
    if n == 0:
        raise LCCInputError("the training set is empty; nothing to recalibrate BatchNorm on")
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(n, samples)]
    loader = DataLoader(
        Subset(dataset, rows.tolist()),
        batch_size=batch_size,
        shuffle=False,
        drop_last=rows.shape[0] > batch_size,  # no tiny last batch (a batch of 1 fails)
    )
    target = torch.device(device) if device is not None else model_device(model)
    momenta = [layer.momentum for layer in layers]
    batches = 0
    with eval_mode(model), torch.no_grad():
        try:
            for layer in layers:
                layer.reset_running_stats()
                layer.momentum = None  # cumulative average: every batch weighs the same
                layer.training = True
            for batch in loader:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(x.to(target) if isinstance(x, torch.Tensor) else x)
                batches += 1
        finally:
            for layer, momentum in zip(layers, momenta, strict=True):
                layer.momentum = momentum
    return batches


def check_refresh_bn(value: object) -> str:
    """``value`` if it is one of :data:`REFRESH_BN`, else a one-line error."""
    return check_choice(value, REFRESH_BN, name="refresh_bn")
