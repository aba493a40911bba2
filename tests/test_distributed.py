"""Launcher detection (fake environments), device choice, the preemption flag and its agreement, and the
collectives layer (ticod.distributed)."""

from __future__ import annotations

import os
import signal
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from slurm_cluster import LAUNCHER_VARS, ensure_slurm, slurm_requested

from ticod import distributed as D
from ticod.preemption import REQUEUE_EXIT_CODE, PreemptionHandler, should_stop

TORCH_KEYS = LAUNCHER_VARS  # the torchrun variables world_info_from_env reads and writes


def slurm_task_env(**extra: str) -> dict[str, str]:
    """Task 3 of an `srun` step: 2 nodes x 2 tasks, job 123456 (variables as Slurm 22.05 sets them)."""
    env = {
        "SLURM_JOB_ID": "123456",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_NTASKS": "4",
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_TASKS_PER_NODE": "2(x2)",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
        "SLURM_JOB_NODELIST": "gpu-a,gpu-b",
        "SLURM_STEP_NODELIST": "gpu-a,gpu-b",
    }
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------- slurm
def test_slurm_task_env_is_read_and_exported() -> None:
    env = slurm_task_env()
    info = D.world_info_from_env(env)
    assert info == D.DistInfo(
        rank=3,
        local_rank=1,
        world_size=4,
        local_world_size=2,
        master_addr="gpu-a",
        master_port=10000 + 123456 % 20000,
        launcher="slurm",
    )
    assert info.master_port == 13456
    # Exported into the same mapping so deepspeed.init_distributed / env:// see a normal launch.
    assert {k: env[k] for k in TORCH_KEYS} == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "gpu-a",
        "MASTER_PORT": "13456",
    }


def test_slurm_step_variables_win_over_job_variables() -> None:
    # `srun -n 3` inside a 4-task allocation: the step has 3 tasks, 2 on node 0 and 1 on node 1.
    env = slurm_task_env(
        SLURM_PROCID="2",
        SLURM_LOCALID="0",
        SLURM_STEP_NUM_TASKS="3",
        SLURM_STEP_TASKS_PER_NODE="2,1",
        SLURM_STEP_NODELIST="gpu-b,gpu-c",
    )
    info = D.world_info_from_env(env)
    assert (info.rank, info.world_size, info.local_world_size, info.master_addr) == (2, 3, 1, "gpu-b")


def test_slurm_uneven_tasks_per_node_uses_this_nodes_count() -> None:
    env = slurm_task_env(
        SLURM_PROCID="6",
        SLURM_LOCALID="0",
        SLURM_NODEID="3",
        SLURM_STEP_NUM_TASKS="7",
        SLURM_STEP_TASKS_PER_NODE="2(x3),1",
        SLURM_STEP_NODELIST="n[1-4]",
    )
    info = D.world_info_from_env(env, hostnames=lambda nl: ["n1", "n2", "n3", "n4"])
    assert (info.world_size, info.local_world_size, info.master_addr) == (7, 1, "n1")


def test_slurm_bracketed_nodelist_goes_through_hostnames() -> None:
    seen: list[str] = []

    def hostnames(nodelist: str) -> list[str]:
        seen.append(nodelist)
        return ["gpu017", "gpu018"]

    info = D.world_info_from_env(slurm_task_env(SLURM_STEP_NODELIST="gpu[017-018]"), hostnames=hostnames)
    assert seen == ["gpu[017-018]"] and info.master_addr == "gpu017"


def test_slurm_explicit_master_wins() -> None:
    env = slurm_task_env(MASTER_ADDR="10.0.0.7", MASTER_PORT="29511")
    info = D.world_info_from_env(env)
    assert (info.master_addr, info.master_port) == ("10.0.0.7", 29511)


def test_slurm_gpus_per_task_is_recorded() -> None:
    assert D.world_info_from_env(slurm_task_env(SLURM_GPUS_PER_TASK="1")).gpus_per_task == 1


