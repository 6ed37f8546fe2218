"""The GPU path on a machine without GPUs: Ray's logical GPUs say what each actor is given.

A local Ray with `num_gpus=1` assigns GPU ids and sets CUDA_VISIBLE_DEVICES exactly as on a GPU
node, so the placement (fractional actors packed on one GPU, the server's share, GPU-blind
actors without a share) is checked for real; only the CUDA computation itself needs a real GPU
(benchmarks/gpu_check.py). The numbers-side guarantees (one read of the loss per task, data
copied once per client) are checked on the CPU.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from actors.client import ClientActor
from actors.pool import ActorPool
from actors.server import ServerActor
from sim.config import load_config
from sim.devices import select_device
from sim.orchestration.cluster import ResourceError, gpu_room, gpu_share, plan_pool
from sim.typed import ConfigError
from tests.cli import sets
from tests.conftest import init_local_ray, small_overrides
from tests.test_mutation_guards import client_data, context, run_context, softmax_regression

GPU_CLUSTER = {"CPU": 4.0, "GPU": 1.0}


@pytest.fixture(scope="module")
def ray_gpu():
    """A private Ray with 4 CPUs and 1 logical GPU; the suite's shared Ray is restored afterwards."""
    import ray

    had_ray = ray.is_initialized()
    if had_ray:
        ray.shutdown()
    ray.init(
        address="local",
        num_cpus=4,
        num_gpus=1,
        include_dashboard=False,
        log_to_driver=False,
        namespace="warmfed-sim-gpu-tests",
    )
    yield ray
    ray.shutdown()
    if had_ray:
        init_local_ray()


def _kill(*actors) -> None:
    """Kill the actors and wait until Ray has their resources back (it frees them asynchronously)."""
    import time

    import ray

    for actor in actors:
        ray.kill(actor)
    deadline = time.monotonic() + 60
    while ray.available_resources().get("GPU", 0.0) < 1.0 - 1e-6 and time.monotonic() < deadline:
        time.sleep(0.2)


# --------------------------------------------------------------------------- planning, no Ray
def test_gpu_shares_pack_whole_gpus():
    assert gpu_share(1.0, 4) == 0.25
    assert gpu_share(2.0, 3) == 0.5  # 1/3 of two GPUs would leave one actor without a GPU to fit on
    assert gpu_share(2.0, 2) == 1.0
    assert gpu_share(0.5, 2) == 0.25  # one partly free GPU: an equal split of what is free
    assert gpu_room(1.0, 0.25) == 4
    assert gpu_room(2.0, 0.4) == 4  # two per GPU, not floor(2 / 0.4) = 5
    assert gpu_room(2.0, 1.0) == 2


def test_pool_counts_fractional_actors_per_gpu():
    two_gpus = {"CPU": 16.0, "GPU": 2.0}
    plan = plan_pool(
        load_config(None, ["algorithms=fedavg", "client_resources.num_gpus=0.4", "num_clients=20"]), two_gpus, two_gpus
    )
    assert plan.size == 4 and plan.num_gpus == 0.4
    auto = plan_pool(
        load_config(None, ["algorithms=fedavg", "client_resources.num_gpus=auto", "num_clients=20"]), two_gpus, two_gpus
    )
    assert auto.size == 16 and auto.num_gpus == 0.125  # 8 per GPU
    assert auto.server_num_gpus == 0.0  # FedAvg's server only averages


