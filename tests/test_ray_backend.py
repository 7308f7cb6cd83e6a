"""`--backend ray`: the devices' training runs in Ray actors on a local Ray cluster, while the
hub and every device's MQTT connection stay in the fleet process; the run learns as with the
default worker processes (same requests, same `Worker`, same seeds)."""

from __future__ import annotations

import pytest

from .conftest import skip_or_fail


@pytest.fixture(scope="module")
def local_ray():
    try:
        import ray
    except ImportError:
        skip_or_fail("ray not installed (pip install 'fedge[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_a_fleet_on_ray_actors_learns_as_with_worker_processes(local_ray, mosquitto_url, topic_prefix, small_data,
                                                              tmp_path) -> None:
    from fedge.hub.config import HubConfig
    from fedge.hub.sim.fleet import Fleet, FleetConfig
    from fedge.hub.sim.ray_workers import RayPool
    from fedge.models.partition import PartitionSpec

    runs = {}
    for backend in ("ray", "process"):
        cfg = FleetConfig(devices=4, partition=PartitionSpec(kind="iid"),
                          broker=mosquitto_url, runs_dir=str(tmp_path), progress=False, backend=backend,
                          hub=HubConfig(fleet=f"ray-{backend}", prefix=topic_prefix, model="mlp", rounds=3,
                                        deadline_s=120, train={"lr": 0.05, "batch_size": 32}))
        fleet = Fleet(cfg, dataset=small_data).start()
        try:
            if backend == "ray":
                assert isinstance(fleet.pool, RayPool) and len(fleet.pool.nodes()) == 2
            runs[backend] = fleet.run()
        finally:
            fleet.close()
    assert runs["ray"]["final_accuracy"] > 0.5  # 10 classes: chance 0.1
    assert runs["ray"]["final_accuracy"] == pytest.approx(runs["process"]["final_accuracy"], abs=0.01)
    assert runs["ray"]["rounds_completed"] == 3