def test_batch_shell_without_srun_is_a_single_process() -> None:
    # The sbatch shell has SLURM_PROCID=0 and the job's SLURM_NTASKS, but no step: not a 2-rank world.
    env = {k: v for k, v in slurm_task_env(SLURM_PROCID="0", SLURM_LOCALID="0").items() if "STEP" not in k}
    info = D.world_info_from_env(env)
    assert (info.launcher, info.rank, info.world_size) == ("none", 0, 1)
    assert env["WORLD_SIZE"] == "1"


def test_ports_differ_between_jobs_and_stay_in_range() -> None:
    ports = {D.slurm_port(j) for j in range(100, 140)}
    assert len(ports) == 40
    assert all(10000 <= p < 30000 for p in ports)
    assert D.slurm_port(20000) == D.slurm_port(0) == 10000


@pytest.mark.parametrize(
    ("value", "expected"),
    [("4", [4]), ("2(x3)", [2, 2, 2]), ("2(x3),1", [2, 2, 2, 1]), ("1,3(x2)", [1, 3, 3])],
)
def test_parse_tasks_per_node(value: str, expected: list[int]) -> None:
    assert D.parse_tasks_per_node(value) == expected


def test_parse_tasks_per_node_rejects_garbage() -> None:
    with pytest.raises(D.LaunchError, match="2x3"):
        D.parse_tasks_per_node("2x3")


def test_expand_nodelist_without_ranges_needs_no_scontrol() -> None:
    assert D.expand_nodelist("a,b,c") == ["a", "b", "c"]
    assert D.expand_nodelist("node1") == ["node1"]


def test_expand_nodelist_with_scontrol(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    if slurm_requested():
        ensure_slurm()  # installs slurm-wlm when missing; SlurmUnavailable fails the test, never skips it
    elif D.shutil.which("scontrol") is None:
        pytest.skip("scontrol (slurm-client) not installed; TICOD_TEST_SLURM=1 installs it or fails")
    # scontrol reads a slurm.conf even to expand host lists; a minimal one stands in for the cluster's.
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=test\nSlurmctldHost=localhost\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    assert D.expand_nodelist("gpu[08-10],cpu1") == ["gpu08", "gpu09", "gpu10", "cpu1"]


# ------------------------------------------------------------------------------- inconsistencies
def test_missing_nodelist_is_a_clear_error() -> None:
    env = {k: v for k, v in slurm_task_env().items() if "NODELIST" not in k}
    with pytest.raises(D.LaunchError, match=r"node list is missing.*SLURM_JOB_NODELIST"):
        D.world_info_from_env(env)


def test_rank_beyond_world_is_a_clear_error() -> None:
    with pytest.raises(D.LaunchError, match=r"rank 4 \(SLURM_PROCID\) is not in \[0, world size 4\)"):
        D.world_info_from_env(slurm_task_env(SLURM_PROCID="4"))


def test_local_rank_beyond_node_is_a_clear_error() -> None:
    with pytest.raises(D.LaunchError, match=r"local rank 2 \(SLURM_LOCALID\)"):
        D.world_info_from_env(slurm_task_env(SLURM_LOCALID="2"))


def test_non_integer_is_a_clear_error() -> None:
    with pytest.raises(D.LaunchError, match="SLURM_PROCID='x' is not an integer"):
        D.world_info_from_env(slurm_task_env(SLURM_PROCID="x"))


def test_node_id_beyond_tasks_per_node_is_a_clear_error() -> None:
    with pytest.raises(D.LaunchError, match="SLURM_NODEID=2"):
        D.world_info_from_env(slurm_task_env(SLURM_NODEID="2"))


def test_partial_torch_variables_name_the_missing_ones() -> None:
    with pytest.raises(D.LaunchError, match="MASTER_ADDR, MASTER_PORT"):
        D.world_info_from_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


# --------------------------------------------------------------------------- torchrun/deepspeed
def test_torchrun_variables_win_over_slurm() -> None:
    env = slurm_task_env(
        RANK="5",
        WORLD_SIZE="8",
        LOCAL_RANK="1",
        LOCAL_WORLD_SIZE="4",
        MASTER_ADDR="h0",
        MASTER_PORT="29500",
        TORCHELASTIC_RUN_ID="x",
    )
    before = dict(env)
    info = D.world_info_from_env(env)
    assert info == D.DistInfo(5, 1, 8, 4, "h0", 29500, "torchrun")
    assert env == before  # a real launcher's variables are left alone


def test_deepspeed_launcher_is_recognised() -> None:
    env = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29501",
        "LOCAL_SIZE": "2",
        "CROSS_RANK": "0",
        "CROSS_SIZE": "1",
    }
    assert D.world_info_from_env(env) == D.DistInfo(1, 1, 2, 2, "127.0.0.1", 29501, "deepspeed")


