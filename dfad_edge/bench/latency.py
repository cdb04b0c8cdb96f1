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


def measure(backend: InferenceBackend, sample_shape: tuple[int, ...], batch_sizes: list[int], iterations: int,
            warmup: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    latency, compute, throughput, skipped = {}, {}, {}, {}
    for batch_size in batch_sizes:
        if backend.max_batch is not None and batch_size > backend.max_batch:
            skipped[str(batch_size)] = f"above the engine's maximum batch {backend.max_batch} (export --max-batch)"
            continue
        images = rng.standard_normal((batch_size, *sample_shape), dtype=np.float32)
        host = percentiles(host_latency_ms(backend, images, iterations, warmup))
        latency[str(batch_size)] = host
        throughput[str(batch_size)] = round(batch_size / (host["p50"] / 1000.0), 1)
        device_times = backend.device_compute_ms(images, iterations, warmup)
        if device_times is not None:
            compute[str(batch_size)] = percentiles(device_times)
    result = {"latency_ms": latency, "compute_ms": compute or None, "throughput_ips": throughput}
    if skipped:
        result["batch_sizes_skipped"] = skipped
    return result
