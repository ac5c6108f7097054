"""Scale-out: a store sharded over the ranks of a ``torch.distributed`` process group.

- :mod:`.routing`: which rank owns a key (row-wise by virtual buckets, or table-wise);
- :mod:`.exchange`: the collectives, over numpy arrays;
- :mod:`.owner`: the owner's half of a lookup and of a backward pass;
- :mod:`.global_pools`: the shards' pools run as one store's (prune cutoff, admission);
- :mod:`.sharded_store`: the front, :class:`ShardedEmbeddingStore`;
- :mod:`.checkpoint`: per-shard checkpoints under one global manifest;
- :mod:`.batches`: end-of-data agreement across ranks.
"""

from .routing import DEFAULT_BUCKETS, RowWiseRouting, TableWiseRouting
from .sharded_store import ShardedBatch, ShardedEmbeddingStore

__all__ = ["DEFAULT_BUCKETS", "RowWiseRouting", "ShardedBatch", "ShardedEmbeddingStore", "TableWiseRouting"]
