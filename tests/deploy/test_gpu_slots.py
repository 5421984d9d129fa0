"""GPU slot allocation with a fake 4-GPU inventory: no overlap, no oversubscription, fairness."""

from __future__ import annotations

import random

import pytest

from airflow_outpost.worker.hosted.gpu import FetchGroup, GpuAllocator, detect_gpus

FOUR = ("0", "1", "2", "3")


def test_inventory_precedence() -> None:
    assert detect_gpus(("0", "1")) == ("0", "1")
    assert detect_gpus((), environ={"CUDA_VISIBLE_DEVICES": "0"}) == ()
    assert detect_gpus(None, environ={"CUDA_VISIBLE_DEVICES": "2, 3"}) == ("2", "3")
    assert detect_gpus(None, environ={"CUDA_VISIBLE_DEVICES": ""}) == ()


def test_mixed_pool_slots_get_disjoint_devices_until_full() -> None:
    gpus = GpuAllocator(FOUR, ["gpu*"])
    a = gpus.allocate("a", 2)
    b = gpus.allocate("b", 1)
    assert a == ("0", "1") and b == ("2",)
    assert gpus.allocate("c", 2) is None  # only one left: never oversubscribe
    assert gpus.free == 1
    c = gpus.allocate("c", 1)
    assert set(a) | set(b) | set(c) == set(FOUR) and gpus.free == 0
    gpus.release("a")
    assert gpus.allocate("d", 2) == ("0", "1")
    assert gpus.allocate("d", 2) == ("0", "1")  # idempotent per owner
    gpus.release("nobody")
    assert gpus.free == 0


def test_random_workload_never_overlaps_or_oversubscribes() -> None:
    rng = random.Random(5)
    gpus = GpuAllocator(FOUR, ["gpu*"])
    held: dict[int, tuple[str, ...]] = {}
    for step in range(2000):
        if held and rng.random() < 0.45:
            owner = rng.choice(list(held))
            gpus.release(owner)
            del held[owner]
        else:
            want = rng.choice((1, 1, 2, 3, 4))
            got = gpus.allocate(step, want)
            in_use = sum(len(d) for d in held.values())
            if got is None:
                assert in_use + want > len(FOUR)
            else:
                assert len(got) == want
                held[step] = got
        flat = [d for devs in held.values() for d in devs]
        assert len(flat) == len(set(flat)) <= len(FOUR)
        assert gpus.free == len(FOUR) - len(flat)


def test_assign_cpu_jobs_get_no_devices_and_gpu_jobs_their_pool_slots() -> None:
    gpus = GpuAllocator(FOUR, ["gpu*", "train"])
    assert gpus.assign("cpu-job", "default", 1) == ()
    assert gpus.assign("g", "gpu_big", 3) == ("0", "1", "2")
    assert gpus.assign("t", "train", 1) == ("3",)
    # Claimed through "all queues" while full: runs without a GPU rather than share one.
    assert gpus.assign("late", "gpu_big", 1) == ()
    assert GpuAllocator((), ["gpu*"]).assign("x", "gpu", 1) == ()


def test_fetch_plan_splits_queues_and_uses_free_gpus_as_capacity() -> None:
    gpus = GpuAllocator(FOUR, ["gpu*"])
    gpus.allocate("busy", 1)
    plan = gpus.fetch_plan(["default", "gpu_a", "etl", "gpu_b"], cpu_free=2, turn=0)
    assert plan == [FetchGroup(("default", "etl"), 2, False), FetchGroup(("gpu_a", "gpu_b"), 3, True)]
    # CPU slots full: GPU queues are still served (GPU jobs do not use CPU slots).
    assert gpus.fetch_plan(["default", "gpu_a"], cpu_free=0) == [FetchGroup(("gpu_a",), 3, True)]
    gpus.allocate("busy2", 3)
    assert gpus.fetch_plan(["default", "gpu_a"], cpu_free=1) == [FetchGroup(("default",), 1, False)]
    assert gpus.fetch_plan(["gpu_a"], cpu_free=4) == []


def test_fetch_plan_alternates_so_neither_kind_starves() -> None:
    gpus = GpuAllocator(FOUR, ["gpu*"])
    firsts = [gpus.fetch_plan(["cpu", "gpu"], cpu_free=1, turn=t)[0].gpu for t in range(10)]
    assert firsts.count(True) == firsts.count(False) == 5


def test_fetch_plan_leaves_out_paused_queues_only() -> None:
    gpus = GpuAllocator(FOUR, ["gpu*"])
    plan = gpus.fetch_plan(["a", "b", "gpu"], cpu_free=1, paused={"a", "gpu"})
    assert plan == [FetchGroup(("b",), 1, False)]


def test_all_queues_cannot_be_split() -> None:
    gpus = GpuAllocator(FOUR, ["gpu*"])
    assert gpus.fetch_plan(None, cpu_free=3) == [FetchGroup(None, 3, False)]
    assert gpus.unusable_queues(["gpu"]) == []
    assert GpuAllocator((), ["gpu*"]).unusable_queues(["gpu", "cpu"]) == ["gpu"]


def test_allocate_refuses_zero() -> None:
    with pytest.raises(ValueError):
        GpuAllocator(FOUR, ["gpu*"]).allocate("x", 0)
