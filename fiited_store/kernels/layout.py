"""Constants of the shared data layout; plain Python, importable by every backend.

Entry table (open addressing, linear probing, the key stored):

- ``keys: int64[cap]`` the id;
- ``table_ids: int16[cap]`` the table, or EMPTY / TOMBSTONE;
- ``addr: int32[cap, kmax]`` per chunk: a pool slot (>= 0), ABSENT (-1), or a
  spilled chunk's tier slot s encoded as ``-2 - s``, so a chunk is in exactly one
  place and the spilled bitmask is derived, not stored;
- ``util: float32[cap, U]`` utilities, U = kmax per-chunk, or 1 when the utility is
  per row ("access", "shared").

Pool (one per distinct chunk width c): ``vectors: float32[slots, c]``,
``opt_state: float32[slots, w]``, ``owner: int32[slots]`` (the entry, or -1 when
free; the chunk index is the k with ``addr[e, k] == slot``, found in one short row),
``free_stack: int32[slots]`` and ``n_free: int64[1]``. A tier's ``owner`` is the same
for tier slots. Optimizer state sits beside
the slot rather than in the entry: an absent chunk has no trained state to keep.
"""

EMPTY = -1
TOMBSTONE = -2
ABSENT = -1
#: what find_entries writes for an id outside its direct table's rows
OUT_OF_RANGE = -2

UTIL_GRADIENT = 0
UTIL_ACCESS = 1
UTIL_SHARED = 2
UTILITY_CODES = {"gradient": UTIL_GRADIENT, "access": UTIL_ACCESS, "shared": UTIL_SHARED}

OPT_SGD = 0
OPT_ADAGRAD = 1
OPT_ROWWISE_ADAGRAD = 2
OPTIMIZER_CODES = {"sgd": OPT_SGD, "adagrad": OPT_ADAGRAD, "rowwise_adagrad": OPT_ROWWISE_ADAGRAD}

INIT_UNIFORM = 0
INIT_NORMAL = 1
INIT_ZEROS = 2
INIT_CODES = {"uniform": INIT_UNIFORM, "normal": INIT_NORMAL, "zeros": INIT_ZEROS}


def spilled_code(tier_slot):
    """addr value of a chunk spilled to ``tier_slot`` (works on arrays too)."""
    return -2 - tier_slot


def tier_slot_of(code):
    """Inverse of :func:`spilled_code`."""
    return -2 - code


# Utilities are stored as bfloat16 bit patterns (uint16[n, U]): the top half of a float32.
UTIL_DTYPE = "uint16"

#: the rank bits of a table's floor chunk (threshold -inf) when slots are short: above
#: every utility's bit pattern (the largest finite bfloat16 is 0x7F7F, infinity 0x7F80)
FLOOR_RANK_BITS = 0xFFFF


def util_to_float(bits):
    """float32 values of stored utilities (numpy arrays of uint16)."""
    import numpy as np

    return (np.asarray(bits, np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def util_from_float(values):
    """Stored (bfloat16) utilities of float32 values >= 0, rounded to nearest even."""
    import numpy as np

    b = np.ascontiguousarray(values, np.float32).view(np.uint32).astype(np.uint64)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
