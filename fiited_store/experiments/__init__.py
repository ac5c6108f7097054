"""The experiments around the store: the training harness, its datasets and models, and the benchmarks.

Nothing in the engine (:mod:`fiited_store`, :mod:`fiited_store.storage`,
:mod:`fiited_store.adapters`, :mod:`fiited_store.distributed`) imports this package;
it is what ``fiited-store train``, ``sweep`` and ``bench`` run.

- :mod:`.config`: :class:`~.config.TrainConfig`, a run's choices (importable without torch);
- :mod:`.train`, :mod:`.sweep`: one training run, and a sweep of methods x ratios x seeds;
- :mod:`.models`: DLRM and the embedding methods it compares;
- :mod:`.data`: MovieLens, Criteo and the built-in synthetic streams;
- :mod:`.metrics`: AUC, log loss, accuracy;
- :mod:`.bench`: the CPU, tier and distributed benchmark suites.
"""
