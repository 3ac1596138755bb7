"""Latency of a full CRI pod lifecycle against the same lifecycle on the backend directly.

Run: .venv/bin/python bench/cri.py [--iterations 200]

- cri      a real ``capvisor cri serve`` (subprocess) driven over its unix
           socket by a gRPC client: RunPodSandbox → CreateContainer →
           StartContainer → StopContainer → RemoveContainer → RemovePodSandbox;
- backend  the baseline: the same lifecycle through the embeddable backend
           (``supervisor.service``) in this process, no gRPC and no CRI
           translation: create_pod → create_container → start_container →
           stop_container → remove_container → remove_pod.

The container is ``/bin/sleep 600`` (an image for the CRI, the same program
in a description for the backend), stopped with SIGTERM. Iterations
alternate between the two so a noisy neighbour hits both alike; p50 and
p95 of each and the ratio of the p50s are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import trio
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc

from supervisor.service import ContainerConfig, PodConfig, open_service

SLEEP = "/bin/sleep"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class CriClient:
    def __init__(self, work: Path) -> None:
        self.socket = work / "cri.sock"
        self.logs = work / "cri-logs"
        argv = [sys.executable, "-m", "supervisor", "cri", "serve"]
        argv += ["--listen", f"unix://{self.socket}", "--root", str(work / "cri-root")]
        self.server = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("capvisor cri serve did not start")
            time.sleep(0.05)
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        self.rt = api_pb2_grpc.RuntimeServiceStub(self.channel)
        api_pb2_grpc.ImageServiceStub(self.channel).PullImage(
            cri.PullImageRequest(image=cri.ImageSpec(image=SLEEP))
        )

    def lifecycle(self, n: int) -> float:
        rt = self.rt
        started = time.perf_counter()
        config = cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=f"p{n}", namespace="bench", uid=f"u{n}"),
            log_directory=str(self.logs),
        )
        pod = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id
        container = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name="sleep"),
            image=cri.ImageSpec(image=SLEEP),
            args=["600"],
            log_path=f"p{n}.log",
        )
        cid = rt.CreateContainer(
            cri.CreateContainerRequest(pod_sandbox_id=pod, config=container, sandbox_config=config)
        ).container_id
        rt.StartContainer(cri.StartContainerRequest(container_id=cid))
        rt.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=10))
        rt.RemoveContainer(cri.RemoveContainerRequest(container_id=cid))
        rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))
        return time.perf_counter() - started

    def close(self) -> None:
        self.channel.close()
        self.server.send_signal(signal.SIGTERM)
        self.server.wait(30)


DESCRIPTION = json.dumps({"program": SLEEP, "args": ["600"]})


async def backend_lifecycle(service, logs: Path, n: int) -> float:
    started = time.perf_counter()
    pod = await service.create_pod(
        PodConfig(name=f"p{n}", namespace="bench", uid=f"u{n}", log_directory=str(logs))
    )
    cid = await service.create_container(
        pod,
        ContainerConfig(
            name="sleep",
            description_text=DESCRIPTION,
            description_file=str(logs / "sleep.yaml"),
            log_path=f"p{n}.log",
        ),
    )
    await service.start_container(cid)
    await service.stop_container(cid, timeout=10)
    await service.remove_container(cid)
    await service.remove_pod(pod)
    return time.perf_counter() - started


async def main(iterations: int) -> None:
    with tempfile.TemporaryDirectory(prefix="capvisor-bench-cri-") as tmp:
        work = Path(tmp)
        logs = work / "backend-logs"
        logs.mkdir()
        client = await trio.to_thread.run_sync(CriClient, work)
        times: dict[str, list[float]] = {"cri": [], "backend": []}
        try:
            async with open_service(work / "backend-state", subreaper=False) as service:
                for n in range(3):  # warm up both: policy and runtime-set caches
                    await trio.to_thread.run_sync(client.lifecycle, 10_000 + n)
                    await backend_lifecycle(service, logs, 10_000 + n)
                for n in range(iterations):
                    times["cri"].append(await trio.to_thread.run_sync(client.lifecycle, n))
                    times["backend"].append(await backend_lifecycle(service, logs, n))
        finally:
            client.close()
    load = os.getloadavg()[0]
    print(
        f"pod lifecycle (runp, create, start, stop, rm, rmp), {iterations} iterations, "
        f"load {load:.1f}"
    )
    print(f"{'variant':<10} {'p50 ms':>8} {'p95 ms':>8} {'ratio p50':>10}")
    base = statistics.median(times["backend"])
    for name in ("backend", "cri"):
        p50 = statistics.median(times[name])
        p95 = percentile(times[name], 0.95)
        print(f"{name:<10} {p50 * 1e3:>8.2f} {p95 * 1e3:>8.2f} {p50 / base:>10.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200)
    trio.run(main, parser.parse_args().iterations)
