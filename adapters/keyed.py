"""Jagged inputs and keyed outputs, shaped like TorchRec's, for when torchrec is not installed.

:class:`JaggedFeatures` has the methods of TorchRec's ``KeyedJaggedTensor`` that the
collection reads (``keys``, ``values``, ``lengths``, ``offsets``, ``weights_or_none``),
so either can be passed in. :class:`KeyedTensor` has the methods of TorchRec's
``KeyedTensor`` (``keys``, ``values``, ``length_per_key``, ``offset_per_key``,
``to_dict``, ``[key]``); the collection returns TorchRec's own class when torchrec
can be imported, this one otherwise.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import InputDTypeError, InputShapeError

#: the id and offset dtypes torch.nn.EmbeddingBag takes
INDEX_DTYPES = (torch.int64, torch.int32)


@dataclass
class JaggedFeatures:
    """A minimal ``KeyedJaggedTensor``: per key, B bags, stored key after key.

    ``values`` int64[nnz]; ``lengths`` int[F * B] (bag sizes, key-major);
    ``weights`` float32[nnz] or None.
    """

    keys_: Sequence[str]
    values_: torch.Tensor
    lengths_: torch.Tensor
    weights_: torch.Tensor | None = None

    def __init__(
        self, keys: Sequence[str], values: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor | None = None
    ):
        self.keys_, self.values_, self.lengths_, self.weights_ = list(keys), values, lengths, weights

    def keys(self) -> list[str]:
        return list(self.keys_)

    def values(self) -> torch.Tensor:
        return self.values_

    def lengths(self) -> torch.Tensor:
        return self.lengths_

    def offsets(self) -> torch.Tensor:
        lengths = self.lengths_.to(torch.int64)
        return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])

    def weights_or_none(self) -> torch.Tensor | None:
        return self.weights_

    @staticmethod
    def per_feature_of(features) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(ids, offsets int64[B + 1])] per key of any KeyedJaggedTensor-like object."""
        keys = list(features.keys())
        offsets = features.offsets().to(torch.int64)
        values = features.values()
        B = (offsets.numel() - 1) // len(keys)
        out = []
        for f in range(len(keys)):
            o = offsets[f * B : (f + 1) * B + 1]
            out.append((values[int(o[0]) : int(o[-1])], o - o[0]))
        return out

    @classmethod
    def from_dict(cls, features: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> JaggedFeatures:
        """{feature: (ids int[n], offsets int[B] or int[B + 1])} -> one jagged batch."""
        keys, values, lengths = [], [], []
        B = None
        for k, (ids, offs) in features.items():
            for what, t in (("ids", ids), ("offsets", offs)):
                if not isinstance(t, torch.Tensor) or t.dtype not in INDEX_DTYPES:
                    raise InputDTypeError(
                        f"feature {k!r}: {what} must be an int64 or int32 tensor, got "
                        f"{getattr(t, 'dtype', type(t).__name__)}"
                    )
            offs = offs.to(torch.int64)
            if offs.numel() == 0 or offs[-1] != ids.numel():
                offs = torch.cat([offs, torch.tensor([ids.numel()])])
            if B is not None and offs.numel() - 1 != B:
                raise InputShapeError(f"feature {k!r} has {offs.numel() - 1} bags, the others {B}")
            B = offs.numel() - 1
            keys.append(k)
            values.append(ids.to(torch.int64))
            lengths.append(torch.diff(offs))
        return cls(keys, torch.cat(values), torch.cat(lengths))


class KeyedTensor:
    """Pooled features side by side: ``values`` float32[B, sum of length_per_key], one column block per key.

    The same methods as TorchRec's ``KeyedTensor`` (``key_dim`` is always 1).
    """

    def __init__(self, keys: Sequence[str], length_per_key: Sequence[int], values: torch.Tensor, key_dim: int = 1):
        if key_dim != 1:
            raise InputShapeError(f"key_dim must be 1, got {key_dim}")
        self._keys = list(keys)
        self._length_per_key = [int(n) for n in length_per_key]
        self._values = values

    def keys(self) -> list[str]:
        return self._keys

    def values(self) -> torch.Tensor:
        return self._values

    def key_dim(self) -> int:
        return 1

    def length_per_key(self) -> list[int]:
        return self._length_per_key

    def offset_per_key(self) -> list[int]:
        out = [0]
        for n in self._length_per_key:
            out.append(out[-1] + n)
        return out

    def to_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self._keys, torch.split(self._values, self._length_per_key, dim=1)))

    def __getitem__(self, key: str) -> torch.Tensor:
        i = self._keys.index(key)
        start = sum(self._length_per_key[:i])
        return self._values[:, start : start + self._length_per_key[i]]

    def __repr__(self) -> str:
        return (
            f"KeyedTensor(keys={self._keys}, length_per_key={self._length_per_key}, values={tuple(self._values.shape)})"
        )


_torchrec_keyed = None


def keyed_tensor_class():
    """TorchRec's ``KeyedTensor`` when torchrec can be imported, else :class:`KeyedTensor`."""
    global _torchrec_keyed
    if _torchrec_keyed is None:
        _torchrec_keyed = KeyedTensor
        if importlib.util.find_spec("torchrec") is not None:
            try:
                from torchrec.sparse.jagged_tensor import KeyedTensor as _KT

                _torchrec_keyed = _KT
            except (ImportError, OSError, RuntimeError):  # a torchrec that does not load beside this torch: ours
                pass
    return _torchrec_keyed
