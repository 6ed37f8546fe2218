"""What an actor learns from Ray about its GPUs, and the device it computes on from that."""

from __future__ import annotations

import os
from typing import Any

import ray
import torch

from sim.devices import select_device, set_process_device


def ray_gpu_ids() -> list:
    try:
        return ray.get_gpu_ids() if ray.is_initialized() else []
    except Exception:  # outside a Ray worker there are no assigned GPUs
        return []


def in_ray_worker() -> bool:
    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def claim_device() -> torch.device:
    """The device of this process from its Ray assignment, remembered as the process device.

    Ray sets CUDA_VISIBLE_DEVICES only for a worker that holds a GPU share; any other worker would
    still see every GPU of its node, and library code that asks `torch.cuda.is_available()`
    (diffusers, an algorithm's server step) would run there unaccounted. Such a worker is made
    GPU-blind before CUDA is first touched, so everything in it stays on the CPU."""
    gpu_ids = ray_gpu_ids()
    if not gpu_ids and in_ray_worker() and not torch.cuda.is_initialized():
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    device = select_device(gpu_ids, torch.cuda.is_available())
    set_process_device(device)
    return device


def device_info(device: torch.device) -> dict[str, Any]:
    """Where this actor computes and what it holds on the GPU: the manifest's `devices` entry."""
    info: dict[str, Any] = {
        "device": str(device),
        "gpu_ids": [str(g) for g in ray_gpu_ids()],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
        "pid": os.getpid(),
    }
    if device.type == "cuda":
        info["gpu_name"] = torch.cuda.get_device_name(device)
        info["gpu_memory_mb"] = torch.cuda.memory_allocated(device) / 2**20
        info["gpu_peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return info
