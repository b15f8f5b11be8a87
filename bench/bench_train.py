"""Time, FLOPs and peak memory of one meta-training episode: pm, lora, APSV alone and full amt.

Every (backbone, case) runs in a fresh process, so its peak RSS is its own. Episodes are 5-way
with 15 queries per class of random pixels at the backbone's default size (1-shot unless
``--shots`` says more); backbones are randomly initialised (speed does not depend on the
weights). Training computes as the pipeline does: float32 on the CPU, bfloat16 autocast on CUDA
(``--no-amp``: float32 there too); on CUDA the peak allocated memory is recorded per shot count.
FLOPs are counted, not estimated: every matmul, convolution and attention kernel that runs,
forward and backward, attack steps included (torch's flop registry through a dispatch mode).
The machine's peak is a large torch.matmul in the training dtype (float32 on the CPU, bfloat16
on CUDA unless ``--no-amp``).

Cases: ``pm`` (whole backbone), ``lora`` (adapters), ``apsv`` (amt without APQ: lora plus the
APSV ascent pass, so apsv/lora - 1 is the extra forward-backward APSV costs), ``amt`` (APQ with
its PGD steps and APSV). Targets: lora <= 0.8 x pm; APSV <= 1 extra forward-backward; on the
CPU, pm's forward-backward reaches at least half the matmul peak.

    python bench/bench_train.py [--json] [--backbones dino_vits16 small_vit] [--episodes 1]
        [--shots 1 5] [--device cuda] [--no-amp]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

CASES = {  # case -> TrainConfig overrides
    "pm": {"method": "pm"},
    "lora": {"method": "lora"},
    "apsv": {"method": "amt", "apq": False},
    "amt": {"method": "amt"},
}
LONG_EPISODE_S = 20.0  # a first episode this long is measured itself: start-up costs amortised
MIN_TIMED_S = 2.0  # short episodes are timed until this much has run, so that the best of them
# is not one of a handful of disturbed ones (small_vit's 60-ms episodes on 2 threads)


def flop_counter():
    """A dispatch mode summing torch's registered FLOP formulas (FlopCounterMode's module
    tracker breaks torch.autograd.grad on leaf inputs, which the attack uses), plus the CPU
    flash-attention kernels the registry lacks."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    extra = {
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *a, **kw: sdpa_flop_count(q.shape, k.shape, v.shape),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *a, **kw: sdpa_backward_flop_count(g.shape, q.shape, k.shape,
                                                                  v.shape),
    }

    class Flops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            packet = func._overloadpacket
            if packet in flop_registry:
                self.total += flop_registry[packet](*args, **kwargs, out_val=out)
            elif packet in extra:
                self.total += extra[packet](*args, **kwargs)
            return out

    return Flops()


def _episode(image_size: int, ways: int = 5, shots: int = 1, queries: int = 15):
    import torch

    g = torch.Generator().manual_seed(0)
    ys = torch.arange(ways).repeat_interleave(shots)
    yq = torch.arange(ways).repeat_interleave(queries)
    return (torch.rand(len(ys), 3, image_size, image_size, generator=g), ys,
            torch.rand(len(yq), 3, image_size, image_size, generator=g), yq)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def compute_dtype(device: str, amp: bool) -> str:
    """What training multiplies in: bfloat16 under autocast on CUDA, else float32."""
    return "bfloat16" if amp and device.startswith("cuda") else "float32"


