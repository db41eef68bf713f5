import pytest

from fleetmind.aggregation.secagg.graph import NeighbourGraph, secagg_plus_degree


def test_full_graph() -> None:
    graph = NeighbourGraph.full(range(1, 6))
    assert graph.neighbours[3] == {1, 2, 4, 5}
    assert graph.min_degree == 4


def test_harary_graph_is_regular_symmetric_and_random() -> None:
    graph = NeighbourGraph.harary(range(1, 101), degree=10, seed=1)
    assert all(len(peers) == 10 for peers in graph.neighbours.values())
    assert all(site in graph.neighbours[peer]
               for site, peers in graph.neighbours.items() for peer in peers)
    other = NeighbourGraph.harary(range(1, 101), degree=10, seed=2)
    assert graph.neighbours != other.neighbours


def test_harary_falls_back_to_full_for_small_cohorts() -> None:
    assert NeighbourGraph.harary(range(1, 5), degree=6).min_degree == 3


def test_degree_grows_logarithmically() -> None:
    degrees = [secagg_plus_degree(n, 0.1) for n in (64, 256, 1024, 10_000, 100_000)]
    assert degrees == sorted(degrees)
    assert degrees[-1] < 50  # 100,000 sites, each masking with fewer than 50 others
    assert secagg_plus_degree(16, 0.1) == 15  # small cohort: full graph
    with pytest.raises(ValueError):
        secagg_plus_degree(10, 0.5)


@pytest.mark.parametrize("neighbours", [{1: {1}}, {1: {2}, 2: set()}, {0: {1}, 1: {0}}])
def test_bad_graphs_refused(neighbours) -> None:
    with pytest.raises(ValueError):
        NeighbourGraph(neighbours)
