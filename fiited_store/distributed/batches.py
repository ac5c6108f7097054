"""End of data, agreed across ranks.

Ranks rarely hold the same number of batches. A rank that stops calling the
store's collective verbs while the others go on leaves them waiting in an
exchange forever (TorchRec's users hit exactly this). :func:`while_every_rank_has`
makes every rank stop at the same step: the first step at which any rank has run
out of batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from .exchange import exchange_for


def while_every_rank_has(batches: Iterable, process_group: Any = None, *, exchange: Any = None) -> Iterator:
    """This rank's batches, for as long as every rank of the group still has one.

    One small all-reduce per batch. The batches a rank holds past the shortest
    rank's count are not yielded (iterate again, or even the data out, to use them).

    Example::

        >>> list(while_every_rank_has([1, 2, 3]))   # a world of one
        [1, 2, 3]
    """
    ex = exchange if exchange is not None else exchange_for(process_group)
    it = iter(batches)
    while True:
        try:
            batch = next(it)
            out_of_data = 0
        except StopIteration:
            batch, out_of_data = None, 1
        if int(ex.max(np.array([out_of_data], np.int64))[0]):
            return
        yield batch
