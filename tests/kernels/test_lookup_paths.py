"""The lookup's fast paths against its general one, on the same store and batch."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fiited_store import DynamicRatio, EmbeddingStore, StoreConfig, TableConfig

N = 50


def probed_and_general(seed: int, kinds: list[str], feature_tables: list[int], B: int):
    """The same inference batch through the probing fast path and through the general
    path (taken by weights of one), after two training batches gave keys entries."""
    rng = np.random.default_rng(seed)
    tables = [TableConfig(f"t{i}", dim=8, chunks=2, num_embeddings=N, index=kind) for i, kind in enumerate(kinds)]
    features = [f"t{t}" for t in feature_tables]
    with EmbeddingStore(tables, StoreConfig(pruning=DynamicRatio(0.5), budget_fraction=0.6, seed=seed)) as store:
        for _ in range(2):
            lengths = rng.integers(0, 4, len(features) * B)
            store.pooled_lookup(
                features,
                rng.integers(0, N // 2, int(lengths.sum())),
                np.concatenate([[0], np.cumsum(lengths)]),
                train=True,
            )
        lengths = rng.integers(0, 6, len(features) * B)
        ids = rng.integers(0, N, int(lengths.sum()))  # the upper half never seen
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        probed = np.array(store.pooled_lookup(features, ids, offsets).output)
        general = np.array(
            store.pooled_lookup(features, ids, offsets, per_sample_weights=np.ones(ids.size, np.float32)).output
        )
    return probed, general


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_lookup_that_probes_inside_the_gather_equals_the_general_path(data):
    """An inference lookup with a hashed table finds its keys inside the gather's address
    pass, some occurrences ahead; across feature boundaries, direct tables beside hashed
    ones, keys never seen, empty bags and more occurrences than the pass has blocks, it
    must give the sums of the general path."""
    kinds = data.draw(st.lists(st.sampled_from(["hashed", "direct"]), min_size=1, max_size=4), label="index kinds")
    feature_tables = data.draw(st.lists(st.integers(0, len(kinds) - 1), min_size=1, max_size=5), label="features")
    probed, general = probed_and_general(
        data.draw(st.integers(0, 2**16), label="seed"),
        kinds,
        feature_tables,
        data.draw(st.integers(1, 200), label="bags per feature"),
    )
    np.testing.assert_array_equal(probed, general)


def test_probing_lookup_finds_rows_across_features():
    # 4 x 300 bags, about 3,000 occurrences: every block of the address pass (64 of
    # them) holds more than the pass looks ahead, so keys are found ahead, across
    # feature boundaries, and not only when a block starts
    probed, general = probed_and_general(7, ["hashed", "direct", "hashed"], [0, 1, 2, 0], 300)
    np.testing.assert_array_equal(probed, general)
    assert (np.abs(probed).reshape(300, 4, 8).sum(axis=(0, 2)) > 0).all()  # every feature found rows
