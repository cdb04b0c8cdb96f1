"""Latency the way engineers trust it: warm-up, then timed iterations; percentiles and throughput per batch size."""

from __future__ import annotations

import time

import numpy as np

from .backends import InferenceBackend


def percentiles(times_ms: list[float]) -> dict[str, float]:
    values = np.asarray(times_ms)
    return {"p10": round(float(np.percentile(values, 10)), 4), "p50": round(float(np.median(values)), 4),
            "p90": round(float(np.percentile(values, 90)), 4), "p99": round(float(np.percentile(values, 99)), 4),
            "mean": round(float(values.mean()), 4), "iterations": len(values)}


def host_latency_ms(backend: InferenceBackend, images: np.ndarray, iterations: int, warmup: int) -> list[float]:
    """End to end as an application sees it: host batch in, host logits out (device copies included)."""
    for _ in range(warmup):
        backend.predict(images)
    times = []
    for _ in range(iterations):
        started = time.perf_counter()
        backend.predict(images)
        times.append((time.perf_counter() - started) * 1000.0)
    return times


def _batch(shape: tuple[int, ...], batch_size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch_size, *shape), dtype=np.float32)


def measure_interleaved(backends: dict[str, tuple[InferenceBackend, tuple[int, ...]]], batch_sizes: list[int],
                        iterations: int, warmup: int, rounds: int = 5, seed: int = 0) -> dict[str, dict]:
    """Time every backend in several rounds that alternate between them, so slow drift on a shared machine
    (noisy neighbours, thermal or power states) is spread over all rows instead of skewing whichever ran then."""
    per_round = max(1, -(-iterations // rounds))
    host: dict[str, dict[str, list[float]]] = {key: {} for key in backends}
    skipped: dict[str, dict[str, str]] = {key: {} for key in backends}
    for round_index in range(rounds):
        for key, (backend, shape) in backends.items():
            for batch_size in batch_sizes:
                if backend.max_batch is not None and batch_size > backend.max_batch:
                    skipped[key][str(batch_size)] = f"above the engine's maximum batch {backend.max_batch} (export --max-batch)"
                    continue
                images = _batch(shape, batch_size, seed)
                times = host_latency_ms(backend, images, per_round, warmup if round_index == 0 else 1)
                host[key].setdefault(str(batch_size), []).extend(times)
    results = {}
    for key, (backend, shape) in backends.items():
        latency = {batch: percentiles(times) for batch, times in host[key].items()}
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
