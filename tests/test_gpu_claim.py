"""Each GPU job claims a GPU of its own (pathwsi.runtime.gpu_claim); on the CPU with fake device lists."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from pathwsi.runtime.gpu_claim import GpuClaimError, GpuSettings, claim_gpu, lock_folder, visible_devices

FOUR = ["0", "1", "2", "3"]  # a fake node with four GPUs
HOLD_S = 0.6
FORK = multiprocessing.get_context("fork")  # fast, and what the fork server does


def _job(lock_dir: str, number: int, wait_s: float | None, start: Any, out: Any) -> None:
    """A GPU job: claim, hold the GPU for HOLD_S, report (index, held from, held to, waited)."""
    start.wait()
    claim = claim_gpu(FOUR, GpuSettings(lock_dir=lock_dir, wait_s=wait_s), job=f"job {number}")
    began = time.monotonic()
    time.sleep(HOLD_S)
    ended = time.monotonic()
    claim.release()
    out.put((claim.index, began, ended, claim.waited_s))


def _holder(lock_dir: str, devices: list[str], ready: Any) -> None:
    claim_gpu(devices, GpuSettings(lock_dir=lock_dir), job="holder")
    ready.set()
    time.sleep(60)  # until killed


def test_six_concurrent_jobs_on_four_gpus_never_share_one(tmp_path):
    start, out = FORK.Barrier(6), FORK.Queue()
    jobs = [FORK.Process(target=_job, args=(str(tmp_path), n, 20.0, start, out)) for n in range(6)]
    for job in jobs:
        job.start()
    held = [out.get(timeout=20) for _ in jobs]
    for job in jobs:
        job.join(10)
        assert job.exitcode == 0
    for index in range(4):
        spans = sorted((began, ended) for i, began, ended, _ in held if i == index)
        assert all(prev_end <= began for (_, prev_end), (began, _) in zip(spans, spans[1:])), (index, spans)
    assert {i for i, *_ in held} == set(range(4))
    assert sum(w > HOLD_S / 2 for *_, w in held) >= 1  # the fifth and sixth waited (unless one started that late)


def test_with_no_wait_the_fifth_job_fails_naming_the_gpus_and_their_holders(tmp_path):
    settings = GpuSettings(lock_dir=str(tmp_path), wait_s=0)
    claims = [claim_gpu(FOUR, settings, job=f"slide-{n}") for n in range(4)]
    assert [c.index for c in claims] == [0, 1, 2, 3]
    started = time.monotonic()
    with pytest.raises(GpuClaimError) as err:
        claim_gpu(FOUR, settings, job="slide-4")
    assert time.monotonic() - started < 1
    message = str(err.value)
    assert "slide-4" in message and "gpus.wait_s" in message
    assert all(f"cuda:{n} (id {n}) by pid {os.getpid()}" in message and f"job slide-{n}" in message for n in range(4))
    claims[2].release()
    assert claim_gpu(FOUR, settings, job="slide-4").index == 2


def test_a_bounded_wait_fails_after_it(tmp_path):
    holder = claim_gpu(["0"], GpuSettings(lock_dir=str(tmp_path)))
    started = time.monotonic()
    with pytest.raises(GpuClaimError, match="still taken after"):
        claim_gpu(["0"], GpuSettings(lock_dir=str(tmp_path), wait_s=0.5))
    assert 0.5 <= time.monotonic() - started < 2
    holder.release()


def test_a_sigkilled_holder_frees_its_gpu(tmp_path):
    ready = FORK.Event()
    holder = FORK.Process(target=_holder, args=(str(tmp_path), ["0"], ready))
    holder.start()
    assert ready.wait(10)
    with pytest.raises(GpuClaimError, match=f"pid {holder.pid}"):
        claim_gpu(["0"], GpuSettings(lock_dir=str(tmp_path), wait_s=0))
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    claim = claim_gpu(["0"], GpuSettings(lock_dir=str(tmp_path), wait_s=5))
    assert claim.index == 0 and claim.waited_s < 1


def test_cuda_n_claims_that_gpu_and_waits_for_it_alone(tmp_path):
    settings = GpuSettings(lock_dir=str(tmp_path), wait_s=0)
    two = claim_gpu(FOUR, settings, index=2)
    assert two.index == 2
    with pytest.raises(GpuClaimError, match="cuda:2"):
        claim_gpu(FOUR, settings, index=2)
    assert claim_gpu(FOUR, settings).index == 0  # `cuda` takes any free one
    with pytest.raises(GpuClaimError, match="cuda:4 asked for, but only 4"):
        claim_gpu(FOUR, settings, index=4)
    with pytest.raises(GpuClaimError, match="no CUDA device"):
        claim_gpu([], settings)


def test_gpus_are_named_by_their_cuda_visible_devices_entry(tmp_path):
    assert visible_devices(2, {}) == ["0", "1"]
    assert visible_devices(2, {"CUDA_VISIBLE_DEVICES": "5, 3"}) == ["5", "3"]
    assert visible_devices(1, {"CUDA_VISIBLE_DEVICES": "GPU-1a2b"}) == ["GPU-1a2b"]
    settings = GpuSettings(lock_dir=str(tmp_path), wait_s=0)
    split = {"CUDA_VISIBLE_DEVICES": "5,3"}
    claim = claim_gpu(visible_devices(2, split), settings, environ=split)  # cuda:0 of this job is GPU 5
    assert (claim.index, claim.device_id) == (0, "5")
    assert claim.record()["cuda_visible_devices"] == "5,3"
    with pytest.raises(GpuClaimError, match=r"cuda:5 \(id 5\)"):  # a job that sees all eight agrees
        claim_gpu(visible_devices(8, {}), settings, index=5, environ={})
    one = {"CUDA_VISIBLE_DEVICES": "5"}  # handed GPU 5 by hand: used as is, but not shared silently
    with pytest.raises(GpuClaimError, match="id 5"):
        claim_gpu(visible_devices(1, one), settings, environ=one)


def test_each_slurm_job_has_its_own_locks(tmp_path):
    settings = GpuSettings(lock_dir=str(tmp_path), wait_s=0)
    first, second = (
        {"SLURM_JOB_ID": "11", "CUDA_VISIBLE_DEVICES": "0"},
        {"SLURM_JOB_ID": "12", "CUDA_VISIBLE_DEVICES": "0"},
    )
    assert lock_folder(settings, first) != lock_folder(settings, second)
    claim_gpu(["0"], settings, environ=first)
    assert claim_gpu(["0"], settings, environ=second).index == 0  # SLURM gave each its own GPU, both named 0


def test_the_claim_is_logged_and_the_default_folder_is_private(caplog, monkeypatch, tmp_path):
    monkeypatch.setattr("pathwsi.runtime.gpu_claim._lock_root", lambda settings: tmp_path / "pathwsi-gpus-me")
    with caplog.at_level(logging.INFO, logger="pathwsi.runtime.gpu_claim"):
        claim = claim_gpu(["7"], GpuSettings(), job="finetune", environ={"CUDA_VISIBLE_DEVICES": "7"})
    assert "claimed GPU 0 (id 7, CUDA_VISIBLE_DEVICES=7, waited 0.0 s" in caplog.text
    assert (tmp_path / "pathwsi-gpus-me").stat().st_mode & 0o777 == 0o700
    assert "job finetune" in Path(claim.lock_file).read_text()


def test_a_cpu_job_claims_nothing(tmp_path):
    torch = pytest.importorskip("torch")
    from pathwsi.runtime.gpu_claim import claimed_device

    with claimed_device(torch.device("cpu"), GpuSettings(lock_dir=str(tmp_path))) as (device, record):
        assert device == torch.device("cpu") and record == {}
    assert not list(tmp_path.iterdir())


@pytest.mark.cuda
def test_a_job_runs_on_the_gpu_it_claimed(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from pathwsi.runtime.gpu_claim import claimed_device

    settings = GpuSettings(lock_dir=str(tmp_path), wait_s=0)
    taken = claim_gpu(visible_devices(), settings) if torch.cuda.device_count() > 1 else None  # another job on cuda:0
    with claimed_device(torch.device("cuda"), settings, job="test") as (device, record):
        expected = 1 if taken else 0
        assert device == torch.device("cuda", expected) and record["index"] == expected
        assert torch.cuda.current_device() == expected
        assert torch.ones(2, device="cuda").device == device  # plain "cuda" lands on the claimed GPU
    if taken:
        taken.release()
