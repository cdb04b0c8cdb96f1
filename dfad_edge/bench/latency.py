"""Latency the way engineers trust it: warm-up, then timed iterations; percentiles and throughput per batch size.

Two kinds of spread are reported. Per-iteration p10/p90/p99 say how much single calls jitter. On a shared machine
the median itself also drifts over minutes (noisy neighbours, power states), which per-iteration percentiles taken
in one short block cannot show; so every row is timed in several rounds spread over the whole timing phase, and
the lowest and highest per-round median (``p50_rounds``) say how far the median moved while this report was made.
"""

from __future__ import annotations

import gc
import time
from contextlib import contextmanager

import numpy as np

from .backends import InferenceBackend

# After a row, its runtime's worker threads keep spinning for a moment (ONNX Runtime's intra-op pool, OpenMP in
# PyTorch); on a 2-core machine that spin steals a core from the next row's first calls. Measured here: PyTorch
# ResNet-56 at batch 1 took 21-30 ms right after an ONNX Runtime call against 9-15 ms on its own.
ROW_SWITCH_PAUSE_S = 0.05


def percentiles(times_ms: list[float]) -> dict[str, float]:
    values = np.asarray(times_ms)
    return {"p10": round(float(np.percentile(values, 10)), 4), "p50": round(float(np.median(values)), 4),
            "p90": round(float(np.percentile(values, 90)), 4), "p99": round(float(np.percentile(values, 99)), 4),
            "mean": round(float(values.mean()), 4), "iterations": len(values)}


@contextmanager
def gc_paused():
    """No garbage-collector pauses inside timed calls (timeit does the same)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def host_latency_ms(backend: InferenceBackend, images: np.ndarray, iterations: int, warmup: int) -> list[float]:
    """End to end as an application sees it: host batch in, host logits out (device copies included)."""
    for _ in range(warmup):
        backend.predict(images)
    times = []
    with gc_paused():
        for _ in range(iterations):
            started = time.perf_counter()
            backend.predict(images)
            times.append((time.perf_counter() - started) * 1000.0)
    return times


def _batch(shape: tuple[int, ...], batch_size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch_size, *shape), dtype=np.float32)


def _latency_stats(rounds_ms: list[list[float]]) -> dict:
    stats = percentiles([t for round_times in rounds_ms for t in round_times])
    round_medians = [float(np.median(round_times)) for round_times in rounds_ms]
    stats["p50_rounds"] = [round(min(round_medians), 4), round(max(round_medians), 4)]
    return stats


def measure_interleaved(backends: dict[str, tuple[InferenceBackend, tuple[int, ...]]], batch_sizes: list[int],
                        iterations: int, warmup: int, rounds: int = 5, seed: int = 0) -> dict[str, dict]:
    """Time every backend in several rounds that alternate between them, so slow drift on a shared machine
    (noisy neighbours, thermal or power states) is spread over all rows instead of skewing whichever ran then."""
    rounds = max(1, min(rounds, iterations))
    per_round = -(-iterations // rounds)
    host: dict[str, dict[str, list[list[float]]]] = {key: {} for key in backends}
    skipped: dict[str, dict[str, str]] = {key: {} for key in backends}
    for round_index in range(rounds):
        for key, (backend, shape) in backends.items():
            for batch_size in batch_sizes:
                if backend.max_batch is not None and batch_size > backend.max_batch:
                    skipped[key][str(batch_size)] = f"above the engine's maximum batch {backend.max_batch} (build-engines --max-batch)"
                    continue
                images = _batch(shape, batch_size, seed)
                time.sleep(ROW_SWITCH_PAUSE_S)
                times = host_latency_ms(backend, images, per_round, warmup if round_index == 0 else 1)
                host[key].setdefault(str(batch_size), []).append(times)
    results = {}
    for key, (backend, shape) in backends.items():
        latency = {batch: _latency_stats(rounds_ms) for batch, rounds_ms in host[key].items()}
        compute = {}
        for batch in latency:
            device_times = backend.device_compute_ms(_batch(shape, int(batch), seed), iterations, warmup)
            if device_times is not None:
                compute[batch] = percentiles(device_times)
        results[key] = {"latency_ms": latency, "compute_ms": compute or None,
                        "throughput_ips": {batch: round(int(batch) / (stats["p50"] / 1000.0), 1)
                                           for batch, stats in latency.items()}}
        if skipped[key]:
            results[key]["batch_sizes_skipped"] = skipped[key]
    return results
