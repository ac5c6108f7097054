"""The embedding optimizers the peers train with, and the memory each one holds.

Every method of a sweep trains its embeddings with one family, Adagrad, in one of two
forms (``TrainConfig.optimizer``): element-wise (torch's ``Adagrad``, one accumulator per
weight) or row-wise (FBGEMM's ``EXACT_ROWWISE_ADAGRAD``, one accumulator per row, the
mean of the squared gradient over the row). The store runs the same rules in its fused
kernels (``TableConfig.optimizer``, one accumulator per chunk for the row-wise form); the
torch peers run them here, so that a comparison at equal training memory compares
layouts, not optimizers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..config import EMBEDDING_OPTIMIZERS

#: Adagrad's epsilon in the row-wise form, the store's (``TableConfig.eps``) and FBGEMM's
ROWWISE_EPS = 1e-8


class RowWiseAdagrad(torch.optim.Optimizer):
    """Row-wise Adagrad over 2-D parameters: row i keeps one accumulator
    ``a_i += mean_j g_ij**2`` and moves by ``-lr * g_i / (sqrt(a_i) + eps)``.

    Sparse gradients (``nn.Embedding(sparse=True)``) touch only their rows; an id
    repeated in a batch is summed first, as torch's ``Adagrad`` does.

    >>> w = torch.nn.Parameter(torch.ones(3, 2))
    >>> opt = RowWiseAdagrad([w], lr=0.5)
    >>> w.grad = torch.tensor([[2.0, 2.0], [0.0, 0.0], [0.0, 0.0]])
    >>> opt.step()
    >>> w.data[:, 0].tolist()  # row 0: a = 4, w = 1 - 0.5 * 2 / 2
    [0.5, 1.0, 1.0]
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, eps: float = ROWWISE_EPS):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        super().__init__(params, {"lr": lr, "eps": eps})
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"row-wise Adagrad needs 2-D parameters (rows x dim), got shape {tuple(p.shape)}")
                self.state[p]["sum"] = torch.zeros(p.shape[0], dtype=p.dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            lr, eps = group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                acc = self.state[p]["sum"]
                if p.grad.is_sparse:
                    g = p.grad.coalesce()
                    rows, values = g.indices()[0], g.values()
                else:
                    rows, values = torch.arange(p.shape[0]), p.grad
                a = acc.index_add_(0, rows, values.pow(2).mean(dim=1))[rows]
                p.index_add_(0, rows, values * (-lr / (a.sqrt() + eps)).unsqueeze(1))
        return loss


def sparse_optimizer(name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The peers' embedding optimizer of ``TrainConfig.optimizer``."""
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr)
    if name == "rowwise_adagrad":
        return RowWiseAdagrad(params, lr=lr)
    raise ValueError(f"optimizer must be one of {EMBEDDING_OPTIMIZERS}, got {name!r}")


def table_training_bytes(params: Iterable[torch.nn.Parameter], optimizer: str) -> int:
    """Bytes of 2-D float32 embedding tables with the optimizer's state: one float per
    weight (element-wise Adagrad) or per row (row-wise)."""
    if optimizer not in EMBEDDING_OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {EMBEDDING_OPTIMIZERS}, got {optimizer!r}")
    total = 0
    for p in params:
        state = p.numel() if optimizer == "adagrad" else p.shape[0]
        total += 4 * (p.numel() + state)
    return total
