"""Lightning integration: a classifier trained with ``CE + weighted regulariser terms``.

:class:`LCCModule` owns the model and a :class:`lcc.train.loop.Regularisation` (none: the
baseline). Its ``training_step`` computes ``loss = ce_weight * CE(logits, y) + regs.loss(...)``
and records the batch with ``regs.observe``; ``on_train_epoch_start`` calls
``regs.start_epoch(epoch, loader, exchange=...)``, the same refresh as the plain loop's, for any
number of processes (:mod:`lcc.train.exchange`: under DDP every rank passes over its shard of
the non-augmented training set, rank 0 computes the refresh once, every rank installs the
broadcast states). The optimiser is SGD (momentum 0.9 by default) with a per-step cosine
schedule over the run. Data order and resumable loaders: :mod:`lcc.train.data`; the refresh
journal and the epoch line: :mod:`lcc.train.journal`.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
>>> module = LCCModule(model, num_classes=3, n_train=30)
>>> module.model(torch.zeros(2, 1, 2, 2)).shape
torch.Size([2, 3])
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lcc.regularisers.base import Regulariser
from lcc.regularisers.lcc import LCC
from lcc.train.data import preserved_rng
from lcc.train.epochs import shown_epoch
from lcc.train.exchange import Exchange, current_exchange
from lcc.train.journal import REPORTED, epoch_line, layer_stats, refresh_metrics, write_refresh
from lcc.train.loop import Regularisation
from lcc.train.training_options import end_of_epoch, make_optimizer, schedule_factor
from lcc.zoo.datasets import IndexedDataset

__all__ = ["LCCModule", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    """The training loss (or the weights) became NaN/inf; the run stops, checkpoints are kept."""


class LCCModule(pl.LightningModule):
    """A classifier trained with ``CE + sum of weighted regulariser terms`` (none: the baseline).

    ``regularisers`` (:mod:`lcc.regularisers`) with ``source``/``pool``: how the latents of the
    whole training set are obtained and how conv maps become vectors. ``n_train`` is the
    training-set size (for the per-sample buffers); ``refresh_data`` is the non-augmented
    training set yielding ``(x, y)`` (same order as the training set) used by the ``fresh``
    latent pass, in batches of ``refresh_batch_size`` (``lcc train`` passes its training batch
    size: on CPU larger eval batches were slower -- small-resnet's pass over 10,000 images took
    0.8 s at 128 and 1.6 s at 256); ``out_dir`` (rank 0) receives the refresh journal
    (:func:`lcc.train.journal.write_refresh`; with ``save_latents`` the latents too).
    Cross-entropy is averaged over the labelled samples of a batch (label ``-1``: unlabelled).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        num_classes: int,
        n_train: int,
        regularisers: Sequence[Regulariser] = (),
        source: str = "fresh",
        pool: str = "flatten",
        refresh_bn: str = "running",
        sample: Tensor | None = None,
        latents_dir: str | Path | None = None,
        latents_dtype: str = "float32",
        ce_weight: float = 1.0,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        optimizer: str = "sgd",
        adam_lr_scale: float = 1.0,
        schedule: str = "cosine",
        stop_at_train_loss: float | None = None,
        tracker: Any = None,
        refresh_data: Dataset | None = None,
        refresh_batch_size: int = 128,
        num_workers: int = 0,
        out_dir: str | Path | None = None,
        save_latents: bool = False,
        report: bool = False,
    ):
        super().__init__()
        self.model = model
        self.num_classes = int(num_classes)
        self.n_train = int(n_train)
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.ce_weight = float(ce_weight)
        self.optimizer_name, self.adam_lr_scale = optimizer, float(adam_lr_scale)
        self.schedule, self.stop_at_train_loss = schedule, stop_at_train_loss
        self.tracker = tracker  # --track-measures (lcc.train.tracking), main process only
        self.refresh_data = refresh_data
        self.refresh_batch_size = int(refresh_batch_size)
        self.num_workers = int(num_workers)
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.save_latents = bool(save_latents)
        self.report = bool(report)
        self.regularisation: Regularisation | None = None
        if regularisers:
            if sample is None and refresh_data is not None and len(refresh_data) > 0:  # type: ignore[arg-type]
                sample = torch.stack([refresh_data[i][0] for i in range(min(2, len(refresh_data)))])  # type: ignore[arg-type]
            self.regularisation = Regularisation(
                model,
                regularisers,
                source=source,
                pool=pool,
                refresh_bn=refresh_bn,
                n_samples=self.n_train,
                num_classes=self.num_classes,
                sample=sample,
                latents_dir=latents_dir,
                latents_dtype=latents_dtype,
            )
        self.history: list[dict[str, Any]] = []  # one record per finished epoch
        self.test_metrics: dict[str, float] = {}
        self._epoch_start = self._epoch_cpu_start = 0.0
        self._refresh_seconds = 0.0
        self._refresh_stats: dict[str, Any] | None = None
        self._sums = np.zeros(6)  # loss*B, ce*B, reg*B, correct, count, labelled
        self._term_sums: dict[str, float] = {}
        self._seen = np.zeros(self.n_train, dtype=bool)
        self.batches_done = 0  # training steps finished in epoch ``batches_epoch``
        self.batches_epoch = 0
        self._mid_epoch: dict[str, Any] | None = None  # a mid-epoch checkpoint's epoch state

    @property
    def lcc(self) -> LCC | None:
        """The LCC regulariser of this run (the first one), or None."""
        if self.regularisation is None:
            return None
        return next((r for r in self.regularisation.regularisers if isinstance(r, LCC)), None)  # type: ignore[return-value]

    @property
    def exchange(self) -> Exchange:
        """The collectives of this run's processes (the identity in one process)."""
        return current_exchange()

    # --- forward / optimisation --------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def setup(self, stage: str) -> None:
        if self.regularisation is not None:
            self.regularisation.to(self.device)

    def configure_optimizers(self) -> Any:
        groups: list[dict[str, Any]] = [{"params": list(self.model.parameters())}]
        own = [] if self.regularisation is None else list(self.regularisation.parameters())
        if own:  # e.g. k-means centroids: no weight decay pulling them towards 0
            groups.append({"params": own, "weight_decay": 0.0})
        optimizer = make_optimizer(
            groups,
            self.optimizer_name,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            adam_lr_scale=self.adam_lr_scale,
        )
        totals: list[int] = []

        def factor(step: int) -> float:
            # the number of steps is read at the first step, not here: asking for it now would
            # build the train loader before a checkpoint restores its position (mid-epoch resume)
            if step == 0:
                return 1.0
            if not totals:
                totals.append(max(1, int(self.trainer.estimated_stepping_batches)))
            return schedule_factor(self.schedule, step, totals[0])

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # --- training ----------------------------------------------------------------------------

    def on_train_start(self) -> None:
        self._restored_epoch = int(self.current_epoch) if self._resume_mid_epoch() else None

    def on_train_epoch_start(self) -> None:
        if getattr(self, "_restored_epoch", None) == int(self.current_epoch):
            self._restored_epoch = None  # continuing a mid-epoch checkpoint: already restored
            return
        self._epoch_start = time.perf_counter()
        self._epoch_cpu_start = time.process_time()
        self._refresh_seconds = 0.0
        self._refresh_stats = None
        self._sums[:] = 0
        self._term_sums = {}
        self._seen[:] = False
        self.batches_done = 0
        self.batches_epoch = int(self.current_epoch)
        if self.regularisation is not None:
            self._start_regularisation(int(self.current_epoch))

    def _start_regularisation(self, epoch: int) -> None:
        """The regularisers' epoch start: the refresh when one is due, then its journal."""
        regs = self.regularisation
        assert regs is not None
        start = time.perf_counter()
        with preserved_rng():
            stats = regs.start_epoch(epoch, self._plain_loader(), exchange=self.exchange)
        if stats is None:
            return
        self._refresh_seconds = time.perf_counter() - start
        refreshed = regs.last_refresh
        assert refreshed is not None
        self._refresh_stats = layer_stats(refreshed.states)
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(refresh_metrics(refreshed.states, epoch), step=self.global_step)
            if self.out_dir is not None:
                fine = getattr(self, "fine_targets", None)  # a superclass run's fine labels
                write_refresh(self.out_dir, refreshed, save_latents=self.save_latents, fine=fine)

    def _plain_loader(self) -> DataLoader | None:
        """The non-augmented training set as ``(x, y, index)`` batches (None without it)."""
        if self.refresh_data is None:
            return None
        dataset = self.refresh_data
        if not getattr(dataset, "yields_index", False):  # e.g. lcc.zoo.labels.MaskedLabels
            dataset = IndexedDataset(dataset)
        return DataLoader(
            dataset, batch_size=self.refresh_batch_size, shuffle=False, num_workers=self.num_workers
        )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y, index = batch
        logits = self.model(x)
        labelled = y >= 0
        if bool(labelled.all()):
            ce = F.cross_entropy(logits, y)
        elif bool(labelled.any()):
            ce = F.cross_entropy(logits[labelled], y[labelled])
        else:  # an all-unlabelled batch: no cross-entropy, still attached to the graph
            ce = logits.sum() * 0.0
        if self.regularisation is not None:
            term = self.regularisation.loss(index, y=y, logits=logits, x=x)
            self.regularisation.observe(index, logits, y)
            for key, value in self.regularisation.terms.items():
                self._term_sums[key] = self._term_sums.get(key, 0.0) + value * int(y.shape[0])
        else:
            term = ce.new_zeros(())
        loss = ce + term if self.ce_weight == 1.0 else self.ce_weight * ce + term
        self._check_finite(loss, ce, term, batch_idx)
        size = int(y.shape[0])
        correct = int((logits.detach().argmax(1) == y)[labelled].sum())
        self._sums += (
            float(loss.detach()) * size,
            float(ce.detach()) * size,
            float(term.detach()) * size,
            correct,
            size,
            int(labelled.sum()),
        )
        self._seen[index.detach().cpu().numpy()] = True
        self.batches_done += 1
        if self._trainer is not None:
            self.log("loss", loss.detach(), prog_bar=True, on_epoch=False, logger=False)
        return loss

    def _world(self) -> int:
        return 1 if self._trainer is None else int(self.trainer.world_size)

    def on_after_backward(self) -> None:
        """DDP: the regularisers' own parameters live outside the wrapped model, so average
        their gradients across processes here."""
        import torch.distributed as dist

        if self.regularisation is None or not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size()
        for parameter in self.regularisation.parameters():
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            dist.all_reduce(parameter.grad)
            parameter.grad /= world

    def on_train_epoch_end(self) -> None:
        epoch = int(self.current_epoch)
        for name, parameter in self.model.named_parameters():
            if not torch.isfinite(parameter).all():
                raise NonFiniteLossError(
                    f"weight {name} became NaN/inf during epoch {shown_epoch(epoch)}; stopped "
                    f"before saving it{self._checkpoint_hint()}; lower --lr or --weight"
                )
        exchange = self.exchange
        if self.regularisation is not None:
            self.regularisation.share_recorded(epoch, np.flatnonzero(self._seen), exchange)
        record = self._epoch_record(epoch, exchange)
        self.history = [r for r in self.history if r["epoch"] < epoch] + [record]
        end_of_epoch(self, epoch, record["loss"])  # --stop-at-train-loss, --track-measures
        # "epoch" counted from 1: the logger rows (Lightning adds its 0-based current_epoch
        # only where none is logged) and checkpoints/epoch=E.ckpt (ModelCheckpoint's {epoch} is
        # the logged one when there is one) read it
        numbers = {"epoch": float(shown_epoch(epoch))}
        numbers.update(
            (f"train/{k}", float(v))
            for k, v in record.items()
            if k not in ("epoch", "refresh", "terms", "regulariser_stats")
        )
        numbers.update({f"train/term/{k}": float(v) for k, v in record.get("terms", {}).items()})
        self.log_dict(numbers, on_step=False, on_epoch=True, logger=True)
        if self.report and self.trainer.is_global_zero and not self.trainer.progress_bar_callback:
            line = epoch_line(
                record, self.trainer.max_epochs, regularised=self.regularisation is not None
            )
            print(line, file=sys.stderr, flush=True)

    def _epoch_record(self, epoch: int, exchange: Exchange) -> dict[str, Any]:
        """The epoch's means over every rank's samples, its times and its refresh."""
        keys = list(self._term_sums)
        loss, ce, term, correct, count, labelled, *terms = exchange.all_reduce_sum(
            [*self._sums, *(self._term_sums[key] for key in keys)]
        )
        count, labelled = max(count, 1.0), max(labelled, 1.0)
        record: dict[str, Any] = {
            "epoch": epoch,
            "loss": loss / count,
            "ce": ce / count,
            "lcc": term / count,
            "train_top1": correct / labelled,
            "seconds": time.perf_counter() - self._epoch_start,
            "cpu_seconds": time.process_time() - self._epoch_cpu_start,
            "refresh_seconds": self._refresh_seconds,
            "lr": float(self.trainer.optimizers[0].param_groups[0]["lr"]),
        }
        regs = self.regularisation
        if (regs is not None and len(regs.keys) > 1) or any(key != "lcc" for key in keys):
            record["terms"] = {key: value / count for key, value in zip(keys, terms, strict=True)}
        if regs is not None:
            stats = {
                key: reg.epoch_stats()
                for key, reg in regs.items()
                if not isinstance(reg, LCC) and reg.epoch_stats()
            }
            if stats:
                record["regulariser_stats"] = stats
        if self._refresh_stats is not None:
            record["refresh"] = {
                name: {key: stats.get(key) for key in REPORTED}
                for name, stats in self._refresh_stats.items()
            }
        return record

    def _check_finite(self, loss: Tensor, ce: Tensor, term: Tensor, batch_idx: int) -> None:
        bad = not bool(torch.isfinite(loss.detach()))
        if self._world() > 1:
            bad = self.exchange.all_reduce_sum([float(bad)])[0] > 0
        if bad:
            raise NonFiniteLossError(
                f"non-finite loss at epoch {shown_epoch(self.current_epoch)}, batch {batch_idx} "
                f"(cross-entropy {float(ce.detach()):.4g}, regularisers "
                f"{float(term.detach()):.4g}); stopped{self._checkpoint_hint()}; lower --lr or "
                "--weight"
            )

    def _checkpoint_hint(self) -> str:
        if self.out_dir is None:
            return ""
        last = self.out_dir / "checkpoints" / "last.ckpt"
        if last.is_file():
            return f"; the last good checkpoint is kept: {last}"
        return " (no checkpoint was saved yet)"

    # --- test --------------------------------------------------------------------------------

    def on_test_epoch_start(self) -> None:
        # DDP: BatchNorm running statistics drift apart per rank; use rank 0's (checkpointed)
        self.exchange.broadcast_buffers(self.model)
        self._test_sums = np.zeros(4)  # loss*B, top1, top5, count

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, reduction="sum")
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == y[:, None]
        self._test_sums += (
            float(loss),
            float(hits[:, 0].sum()),
            float(hits.any(1).sum()),
            float(y.shape[0]),
        )

    def on_test_epoch_end(self) -> None:
        loss, top1, top5, count = self.exchange.all_reduce_sum(self._test_sums)
        count = max(count, 1.0)
        self.test_metrics = {
            "test_loss": loss / count,
            "test_top1": top1 / count,
            "test_top5": top5 / count,
            "test_samples": count,
        }
        self.log_dict({f"test/{k[5:]}": v for k, v in self.test_metrics.items()}, logger=True)

    # --- checkpoints -------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        regs = self.regularisation
        checkpoint["regularisation"] = None if regs is None else regs.state_dict()
        checkpoint["lcc_history"] = self.history
        checkpoint["epoch_in_progress"] = self._epoch_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("regularisation")
        if self.regularisation is not None and saved is not None:
            self.regularisation.load_state_dict(saved)
        self.history = list(checkpoint.get("lcc_history") or [])
        self._mid_epoch = checkpoint.get("epoch_in_progress")

    def _epoch_state(self) -> dict[str, Any]:
        """What the epoch in progress has accumulated (for a mid-epoch checkpoint)."""
        stats = self._refresh_stats
        return {
            # the epoch the counts belong to: a stop right after an epoch ends (Lightning's
            # current_epoch already moved on) must not read as the next epoch's progress
            "epoch": int(self.batches_epoch),
            "batches": int(self.batches_done),
            "sums": torch.from_numpy(self._sums.copy()),
            "term_sums": dict(self._term_sums),
            "seen": torch.from_numpy(self._seen.copy()),
            "seconds": time.perf_counter() - self._epoch_start,
            "cpu_seconds": time.process_time() - self._epoch_cpu_start,
            "refresh_seconds": self._refresh_seconds,
            "refresh_stats": None
            if stats is None
            else {name: {key: s.get(key) for key in REPORTED} for name, s in stats.items()},
        }

    def _resume_mid_epoch(self) -> bool:
        """Continue the epoch a mid-epoch checkpoint stopped in: restore what it accumulated
        and skip the epoch-start work (refreshes, regulariser hooks) already done."""
        state, self._mid_epoch = self._mid_epoch, None
        if not state or state["epoch"] != int(self.current_epoch) or state["batches"] <= 0:
            return False
        self.batches_done = int(state["batches"])
        self.batches_epoch = int(state["epoch"])
        self._sums[:] = state["sums"].numpy()
        self._term_sums = dict(state["term_sums"])
        self._seen[:] = state["seen"].numpy()
        self._epoch_start = time.perf_counter() - float(state["seconds"])
        self._epoch_cpu_start = time.process_time() - float(state["cpu_seconds"])
        self._refresh_seconds = float(state["refresh_seconds"])
        self._refresh_stats = state["refresh_stats"]
        if self.regularisation is not None:
            self.regularisation.epoch = int(self.current_epoch)
        return True