def test_single_process_exports_a_usable_rendezvous() -> None:
    env: dict[str, str] = {}
    info = D.world_info_from_env(env)
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (0, 1, 0, "none")
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and env["MASTER_ADDR"] == "127.0.0.1"
    with socket.socket() as s:  # the chosen port is bindable
        s.bind(("127.0.0.1", int(env["MASTER_PORT"])))


def test_default_env_is_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in TORCH_KEYS:
        # delenv alone does not record a key that is absent; setenv first, so the RANK/... that
        # world_info_from_env writes below are removed afterwards.
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(k)
    for k, v in slurm_task_env().items():
        monkeypatch.setenv(k, v)
    assert D.world_info_from_env().rank == 3
    assert os.environ["RANK"] == "3" and os.environ["MASTER_PORT"] == "13456"


# -------------------------------------------------------------------------------------- device
def test_select_device_cpu_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    info = D.DistInfo(rank=1, local_rank=1, world_size=2, local_world_size=2, launcher="slurm")
    assert D.select_device(info) == torch.device("cpu")
    assert D.backend_for(torch.device("cpu")) == "gloo"
    assert D.backend_for(torch.device("cuda", 1)) == "nccl"


@pytest.fixture
def four_gpus(monkeypatch: pytest.MonkeyPatch) -> list[torch.device]:
    """A node with 4 visible GPUs, as torch.cuda reports it; records set_device calls."""
    current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    return current


def test_select_device_uses_local_rank(four_gpus: list[torch.device]) -> None:
    info = D.DistInfo(rank=6, local_rank=2, world_size=8, local_world_size=4, launcher="slurm")
    assert D.select_device(info) == torch.device("cuda", 2)
    assert four_gpus == [torch.device("cuda", 2)]


def test_select_device_slurm_tasks_not_matching_gpus(four_gpus: list[torch.device]) -> None:
    info = D.DistInfo(rank=0, local_rank=0, world_size=2, local_world_size=2, launcher="slurm")
    with pytest.raises(D.LaunchError, match=r"2 tasks on this node .*SLURM_NTASKS_PER_NODE.* 4 GPU\(s\)"):
        D.select_device(info)


def test_select_device_too_many_local_ranks(four_gpus: list[torch.device]) -> None:
    info = D.DistInfo(rank=0, local_rank=0, world_size=8, local_world_size=8, launcher="torchrun")
    with pytest.raises(D.LaunchError, match=r"8 ranks on this node \(LOCAL_WORLD_SIZE\) but only 4 GPU"):
        D.select_device(info)


def test_select_device_fewer_torchrun_ranks_than_gpus_is_fine(four_gpus: list[torch.device]) -> None:
    info = D.DistInfo(rank=1, local_rank=1, world_size=2, local_world_size=2, launcher="torchrun")
    assert D.select_device(info) == torch.device("cuda", 1)


def test_select_device_gpus_bound_per_task(four_gpus: list[torch.device]) -> None:
    info = D.DistInfo(
        rank=3, local_rank=3, world_size=4, local_world_size=4, launcher="slurm", gpus_per_task=1
    )
    assert D.select_device(info) == torch.device("cuda", 0)


