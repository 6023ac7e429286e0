#!/usr/bin/env python3
"""`warm serve` on a lent GPU machine, over HTTP (called by scripts/gpu-check.sh).

Starts the binary twice on the demo set: `--device auto` on the GPU, and `--device auto`
with CUDA_VISIBLE_DEVICES="" (the fallback a CUDA build takes without a usable GPU, which
must serve on the CPU in f32). Scores the same inputs on both, then loads the GPU server
with concurrent requests. Prints table rows like `warm gpu-check`; exit 1 on a failure.

    python3 scripts/gpu-serve-check.py BIN
"""

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

# Two servers start within the script's 100 s; the demo set loads in seconds.
READY_S = 45

INPUTS = [
    {"prompt": "Write a positive review of a movie.", "response": "A gorgeous, moving film."},
    {"prompt": "Write a positive review of a movie.", "response": "Dull, and far too long."},
    "An ordinary sentence, pre-formatted, scored as it is.",
    {"prompt": "Describe the weather.", "response": "Grey skies, but a warm and pleasant day."},
]


def request(port, path, body=None, timeout=30):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return response.status, json.loads(response.read() or b"null")


def start(binary, port, env_extra, log_path):
    """The server process and the seconds it took to answer /health with 200."""
    started = time.time()
    env = dict(os.environ, **env_extra)
    log = open(log_path, "w")
    process = subprocess.Popen(
        [binary, "serve", "--port", str(port), "--host", "127.0.0.1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + READY_S
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}: {tail(log_path)}")
        try:
            if request(port, "/health", timeout=2)[0] == 200:
                return process, time.time() - started
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"not ready in {READY_S} s: {tail(log_path)}")


def tail(path, lines=3):
    with open(path) as f:
        return " / ".join(line.strip() for line in f.read().splitlines()[-lines:])


def row(case, passed, detail):
    """Prints one table row and returns whether it passed."""
    result = "ok" if passed else "FAIL"
    print(f"| serve | {case} | {result} | {detail.replace('|', ' ')} |", flush=True)
    return passed


def log_says(path, text):
    with open(path) as f:
        return text in f.read()


def load(port, requests, clients):
    errors = []
    latencies = []
    lock = threading.Lock()
    per_client = requests // clients

    def client():
        for _ in range(per_client):
            started = time.time()
            try:
                status, _ = request(port, "/v1/score", {"inputs": INPUTS})
                ok = status == 200
            except Exception as e:  # noqa: BLE001 - any failure counts as an error
                ok = False
                with lock:
                    errors.append(str(e))
            with lock:
                if ok:
                    latencies.append(time.time() - started)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return per_client * clients, time.time() - started, sorted(latencies), errors


def main():
    binary = sys.argv[1]
    # The logs go where the device tool returns files from, so a run cut short keeps them.
    work = os.environ.get("GPU_CHECK_LOGS") or os.environ.get("GPU_CHECK_WORK", "/tmp/warm-gpu-check")
    ok = True
    servers = []
    try:
        gpu, gpu_ready = start(binary, 18080, {}, f"{work}/serve-gpu.log")
        servers.append(gpu)
        cpu, cpu_ready = start(binary, 18081, {"CUDA_VISIBLE_DEVICES": ""}, f"{work}/serve-nogpu.log")
        servers.append(cpu)
        fell_back = log_says(f"{work}/serve-nogpu.log", "running on the CPU")
        ok &= row(
            "no usable GPU (CUDA_VISIBLE_DEVICES='')",
            fell_back,
            f"ready in {cpu_ready:.1f} s; log says running on the CPU: {fell_back}",
        )
        on_the_gpu = log_says(f"{work}/serve-gpu.log", "running on CUDA GPU 0")
        ok &= row("--device auto with a GPU", on_the_gpu, f"log says running on CUDA GPU 0: {on_the_gpu}")
        _, info = request(18080, "/info")
        ok &= row(
            "/info of the GPU server",
            info.get("device") == "cuda:0" and info.get("dtype") == "bf16",
            f"device {info.get('device')}, dtype {info.get('dtype')} (cuda:0, bf16 expected)",
        )
        _, on_gpu = request(18080, "/v1/score", {"inputs": INPUTS})
        _, on_cpu = request(18081, "/v1/score", {"inputs": INPUTS})
        gaps = [abs(a - b) for a, b in zip(on_gpu["scores"], on_cpu["scores"])]
        scale = max(1.0, max(abs(s) for s in on_cpu["scores"]))
        ok &= row(
            "demo set on the GPU (bf16) vs the CPU (f32), /v1/score",
            len(gaps) == len(INPUTS) and max(gaps) <= 0.05 * scale,
            f"ready in {gpu_ready:.1f} s; GPU {[round(s, 4) for s in on_gpu['scores']]}, "
            f"CPU {[round(s, 4) for s in on_cpu['scores']]}, max gap {max(gaps):.2e}",
        )
        requests, seconds, latencies, errors = load(18080, 2000, 32)
        p50 = latencies[len(latencies) // 2] * 1e3 if latencies else float("nan")
        p99 = latencies[int(len(latencies) * 0.99)] * 1e3 if latencies else float("nan")
        ok &= row(
            f"load on the GPU: {requests} requests x {len(INPUTS)} inputs, 32 clients",
            not errors,
            f"{requests / seconds:.0f} req/s, p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
            f"{len(errors)} errors{': ' + errors[0] if errors else ''}",
        )
    except Exception as e:  # noqa: BLE001 - reported as a row, the run goes on
        print(f"| serve | - | ERROR | {str(e).replace('|', ' ')} |", flush=True)
        ok = False
    finally:
        for s in servers:
            s.terminate()
        for s in servers:
            try:
                s.wait(timeout=30)
            except subprocess.TimeoutExpired:
                s.kill()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
