from fleetmind.sim.bench import aggregation, consolidate

PNG = b"\x89PNG\r\n\x1a\n"


def test_consolidation_plot_is_a_png(tmp_path) -> None:
    results = {"ours": {"recovery": 1.0, "forgetting_points": 1.4},
               "no_guard": {"recovery": 0.8, "forgetting_points": 3.0}}
    path = consolidate.plot(results, tmp_path / "c.png")
    assert path.read_bytes().startswith(PNG) and path.stat().st_size > 5000


def test_aggregation_plot_is_a_png(tmp_path) -> None:
    row = {"cohort": 16, "dropout": 0.3, "parameters": 4096, "ours_seconds": 0.01,
           "flower_seconds": 1.0, "bytes_ratio_to_plain16": 1.5,
           "flower_bytes_ratio_to_plain16": 4.0}
    path = aggregation.plot({"secagg": [row, {**row, "cohort": 64}]}, tmp_path / "a.png")
    assert path.read_bytes().startswith(PNG) and path.stat().st_size > 5000
