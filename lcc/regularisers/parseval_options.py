"""Options of the ``parseval`` regulariser, declared without torch (``--help-reg`` reads them).

>>> ParsevalOptions(modules=["fc1, fc2", "out"]).modules
['fc1', 'fc2', 'out']
"""

from __future__ import annotations

from dataclasses import dataclass

from lcc.regularisers.options import RegulariserOptions, option

__all__ = ["ParsevalOptions"]


@dataclass
class ParsevalOptions(RegulariserOptions):
    """Parseval regularisation (Cisse et al. 2017) as a penalty: sum over the chosen layers of
    ||W W^T - I||_F^2 on their weight matrices (conv kernels unfolded). A penalty, not the
    paper's retraction step (one SGD step on it is that retraction with beta = 4 lr weight).

    The options of :class:`lcc.regularisers.parseval.Parseval`: ``modules`` whose weights are
    penalised (empty: every Linear and Conv layer); ``layers`` is not used (no latent is read).
    The first paragraph above is the summary ``lcc train --help-reg`` prints.
    """

    modules: list[str] = option(  # noqa: RUF009 - copied per instance
        [], "modules whose weight matrices are penalised (default: every Linear and Conv layer)"
    )
