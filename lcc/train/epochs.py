"""One epoch numbering for everything a user reads: the E-th epoch is epoch E, from 1.

Inside a run epochs count from 0 (Lightning's ``current_epoch``, the regularisers' ``epoch``,
the contents of a checkpoint). Every file, log line and message a user reads shows
:func:`shown_epoch` of it, as the console line ``epoch E/N`` does: ``refreshes.jsonl``,
``refresh/epoch_E_<layer>.npz``, ``metrics.json``, ``measures.jsonl``, ``tracking/epoch=E.npz``,
the logged ``epoch``, ``checkpoints/epoch=E.ckpt`` and warnings. A refresh runs at the start of
an epoch, before its training: the refresh of epoch E is the one printed on epoch E's line.

>>> [shown_epoch(epoch) for epoch in range(3)]
[1, 2, 3]
"""

from __future__ import annotations

__all__ = ["shown_epoch"]


def shown_epoch(epoch: int) -> int:
    """The number a user reads for the 0-based ``epoch`` of a run (the console's count)."""
    return int(epoch) + 1
