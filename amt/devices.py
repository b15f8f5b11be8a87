"""Where a run computes: device choice, mixed precision on it, its peak memory, and seeded
generators on it."""

from __future__ import annotations

import contextlib
import os
import resource
import sys

import torch

from amt.episodes import episode_rng
from amt.errors import UserError


def pick_device(spec: str = "auto") -> torch.device:
    """'auto' -> a GPU if there is one, else the CPU; 'cpu'; 'cuda' (a GPU or an error);
    'cuda:N' exactly that GPU.

    Without an index the GPU is the one with the most free memory, unless CUDA_VISIBLE_DEVICES
    is set: then a scheduler (Slurm, a user) has chosen, and the first visible GPU is used.
    Snakemake sets no CUDA_VISIBLE_DEVICES, so local parallel jobs spread by free memory.
    """
    if spec == "cpu":
        return torch.device("cpu")
    if spec not in ("auto", "cuda") and not spec.startswith("cuda:"):
        raise UserError(f"device {spec!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        if spec == "auto":
            return torch.device("cpu")
        raise UserError(f"device {spec!r}: CUDA is not available on this machine"
                        f"{_where()}")
    if spec.startswith("cuda:"):
        return _explicit_gpu(spec, count)
    if os.environ.get("CUDA_VISIBLE_DEVICES") or count == 1:
        return torch.device("cuda:0")
    free = [torch.cuda.mem_get_info(i)[0] for i in range(count)]
    return torch.device(f"cuda:{max(range(count), key=free.__getitem__)}")


def _where() -> str:
    """Which machine lacks the GPU, when a scheduler placed the job there."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is None:
        return ""
    node = os.environ.get("SLURMD_NODENAME", "?")
    return f" (Slurm job {job} on node {node}: was it given a GPU? --gpus / gres)"


def _explicit_gpu(spec: str, count: int) -> torch.device:
    index = spec.removeprefix("cuda:")
    if not index.isdigit() or int(index) >= count:
        raise UserError(f"device {spec!r}: expected cuda:N with N in [0, {count})")
    return torch.device(spec)


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CUDA (no loss scaling needed); a no-op on the CPU, where runs stay
    in float32 so that they are exactly reproducible."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak resident set size of this process (MiB) and, on CUDA, peak allocated GPU memory."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mib = rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes vs KiB
    peak = {"peak_rss_mib": round(rss_mib, 1)}
    if device.type == "cuda":
        peak["peak_cuda_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def torch_generator(seed: int, *keys: int | str, device: torch.device | str = "cpu"
                    ) -> torch.Generator:
    """A torch generator fixed by (seed, *keys), whatever else ran before it."""
    state = int(episode_rng(seed, *keys).integers(2**62))
    return torch.Generator(device=device).manual_seed(state)