def test_server_auto_takes_a_share_only_for_heavy_server_phases():
    warmfed = ["algorithms=warmfed", "client_resources.num_gpus=auto", "num_clients=10"]
    plan = plan_pool(load_config(None, warmfed), GPU_CLUSTER, GPU_CLUSTER)
    # the server is a fifth actor on the GPU: 4 client slots (4 CPUs) + server, 1/5 each
    assert plan.server_num_gpus == pytest.approx(0.2) and plan.num_gpus == pytest.approx(0.2) and plan.size == 4
    cpu_clients = plan_pool(load_config(None, ["algorithms=warmfed", "num_clients=10"]), GPU_CLUSTER, GPU_CLUSTER)
    assert cpu_clients.num_gpus == 0.0 and cpu_clients.server_num_gpus == 1.0 and cpu_clients.size == 4
    shared = plan_pool(load_config(None, [*warmfed[:1], "client_resources.num_gpus=0.25"]), GPU_CLUSTER, GPU_CLUSTER)
    assert shared.server_num_gpus == 0.25 and shared.size == 3  # the server's quarter leaves room for three
    no_gpu = {"CPU": 4.0}
    assert plan_pool(load_config(None, warmfed), no_gpu, no_gpu).server_num_gpus == 0.0
    fedavg = plan_pool(
        load_config(None, ["algorithms=fedavg", "client_resources.num_gpus=0.25"]), GPU_CLUSTER, GPU_CLUSTER
    )
    assert fedavg.server_num_gpus == 0.0 and fedavg.size == 4
    # a GPU elsewhere in the cluster does not help the server, which lives on the driver's node
    far = plan_pool(load_config(None, warmfed), {"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 4.0})
    assert far.server_num_gpus == 0.0


def test_impossible_server_requests_fail_with_one_line():
    with pytest.raises(ResourceError, match=r"server_resources.num_gpus=0.5 but the Ray cluster has no GPUs"):
        plan_pool(load_config(None, ["server_resources.num_gpus=0.5"]), {"CPU": 2.0}, {"CPU": 2.0})
    with pytest.raises(ResourceError, match=r"server_resources.num_gpus=2 but the driver's node.* has 1 GPUs"):
        plan_pool(load_config(None, ["server_resources.num_gpus=2"]), GPU_CLUSTER, GPU_CLUSTER)
    with pytest.raises(ResourceError, match=r"driver's node.* has 0 GPUs"):
        plan_pool(load_config(None, ["server_resources.num_gpus=0.5"]), GPU_CLUSTER, GPU_CLUSTER, {"CPU": 4.0})
    with pytest.raises(ResourceError, match=r"server_resources.num_cpus=8"):
        plan_pool(load_config(None, ["server_resources.num_cpus=8"]), GPU_CLUSTER, GPU_CLUSTER)
    with pytest.raises(ResourceError, match="beside the server actor's share"):
        plan_pool(
            load_config(None, ["server_resources.num_gpus=1", "client_resources.num_gpus=0.5"]),
            GPU_CLUSTER,
            GPU_CLUSTER,
        )
    with pytest.raises(ConfigError, match="whole number of GPUs"):
        load_config(None, ["server_resources.num_gpus=1.5"])
    with pytest.raises(ConfigError, match="mixed_precision must be one of fp32, fp16, bf16"):
        load_config(None, ["mixed_precision=half"])


def test_server_gpu_request_without_gpus_fails_before_any_actor(capsys, tmp_path):
    """Before Ray starts (preflight), or on a running GPU-less Ray: one line, exit 2, no run folder."""
    import ray

    import run_sim

    if torch.cuda.is_available() or (ray.is_initialized() and ray.cluster_resources().get("GPU")):
        pytest.skip("this machine has GPUs")
    items = small_overrides(tmp_path, "server_resources.num_gpus=0.5")
    code = run_sim.main(["run", *sets(items)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "server_resources.num_gpus=0.5 but the Ray cluster has no GPUs" in err
    out = tmp_path / "results"
    assert not out.exists() or [p.name for p in out.iterdir()] in ([], ["cache"])


# --------------------------------------------------------------------------- devices and numbers, no Ray
def test_the_device_follows_the_assignment_not_the_node():
    assert select_device(["0"], cuda_available=True) == torch.device("cuda:0")
    assert select_device([], cuda_available=True) == torch.device("cpu")  # a GPU on the node is not ours
    assert select_device(["0"], cuda_available=False) == torch.device("cpu")


def test_mixed_precision_reaches_the_run_context_and_only_autocasts_on_a_gpu(tmp_path):
    from sim.data import load_dataset
    from sim.orchestration.runner import run_context

    cfg = load_config(None, small_overrides(tmp_path, "mixed_precision=bf16"))
    run = run_context(cfg, load_dataset(cfg.dataset, cfg.data), 0, str(tmp_path))
    assert run.mixed_precision == "bf16"
    on_gpu = run.autocast(torch.device("cuda"))
    assert isinstance(on_gpu, torch.autocast) and on_gpu.fast_dtype == torch.bfloat16
    assert not isinstance(run.autocast(torch.device("cpu")), torch.autocast)
    fp16 = dataclasses.replace(run, mixed_precision="fp16").autocast(torch.device("cuda"))
    assert fp16.fast_dtype == torch.float16
    assert not isinstance(
        dataclasses.replace(run, mixed_precision="fp32").autocast(torch.device("cuda")), torch.autocast
    )
    # sampling (inference only) also takes bf16 on a CPU; fp16 and fp32 leave a CPU alone
    on_cpu = run.sampling_autocast(torch.device("cpu"))
    assert isinstance(on_cpu, torch.autocast) and on_cpu.device == "cpu" and on_cpu.fast_dtype == torch.bfloat16
    for other in ("fp16", "fp32"):
        cpu = dataclasses.replace(run, mixed_precision=other).sampling_autocast(torch.device("cpu"))
        assert not isinstance(cpu, torch.autocast)
    assert run.sampling_autocast(torch.device("cuda")).fast_dtype == torch.bfloat16


class _Copies(torch.Tensor):
    """Data whose device copies (made of it or of its slices) are counted."""

    n = 0

    def to(self, *args, **kwargs):
        _Copies.n += 1
        return super().to(*args, **kwargs)


class _Reads(torch.Tensor):
    """A loss whose host reads (each a GPU sync) are counted."""

    n = 0

    def __float__(self):
        _Reads.n += 1
        return super().__float__()

    def item(self):
        _Reads.n += 1
        return super().item()


def test_training_reads_the_loss_once_and_copies_the_data_once():
    from sim.training import cross_entropy, local_sgd

    run = dataclasses.replace(
        run_context(0.1, epochs=3), train=dataclasses.replace(run_context(0.1).train, local_epochs=3, batch_size=2)
    )
    data = client_data(0, n=10)
    plain = context(run, data, softmax_regression)
    torch.manual_seed(0)
    ref_model = softmax_regression()
    plain_metrics = local_sgd(plain, ref_model)

    counted = dataclasses.replace(
        data,
        x={k: v.as_subclass(_Copies) for k, v in data.x.items()},
        y={k: v.as_subclass(_Copies) for k, v in data.y.items()},
    )
    ctx = context(run, counted, softmax_regression)
    torch.manual_seed(0)
    model = softmax_regression()
    _Copies.n = _Reads.n = 0
    metrics = local_sgd(ctx, model, loss_fn=lambda m, x, y: cross_entropy(m, x, y).as_subclass(_Reads))
    assert metrics["train_steps"] == 15
    assert _Copies.n == 2  # x and y of the split, once, not per batch
    assert _Reads.n <= 1  # the loss sum is read at the end, not after every step
    assert metrics["train_loss"] == plain_metrics["train_loss"]  # the same bits as an unwrapped run
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref_model.state_dict().values(), strict=True)
    )


# --------------------------------------------------------------------------- on logical GPUs
def test_fractional_client_actors_pack_on_one_gpu(ray_gpu):
    ray = ray_gpu
    cfg = load_config(
        None, ["algorithms=fedavg", "client_resources.num_gpus=0.25", "client_resources.num_cpus=0.5", "num_clients=10"]
    )
    plan = plan_pool(cfg)
    assert plan.size == 4 and plan.server_num_gpus == 0.0  # GPU-bound: 4 x 0.25, though the CPUs fit 8
    pool = ActorPool(lambda: ClientActor.options(**plan.actor_options()).remote(None), plan.size)
    server = ServerActor.options(**plan.server_options()).remote()
    try:
        infos = ray.get([a.device_info.remote() for a in pool.actors])
        assert [i["gpu_ids"] for i in infos] == [["0"]] * 4
        assert [i["cuda_visible_devices"] for i in infos] == ["0"] * 4
        expected = str(select_device(["0"], torch.cuda.is_available()))
        assert all(i["device"] == expected for i in infos)
        assert ray.available_resources().get("GPU", 0.0) == pytest.approx(0.0, abs=1e-6)
        # a server without a share is made GPU-blind: nothing in it can take GPU 0 unaccounted
        srv = ray.get(server.device_info.remote())
        assert srv["gpu_ids"] == [] and srv["cuda_visible_devices"] == "" and srv["device"] == "cpu"
        with pytest.raises(ResourceError, match="ray.pool_size=5"):
            plan_pool(load_config(None, ["client_resources.num_gpus=0.25", "ray.pool_size=5"]))
    finally:
        _kill(server, *pool.actors)


def test_the_server_gets_its_share_from_ray(ray_gpu):
    ray = ray_gpu
    cfg = load_config(None, ["algorithms=warmfed", "client_resources.num_gpus=0.25", "client_resources.num_cpus=1"])
    plan = plan_pool(cfg)
    assert plan.server_num_gpus == 0.25 and plan.size == 3
    server = ServerActor.options(**plan.server_options()).remote()
    pool = ActorPool(lambda: ClientActor.options(**plan.actor_options()).remote(None), plan.size)
    try:
        srv = ray.get(server.device_info.remote())
        assert srv["gpu_ids"] == ["0"] and srv["cuda_visible_devices"] == "0"
        assert srv["device"] == str(select_device(["0"], torch.cuda.is_available()))
        assert all(i["gpu_ids"] == ["0"] for i in ray.get([a.device_info.remote() for a in pool.actors]))
        assert ray.available_resources().get("GPU", 0.0) == pytest.approx(0.0, abs=1e-6)  # 0.25 + 3 x 0.25
    finally:
        _kill(server, *pool.actors)


def test_a_run_records_what_each_actor_was_given(ray_gpu, tmp_path):
    from sim.orchestration.runner import run_comparison

    cfg = load_config(
        None,
        small_overrides(
            tmp_path,
            "algorithms=fedavg",
            "rounds=1",
            "client_resources.num_gpus=0.5",
            "client_resources.num_cpus=1",
            "server_resources.num_gpus=0",
        ),
    )
    run_dir = run_comparison(cfg).run_dir
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["pool"]["size"] == 2 and manifest["pool"]["num_gpus"] == 0.5
    devices = manifest["devices"]
    assert sorted(devices) == ["client0", "client1", "server"]
    assert devices["client0"]["gpu_ids"] == ["0"] and devices["client1"]["cuda_visible_devices"] == "0"
    assert devices["server"]["gpu_ids"] == [] and devices["server"]["cuda_visible_devices"] == ""


def test_gpu_check_says_so_on_a_machine_without_a_gpu():
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: benchmarks/gpu_check.py runs its checks there")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "gpu_check.py")],
        check=False,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "NO GPU: torch sees no CUDA device" in done.stdout and "--logical-gpu" in done.stdout