# ---------------------------------------------------------------------------------- preemption
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_preemption_handler_sets_flag_and_restores(sig: signal.Signals) -> None:
    before = signal.getsignal(sig)
    with PreemptionHandler() as handler:
        assert not handler.requested and not should_stop(handler)
        os.kill(os.getpid(), sig)
        assert handler.requested and handler.signal_name == sig.name
        os.kill(os.getpid(), signal.SIGUSR1)  # a second signal keeps the first name
        assert handler.signal_name == sig.name
        assert should_stop(handler)
    assert signal.getsignal(sig) == before


def test_requeue_exit_code_is_distinct() -> None:
    # Not a Python error (1), usage error (2), the trainer's stop (3) or a signal death (128+N).
    assert REQUEUE_EXIT_CODE not in (0, 1, 2, 3) and REQUEUE_EXIT_CODE < 128


def _agree_worker(rank: int, port: int, queue) -> None:
    info = D.DistInfo(rank=rank, local_rank=rank, world_size=2, local_world_size=2, master_port=port)
    D.init_process_group(info, torch.device("cpu"), timeout_s=60)
    handler = PreemptionHandler().install()
    try:
        first = should_stop(handler)  # nobody signalled yet
        if rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 hears the signal
        second = should_stop(handler)
        queue.put((rank, first, second, handler.requested))
    finally:
        handler.uninstall()
        dist.destroy_process_group()


def run_two_ranks(worker) -> list:
    """Run ``worker(rank, port, queue)`` on two spawned gloo ranks; what they put on the queue, sorted."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = D.free_port()
    procs = [ctx.Process(target=worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="gloo over TCP on Linux")
def test_should_stop_agrees_across_ranks() -> None:
    results = run_two_ranks(_agree_worker)
    # Both ranks stop at the same check although only rank 1 was signalled.
    assert results == [(0, False, True, False), (1, False, True, True)]


# --------------------------------------------------------------------------------- collectives
def test_collectives_alone_return_this_ranks_own_answer() -> None:
    # Without a group of two or more ranks (none, or the session's one-rank group) nothing is sent.
    t = torch.tensor([2.0, 3.0])
    assert (D.rank(), D.world_size(), D.is_rank0()) == (0, 1, True)
    assert D.all_reduce_(t, "max") is t and t.tolist() == [2.0, 3.0]
    assert D.all_true(False, "cpu") is False and D.any_true(True, "cpu") is True
    assert D.gather_objects("a") == ["a"] and D.gather_to_rank0({"b": 1}) == [{"b": 1}]
    assert D.broadcast_from_rank0("c") == "c"
    D.barrier()


def _collectives_worker(rank: int, port: int, queue) -> None:
    info = D.DistInfo(rank=rank, local_rank=rank, world_size=2, local_world_size=2, master_port=port)
    D.init_process_group(info, torch.device("cpu"), timeout_s=60)
    try:
        reduced = {op: D.all_reduce_(torch.tensor([rank + 1.0]), op).item() for op in ("sum", "max", "min")}
        got = {
            "who": (D.rank(), D.world_size(), D.is_rank0(), D.is_distributed()),
            "reduced": reduced,
            "flags": (D.all_true(rank == 0, "cpu"), D.any_true(rank == 1, "cpu"), D.all_true(True, "cpu")),
            "all": D.gather_objects(f"r{rank}"),
            "rank0": D.gather_to_rank0(rank * 10),
            "broadcast": D.broadcast_from_rank0("zero" if rank == 0 else "other"),
        }
        D.barrier()
    finally:
        D.destroy()
    queue.put((rank, got, D.is_distributed()))


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="gloo over TCP on Linux")
def test_collectives_of_two_ranks() -> None:
    results = run_two_ranks(_collectives_worker)
    for rank, got, up_after_destroy in results:
        assert got["who"] == (rank, 2, rank == 0, True) and not up_after_destroy
        assert got["reduced"] == {"sum": 3.0, "max": 2.0, "min": 1.0}
        assert got["flags"] == (False, True, True)
        assert got["all"] == ["r0", "r1"]
        assert got["rank0"] == ([0, 10] if rank == 0 else None)
        assert got["broadcast"] == "zero"
