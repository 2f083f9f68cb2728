"""Does tritonserver release a python model's replaced instance (its shared-memory pool) after a stub kill?

    python benchmarks/soak_tiny_repo.py DIR && python benchmarks/retained_shm_probe.py DIR/repo

Starts the server on the repository, soaks it 30 s (8 clients, 20 % malformed, a 201 MB oversize array at most
every 5 s) with the preprocess stub killed 10 s after a 3 s warm-up and healed; then waits 20 s idle; then kills the
new preprocess stub with no load and heals it. After each phase it prints tritonserver's RSS per /dev/shm region
(MB, the region's last 8 characters), the models Triton logged as unloaded, and ``TritonServer.retained_shm_mb``
(shared memory the server maps and no live stub maps). The retained-memory restart is turned off here
(``max_retained_shm_mb=0``) so that the probe can watch.
"""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def shm_rss_mb(pid: int) -> dict[str, int]:
    rss: dict[str, int] = {}
    region = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        parts = line.split()
        if "-" in parts[0] and not parts[0].endswith(":"):
            region = parts[5].rsplit("_", 1)[-1][-8:] if len(parts) >= 6 and parts[5].startswith("/dev/shm/") else None
        elif region and parts[0] == "Rss:":
            rss[region] = rss.get(region, 0) + int(parts[1]) // 1024
    return rss


def main(argv: list[str] | None = None) -> int:
    from sdconet.serve.healing import HealPolicy
    from sdconet.serve.loadgen import synthetic_image
    from sdconet.serve.server import TritonServer
    from sdconet.serve.soak import run_soak

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with TritonServer(args[0], http_port=0, grpc_port=0, metrics_port=0,
                      heal_policy=HealPolicy(max_retained_shm_mb=0)) as server:
        pid = server.process.pid

        def show(phase: str) -> None:
            unloaded = re.findall(r"successfully unloaded '(\w+)' version", Path(server.log_path).read_text())
            print(f"{phase}: tritonserver RSS per /dev/shm region {shm_rss_mb(pid)}; unloaded {unloaded}; "
                  f"retained_shm_mb {server.retained_shm_mb():.0f}", flush=True)

        show("start")
        report = run_soak(server.endpoints.http, soak_seconds=30, concurrency=8, bad_fraction=0.2, warmup_seconds=3,
                          good_images=[synthetic_image()], server_pgid=pid, kill_stubs=[("preprocess", 10)],
                          heal=server.heal, oversize_interval_s=5)
        show(f"after the load (preprocess stub killed at {report.faults[0]['t_s']} s, "
             f"recovered in {report.faults[0]['recovery_s']} s)")
        time.sleep(20)
        show("after 20 s idle")
        server.kill_stubs("preprocess")
        while server.missing_stubs():
            server.heal()
            time.sleep(0.5)
        time.sleep(10)
        show("10 s after an idle kill and reload of the new preprocess stub")
    return 0


if __name__ == "__main__":
    sys.exit(main())
