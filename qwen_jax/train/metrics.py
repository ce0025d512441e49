"""Throughput and MFU arithmetic, and where metrics go: stdout with progress, TensorBoard, JSONL.

MFU is model FLOPs (the analytic count below, not what XLA happens to execute: remat and
padding do not count) over the devices' peak dense bf16 FLOP/s. It is None on device kinds whose
peak is unknown (CPU).
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import logging


# Peak dense bf16 FLOP/s of one JAX device, by `device.device_kind` prefix (vendor data sheets).
PEAK_FLOPS = {
    "TPU v3": 61.5e12,  # one core; a v3 chip is two JAX devices
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,  # SXM; the PCIe part is slower (756e12) but reports a similar name
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
}


def device_peak_flops(device: jax.Device) -> float | None:
    kind = device.device_kind
    for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
        if kind.startswith(prefix):
            return PEAK_FLOPS[prefix]
    return None


def mfu(flops_per_token: float, tokens_per_second: float, devices=None) -> float | None:
    devices = jax.devices() if devices is None else devices
    peak = device_peak_flops(devices[0])
    if peak is None:
        return None
    return flops_per_token * tokens_per_second / (peak * len(devices))


def _format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricWriter:
    """Writes scalars to TensorBoard event files and `metrics.jsonl` in the workdir, and a line
    with progress (step of total, ETA) to the log. Only process 0 writes."""

    def __init__(self, workdir: str, total_steps: int):
        self.total_steps = total_steps
        self._active = jax.process_index() == 0
        self._tb = None
        self._jsonl = None
        self._start = None
        if self._active:
            from tensorboardX import SummaryWriter  # imported here: only process 0 needs it

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

    def write(self, step: int, scalars: dict, *, prefix: str = "train", label: str = "") -> None:
        if not self._active:
            return
        values = {k: (None if v is None else float(np.asarray(v))) for k, v in scalars.items()}
        for name, value in values.items():
            if value is not None:
                self._tb.add_scalar(f"{prefix}/{name}", value, step)
        record = {"step": step, "split": prefix, **({"label": label} if label else {}), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._start is None:
            self._start = (time.monotonic(), step)
        line = f"[{prefix}] step {step}/{self.total_steps or '?'} {label}"
        line += "".join(f" {k}={_fmt(v)}" for k, v in values.items())
        t0, s0 = self._start
        if prefix == "train" and step > s0:
            eta = (time.monotonic() - t0) / (step - s0) * (self.total_steps - step)
            line += f" ETA {_format_duration(eta)}"
        logging.info(line)

    def text(self, step: int, tag: str, text: str) -> None:
        if self._active:
            self._tb.add_text(tag, text, step)
            logging.info("[%s] step %d\n%s", tag, step, text)

    def close(self) -> None:
        if self._active:
            self._tb.close()
            self._jsonl.close()


def _fmt(value) -> str:
    if value is None:
        return "None"
    if value == int(value) and abs(value) < 1e9:
        return str(int(value))
    return f"{value:.4g}"
