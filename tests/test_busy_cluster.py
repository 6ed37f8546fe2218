"""Pool planning on a busy cluster and run directories of identical runs, without a cluster
(the tests on a real cluster, `ray job submit` among them, are in tests/test_cluster.py)."""

from __future__ import annotations

import pytest


def test_a_busy_cluster_makes_the_pool_wait_instead_of_failing(caplog):
    from sim.config import load_config
    from sim.orchestration.cluster import ResourceError, plan_pool

    busy = {"CPU": 0.0}, {"CPU": 2.0}  # another run holds both CPUs
    with caplog.at_level("WARNING", logger="sim.orchestration.cluster"):
        plan = plan_pool(load_config(None, []), *busy)
    assert plan.size == 1 and "wait for resources" in caplog.text
    assert plan_pool(load_config(None, ["ray.pool_size=2"]), *busy).size == 2
    with pytest.raises(ResourceError, match="num_cpus"):  # never placeable: still refused at once
        plan_pool(load_config(None, ["client_resources.num_cpus=4"]), *busy)
    with pytest.raises(ResourceError, match="pool_size"):
        plan_pool(load_config(None, ["ray.pool_size=3"]), *busy)


def test_identical_runs_started_together_get_distinct_run_dirs(tmp_path):
    from sim.config import load_config
    from sim.orchestration.runner import prepare_run_dir

    cfg = load_config(None, [f"out={tmp_path}"])
    dirs = {prepare_run_dir(cfg)[1] for _ in range(3)}  # same config, same second
    assert len(dirs) == 3 and all((d / "config.yaml").exists() for d in dirs)
