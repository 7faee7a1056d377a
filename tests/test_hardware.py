import json
import os
import stat

import psutil

from labkit import hardware


def test_probe_reads_this_machine():
    hw = hardware.probe()
    assert hw.logical_cores == os.cpu_count()
    assert 1 <= hw.usable_cores <= hw.logical_cores
    assert abs(hw.ram_total_gib - psutil.virtual_memory().total / 2**30) < 0.01
    assert 0 < hw.ram_available_gib <= hw.ram_total_gib
    if os.path.exists("/proc/cpuinfo"):
        flags = open("/proc/cpuinfo").read().split()
        assert all(f in flags for f in hw.simd)
    assert hw.engines["llama.cpp"]            # the lab's environment always has it
    assert hw.llama_cpp_gpu_offload in (True, False)
    assert set(hw.can_run) == {"llama.cpp", "vllm", "ollama"}
    json.dumps(hw.as_dict())                   # serialisable for benchmark fingerprints
    assert any(k == "CPU" for k, _ in hw.table())


def test_nvidia_smi_output_parsed(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA GeForce RTX 4090, 24564, 23010, 560.35, 8.9'\n"
                    "echo 'Tesla T4, 15360, [N/A], 535.1, 7.5'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    gpus = hardware.nvidia_gpus()
    assert [g.name for g in gpus] == ["NVIDIA GeForce RTX 4090", "Tesla T4"]
    assert gpus[0].memory_total_mib == 24564 and gpus[0].memory_free_mib == 23010
    assert gpus[1].memory_free_mib is None and gpus[1].compute_capability == "7.5"


def test_broken_nvidia_smi_means_no_gpu(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver' >&2\nexit 9\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert hardware.nvidia_gpus() == []


def test_usable_cores_without_affinity_as_on_macos(monkeypatch):
    import os

    from labkit import hardware
    assert hardware.usable_cores() == len(os.sched_getaffinity(0))
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 10)
    assert hardware.usable_cores() == 10
