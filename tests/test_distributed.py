"""The sharded store in worlds of 1, 2 and 3 gloo processes against one EmbeddingStore."""

from __future__ import annotations

import pytest

from tests import dist_scenarios
from tests.dist_harness import run_world

WORLDS = (1, 2, 3)


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"world{w}")
def world_results(request, tmp_path_factory):
    world = request.param
    return world, run_world(world, dist_scenarios.SCENARIOS, "tests.dist_scenarios", tmp_path_factory.mktemp(f"w{world}"))


@pytest.mark.parametrize("scenario", dist_scenarios.SCENARIOS)
def test_scenario(world_results, scenario):
    world, results = world_results
    if results[scenario] is not None:
        pytest.fail(f"{scenario} failed in a world of {world}:\n{results[scenario]}")
