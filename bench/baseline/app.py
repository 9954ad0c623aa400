"""BENCHMARK FIXTURE ONLY -- not part of gpuwatch, never deployed.

A minimal Python implementation of the serving path of the design gpuwatch
replaces (2020's "GPU Watcher": a Python process holding NVML readings,
served as JSON by a Flask app under Gunicorn workers). `gpuwatch-bench
baseline` polls it side by side with gpuwatch's GetSnapshot and
/api/v1/dashboard, at the same load, on the same machine.

Telemetry: 8 simulated H100s from a small in-process model (first-order
thermal model, power = min(demand, limit), clocks and utilisation following
power), with the same fields as gpuwatch's GpuSample. The readings are
refreshed on every request, as the original design did (it read NVML when a
poll arrived); here a "read" is the model stepped to the current time, which
is cheaper than the NVML calls it stands for, so this baseline flatters the
old design. Each Gunicorn worker is a separate process with its own model,
as they would each have had their own NVML handle.

Run by the harness as:
    gunicorn --workers N --bind 127.0.0.1:PORT --chdir bench/baseline app:app
"""

import math
import os
import socket
import time

from flask import Flask, jsonify

GPU_COUNT = int(os.environ.get("BASELINE_GPUS", "8"))
STARTED = time.time()
SAMPLER_INTERVAL_S = 0.1

app = Flask(__name__)


class SimGpu:
    """One simulated H100 SXM: power 200-700 W, slowdown at 89 C."""

    def __init__(self, index):
        self.index = index
        self.uuid = "GPU-baseline-0000-0000-0000-%012d" % index
        self.limit_w = 700.0
        self.temp_c = 35.0
        self.energy_mj = 0
        self.last = time.time()

    def demand_w(self, now):
        # The harness's gpuwatch load: 350 W <-> 650 W ramps on a 90 s cycle.
        t = (now - STARTED) % 90.0
        if t < 30.0:
            return 350.0 + 300.0 * t / 30.0
        if t < 60.0:
            return 650.0 - 300.0 * (t - 30.0) / 30.0
        return 350.0

    def read(self, now):
        dt = max(0.0, now - self.last)
        self.last = now
        power_w = min(self.demand_w(now), self.limit_w)
        target_c = 30.0 + power_w * 0.075
        self.temp_c += (target_c - self.temp_c) * (1.0 - math.exp(-dt / 20.0))
        self.energy_mj += int(power_w * dt * 1000)
        load = power_w / self.limit_w
        clock = int(1980 * min(1.0, 0.6 + 0.4 * load))
        return {
            "index": self.index,
            "uuid": self.uuid,
            "seq": int(now * 10),
            "time": now,
            "age_ms": 0,
            "health": "ok",
            "temperature_c": int(self.temp_c),
            "memory_temperature_c": int(self.temp_c) + 4,
            "power_draw_mw": int(power_w * 1000),
            "power_limit_mw": int(self.limit_w * 1000),
            "enforced_power_limit_mw": int(self.limit_w * 1000),
            "energy_mj": self.energy_mj,
            "graphics_clock_mhz": clock,
            "sm_clock_mhz": clock,
            "memory_clock_mhz": 2619,
            "video_clock_mhz": int(clock * 0.9),
            "max_graphics_clock_mhz": 1980,
            "max_sm_clock_mhz": 1980,
            "max_memory_clock_mhz": 2619,
            "max_video_clock_mhz": 1755,
            "utilization_gpu_pct": int(100 * load),
            "utilization_memory_pct": int(60 * load),
            "memory_used_bytes": int(60e9 * load),
            "memory_total_bytes": 85520809984,
            "performance_state": 0,
            "throttle_reasons_mask": 0,
            "throttle_reasons": [],
            "ecc": {
                "corrected_volatile": 0,
                "uncorrected_volatile": 0,
                "corrected_aggregate": 0,
                "uncorrected_aggregate": 0,
            },
            "pcie_tx_kbps": 1200,
            "pcie_rx_kbps": 3400,
            "processes": [{"pid": 4100 + self.index, "used_memory_bytes": int(4e9)}],
            "processes_time": now,
            "governor_state": "idle",
        }


FLEET = [SimGpu(i) for i in range(GPU_COUNT)]


@app.get("/api/gpus")
def gpus():
    """The latest reading of every GPU (the poll the harness measures)."""
    now = time.time()
    return jsonify(
        {
            "hostname": socket.gethostname(),
            "seq": int(now / SAMPLER_INTERVAL_S),
            "time": now,
            "samples": [gpu.read(now) for gpu in FLEET],
        }
    )


@app.get("/healthz")
def healthz():
    return "ok\n"
