"""What the machine says while a stream runs: resident memory, GPU memory, the device's name.
Shared by `bench`, `perplexity`, the tests and the scripts."""
from __future__ import annotations

import os

from .runtime import supports_gpu_offload


def rss_mib() -> float | None:
    """Resident memory of this process now (VmRSS), in MiB; None where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def on_gpu(n_gpu_layers: int) -> bool:
    return n_gpu_layers != 0 and supports_gpu_offload()


class GpuMemory:
    """GPU memory through NVML (the library nvidia-smi reads): what this process holds, or, where
    a container hides its pid from the driver, what the whole device holds (`scope` says which).
    Reads GPU 0: the device machine has one."""

    def __init__(self):
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(self.handle)
        self.name = name.decode() if isinstance(name, bytes) else name
        self.scope = "process"

    def used_mib(self) -> float:
        for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
            if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                self.scope = "process"
                return proc.usedGpuMemory / 2**20
        self.scope = "device"
        return self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used / 2**20

    @classmethod
    def open(cls, n_gpu_layers: int) -> "GpuMemory | None":
        """The probe on a CUDA run, None on the CPU or without nvidia-ml-py."""
        if not on_gpu(n_gpu_layers):
            return None
        try:
            return cls()
        except Exception:  # no pynvml, or no NVIDIA driver (another GPU backend)
            return None


def device_label(n_gpu_layers: int, n_threads: int | None) -> str:
    if on_gpu(n_gpu_layers):
        gpu = GpuMemory.open(n_gpu_layers)
        return f"GPU ({gpu.name if gpu else 'name unknown'})"
    return f"CPU ({cpu_name()}, {n_threads or os.cpu_count()} threads)"
