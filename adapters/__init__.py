"""Framework adapters (imported as ``fiited_store.adapters``).

pytorch.py   FiitedEmbeddingBag, FiitedEmbeddingBagCollection (torch.nn modules)
ops.py       the lookup and update as torch.library custom operators (torch.compile)
keyed.py     JaggedFeatures and KeyedTensor, TorchRec's shapes without torchrec
"""

from .keyed import JaggedFeatures, KeyedTensor
from .pytorch import FiitedEmbeddingBag, FiitedEmbeddingBagCollection

__all__ = ["FiitedEmbeddingBag", "FiitedEmbeddingBagCollection", "JaggedFeatures", "KeyedTensor"]
