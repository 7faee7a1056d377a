import json
import os
import stat

import psutil
import pytest

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


def test_apple_silicon_is_a_metal_gpu_with_unified_memory():
    answers = {"hw.memsize": str(16 * 2**30), "machdep.cpu.brand_string": "Apple M2 Pro"}
    gpus = hardware.apple_gpus("Darwin", "arm64", sysctl=answers.get)
    assert [(g.name, g.memory_total_mib, g.backend) for g in gpus] == [("Apple M2 Pro GPU", 16 * 1024, "metal")]
    assert hardware.apple_gpus("Darwin", "x86_64", sysctl=answers.get) == []      # an Intel Mac: no Metal offload
    assert hardware.apple_gpus("Linux", "aarch64", sysctl=answers.get) == []      # Graviton, Ampere: CPU only


def test_gpu_cells_by_kind(monkeypatch, capsys):
    from labkit import notebook
    monkeypatch.setattr(hardware, "nvidia_gpus", lambda: [])
    monkeypatch.setattr(hardware, "apple_gpus", lambda: [hardware.GPU("Apple M3 GPU", 8192, backend="metal")])
    monkeypatch.delenv("LABKIT_REQUIRE_GPU", raising=False)
    assert notebook.gpu_available() and not notebook.gpu_available("cuda")
    ns = {}
    assert notebook.run_gpu_cell("x = 1", ns) is True and ns["x"] == 1           # llama.cpp offload: Metal counts
    assert notebook.run_gpu_cell("y = 1", ns, "cuda") is False and "y" not in ns  # vLLM's GPU build: NVIDIA only
    assert "needs an NVIDIA GPU (CUDA)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="cuda"):
        notebook.gpu_available("rocm")