def measure(backbone: str, case: str, shots: list[int], episodes: int, min_seconds: float,
            attack_steps: int, device: str, amp: bool) -> list[dict]:
    """Runs in a child process: per shot count, one counted episode, then at least ``episodes``
    timed ones, and as many as run in ``min_seconds``."""
    import torch

    from amt.devices import pick_device, reset_peak_memory
    from amt.specs import TrainConfig
    from amt.train import MetaTuner

    baseline = _rss_mib()
    torch.manual_seed(0)
    config = TrainConfig(backbone=backbone, attack_steps=attack_steps, device=device, amp=amp,
                         **CASES[case])
    dev = pick_device(device)
    tuner = MetaTuner(config, dev)
    results = []
    for k in shots:
        reset_peak_memory(dev)
        episode = _episode(config.image_size, shots=k)

        def timed(index: int, episode=episode) -> float:
            start = time.perf_counter()
            tuner.step(episode, index, config.lr)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            return time.perf_counter() - start

        counter = flop_counter()
        with counter:
            first = timed(0)
        if first > LONG_EPISODE_S:
            seconds = [first]
        else:
            seconds = []
            while len(seconds) < episodes or sum(seconds) < min_seconds:
                seconds.append(timed(len(seconds) + 1))
        result = {"backbone": backbone, "case": case, "shots": k,
                  "image_size": config.image_size, "device": str(dev),
                  "dtype": compute_dtype(str(dev), amp),
                  "seconds": min(seconds), "seconds_median": statistics.median(seconds),
                  "episodes_timed": len(seconds),
                  "gflop": counter.total / 1e9, "peak_rss_mib": round(_rss_mib(), 1),
                  "rss_before_model_mib": round(baseline, 1)}
        if dev.type == "cuda":
            result["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
        results.append(result)
    return results


def matmul_peak(device: str, size: int | None, amp: bool = True, repeats: int = 10) -> dict:
    """Best GFLOP/s of a size x size torch.matmul in the dtype training computes in (2048 on
    the CPU, 8192 on CUDA, where smaller products do not fill the GPU)."""
    import torch

    from amt.devices import pick_device

    dev = pick_device(device)
    cuda = dev.type == "cuda"
    size = size or (8192 if cuda else 2048)
    dtype = getattr(torch, compute_dtype(str(dev), amp))
    a = torch.randn(size, size, device=dev, dtype=dtype)
    b = torch.randn(size, size, device=dev, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize(dev)
        best = min(best, time.perf_counter() - start)
    return {"gflops": 2 * size**3 / best / 1e9, "dtype": str(dtype).removeprefix("torch."),
            "size": size, "device": str(dev)}


def _run(args: argparse.Namespace) -> dict:
    context = multiprocessing.get_context("spawn")
    results = []
    for backbone in args.backbones:
        for case in args.cases:
            with ProcessPoolExecutor(1, mp_context=context) as pool:
                results += pool.submit(measure, backbone, case, args.shots, args.episodes,
                                       args.min_seconds, args.attack_steps, args.device,
                                       args.amp).result()
            print(f"{backbone} {case}: " + ", ".join(
                f"{r['shots']}-shot {r['seconds']:.3f}" for r in results[-len(args.shots):])
                + " s/episode", file=sys.stderr)
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        peak = pool.submit(matmul_peak, args.device, args.matmul_size, args.amp).result()
    for r in results:
        r["gflops"] = r["gflop"] / r["seconds"]
        r["fraction_of_peak"] = r["gflops"] / peak["gflops"]
    return {"matmul": peak, "results": results, "checks": _checks(results),
            "attack_steps": args.attack_steps}


def _checks(results: list[dict]) -> list[dict]:
    by = {(r["backbone"], r["shots"], r["case"]): r for r in results}
    checks = []
    for backbone, shots in dict.fromkeys((r["backbone"], r["shots"]) for r in results):
        label = f"{backbone} {shots}-shot"
        pm, lora, apsv = (by.get((backbone, shots, c)) for c in ("pm", "lora", "apsv"))
        if pm and lora:
            ratio = lora["seconds"] / pm["seconds"]
            checks.append({"backbone": label, "check": "lora / pm time", "value": ratio,
                           "target": "<= 0.8", "ok": ratio <= 0.8})
        if lora and apsv:
            extra = apsv["seconds"] / lora["seconds"] - 1
            flop_extra = apsv["gflop"] / lora["gflop"] - 1
            checks.append({"backbone": label, "check": "APSV extra fwd-bwd (time; FLOPs "
                           f"{flop_extra:.2f})", "value": extra, "target": "<= 1",
                           "ok": flop_extra <= 1.0 + 1e-6 and extra <= 1.15})
        if pm and pm["device"] == "cpu":
            checks.append({"backbone": label, "check": "pm fraction of matmul peak",
                           "value": pm["fraction_of_peak"], "target": ">= 0.5 (CPU)",
                           "ok": pm["fraction_of_peak"] >= 0.5})
    return checks


def markdown(report: dict) -> str:
    peak = report["matmul"]
    lines = [f"matmul peak: {peak['gflops']:.0f} GFLOP/s ({peak['dtype']}, {peak['size']}^2, "
             f"{peak['device']}); amt: {report['attack_steps']} PGD steps, APSV on",
             "", "| backbone | px | shots | case | s/episode (best) | x pm | GFLOP/episode | "
             "GFLOP/s | % of matmul peak | peak RSS MiB (before model) | peak CUDA MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    pm = {(r["backbone"], r["shots"]): r["seconds"] for r in report["results"]
          if r["case"] == "pm"}
    for r in report["results"]:
        key = (r["backbone"], r["shots"])
        ratio = f"{r['seconds'] / pm[key]:.2f}" if key in pm else "-"
        lines.append(f"| {r['backbone']} | {r['image_size']} | {r['shots']} | {r['case']} | "
                     f"{r['seconds']:.3f} | {ratio} | {r['gflop']:.1f} | {r['gflops']:.1f} | "
                     f"{100 * r['fraction_of_peak']:.0f} | {r['peak_rss_mib']:.0f} "
                     f"({r['rss_before_model_mib']:.0f}) | {r.get('peak_cuda_mib', '-')} |")
    lines += ["", "| backbone | check | value | target | ok |", "|---|---|---|---|---|"]
    lines += [f"| {c['backbone']} | {c['check']} | {c['value']:.2f} | {c['target']} | "
              f"{'yes' if c['ok'] else 'NO'} |" for c in report["checks"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["dino_vits16", "small_vit"])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--shots", type=int, nargs="+", default=[1],
                        help="5-way episodes with this many shots (15 queries per class)")
    parser.add_argument("--episodes", type=int, default=3,
                        help="timed episodes per case, at least (short ones run until "
                        "--min-seconds are timed); the best is reported (least disturbed)")
    parser.add_argument("--min-seconds", type=float, default=MIN_TIMED_S,
                        help="time short episodes until this much has run (default: "
                        f"{MIN_TIMED_S:g})")
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="bfloat16 autocast on CUDA, as training runs (no effect on the CPU)")
    parser.add_argument("--matmul-size", type=int, help="default 2048 (CPU), 8192 (CUDA)")
    parser.add_argument("--json", action="store_true", help="print JSON, not Markdown")
    args = parser.parse_args(argv)
    report = _run(args)
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
