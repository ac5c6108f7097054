"""Framework adapters (imported as ``fiited_store.adapters``)."""

from .pytorch import FiitedEmbeddingBag, FiitedEmbeddingBagCollection, JaggedFeatures

__all__ = ["FiitedEmbeddingBag", "FiitedEmbeddingBagCollection", "JaggedFeatures"]
