"""``python -m sdconet.serve --repo DIR``: run Triton on a built repository until Ctrl-C / SIGTERM.

While it serves, a watch runs about once a second: a python model whose backend stub died, hangs or is unhealthy is
reloaded (``TritonServer.heal``, :mod:`sdconet.serve.healing`) within its reload budget, with exponential backoff;
when the budget is used up, a reload fails, or tritonserver itself exits, the server is restarted on the same ports
(at most ``--max-restarts`` times), after which the launcher stops with one error line and exit code 1.

The repository API (load/unload, which explicit model control opens) answers only requests carrying the admin key:
generated per launch and kept in memory, or read from / written to ``--admin-key-file`` (mode 0600) for an operator
who needs it. Restarted servers keep the key. A model its holder unloads is left unloaded, not healed.

The server dies with the launcher: a SIGKILLed launcher's tritonserver gets SIGTERM from the kernel and shuts down
(``sdconet.serve.server``, PDEATHSIG). A port held by a *stale* server (a tritonserver whose launcher is gone, e.g.
one left by an older launcher) is refused naming its pid, or stopped first with ``--replace-stale``. A port 0 is
picked free; a port taken by another process is retried ``BIND_ATTEMPTS`` times, ``BIND_RETRY_WAIT_S`` apart. The
/dev/shm regions that SIGKILLed servers left are removed at start (``remove_stale_shm_regions``).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from sdconet.serve.healing import HealPolicy, RestartNeeded
from sdconet.serve.triton_repo import BACKENDS, RepositoryError, load_manifest
from sdconet.serve.server import (ADMIN_KEY_HEADER, DEFAULT_HOST, DEFAULT_PORTS, PortInUseError, ServerError,
                                  TritonServer, admin_key_from_file, remove_stale_shm_regions, stop_stale_server)
from sdconet.utils.logging import get_logger, setup_logging

log = get_logger("sdconet.serve")

BIND_ATTEMPTS = 3  # starts on a port another process holds, before giving up
BIND_RETRY_WAIT_S = 1.0


class _Stop(Exception):
    """Raised from the signal handler to leave the wait loop."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sdconet.serve",
        description="Start Triton Inference Server on a repository built by export/build_engine.py --triton-repo "
                    "(tritonserver on PATH, else the one bundled with nvidia-pytriton), wait until it is ready, "
                    "print the endpoints and serve until Ctrl-C or SIGTERM.")
    parser.add_argument("--repo", type=Path, required=True, help="model repository directory")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="deployment the repository must hold (default: whatever it was built for)")
    parser.add_argument("--host", default=DEFAULT_HOST, help="bind address of all endpoints (default %(default)s; "
                                                             "0.0.0.0 exposes the server to the network)")
    parser.add_argument("--http-port", type=int, default=DEFAULT_PORTS["http"],
                        help="(default %(default)s; 0 = a free port, printed when ready, kept across restarts)")
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_PORTS["grpc"])
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_PORTS["metrics"])
    parser.add_argument("--replace-stale", action="store_true",
                        help="stop a stale tritonserver (one whose launcher is gone) holding one of the ports, "
                             "instead of refusing to start")
    parser.add_argument("--tritonserver", type=Path, default=None, help="tritonserver binary to run")
    parser.add_argument("--log-file", type=Path, default=None,
                        help="server log (default: a temporary file); restart k writes <stem>.restart<k><suffix>")
    parser.add_argument("--log-verbose", type=int, default=0, help="Triton's --log-verbose level")
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for readiness")
    parser.add_argument("--json", action="store_true", help="print the endpoints as one JSON line")
    parser.add_argument("--max-restarts", type=int, default=3,
                        help="restart the server this many times when it exits unexpectedly, a model cannot be "
                             "reloaded or used up its reload budget (default %(default)s; 0 = exit with code 1 "
                             "instead)")
    defaults = HealPolicy()
    parser.add_argument("--reload-budget", type=int, default=defaults.reload_budget,
                        help="reloads of one model (dead, hung or unhealthy stub) before the server is restarted "
                             "instead (default %(default)s)")
    parser.add_argument("--reload-backoff", type=float, default=defaults.backoff_s,
                        help="seconds between a model's first and second reload, doubling for each further one "
                             "(default %(default)s)")
    parser.add_argument("--canary-interval", type=float, default=defaults.canary_interval_s,
                        help="seconds between canary requests to python models that served nothing meanwhile "
                             "(default %(default)s; 0 = count stub processes only)")
    parser.add_argument("--canary-timeout", type=float, default=defaults.canary_timeout_s,
                        help="a canary unanswered this long, with no execution completed meanwhile, means a hung "
                             "stub; must exceed the longest execution of one model (default %(default)s)")
    parser.add_argument("--max-retained-shm-mb", type=float, default=defaults.max_retained_shm_mb,
                        help="restart the server when it keeps more than this many MB of shared memory of replaced "
                             "model instances (stubs that died under load; docs/serving.md, Memory) (default "
                             "%(default)s; 0 = never)")
    parser.add_argument("--admin-key-file", type=Path, default=None,
                        help="the key of the repository API (load/unload): read from this file (mode 0600), or "
                             "generated and written there when it does not exist; default a key kept in memory")
    args = parser.parse_args(argv)
    setup_logging()

    try:
        manifest = load_manifest(args.repo)
    except RepositoryError as err:
        parser.error(str(err))
    if args.backend is not None and args.backend != manifest["backend"]:
        parser.error(f"{args.repo} was built for backend '{manifest['backend']}', not '{args.backend}'; rebuild it "
                     f"for '{args.backend}' (export/build_engine.py --triton-repo, or "
                     f"sdconet.serve.triton_repo.build_repository)")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding to %s: inference, health, metadata, model config and statistics are open to every "
                    "machine that reaches the ports, unencrypted; only the repository API needs the admin key. "
                    "Put a TLS proxy or firewall in front (docs/serving.md, Security)", args.host)
    try:
        policy = HealPolicy(reload_budget=args.reload_budget, backoff_s=args.reload_backoff,
                            canary_interval_s=args.canary_interval, canary_timeout_s=args.canary_timeout,
                            max_retained_shm_mb=args.max_retained_shm_mb)
    except ValueError as err:
        parser.error(str(err))
    try:
        admin_key = admin_key_from_file(args.admin_key_file) if args.admin_key_file is not None else None
    except ServerError as err:
        parser.error(str(err))

    def on_signal(signum, frame):
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not interrupt the shutdown
            signal.signal(sig, signal.SIG_IGN)
        raise _Stop(signal.Signals(signum).name)

    for flag in ("http_port", "grpc_port", "metrics_port"):
        if not 0 <= getattr(args, flag) <= 65535:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: a port is 0 (a free one) .. 65535")
    removed = remove_stale_shm_regions()
    if removed:
        log.info("removed %d shared-memory region(s) of killed servers from /dev/shm", removed)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    server: Optional[TritonServer] = None
    try:
        started = time.monotonic()
        server = _start_server(args, (args.http_port, args.grpc_port, args.metrics_port), args.log_file,
                               admin_key, policy)
        admin_key = server.admin_key  # generated by the first server when not given: restarts keep it
        e = server.endpoints
        info = {"http": e.http, "grpc": e.grpc, "metrics": e.metrics, "model": manifest["ensemble"],
                "backend": manifest["backend"], "models": manifest["models"], "pid": server.process.pid,
                "log": str(server.log_path),
                "admin_key_file": None if args.admin_key_file is None else str(args.admin_key_file.absolute())}
        if args.json:
            print(json.dumps(info), flush=True)
        else:
            print(f"SDCoNet Triton server ready in {time.monotonic() - started:.1f} s "
                  f"(backend {manifest['backend']}, models {', '.join(manifest['models'])})\n"
                  f"  HTTP     {e.http}\n  gRPC     {e.grpc}\n  metrics  {e.metrics}\n"
                  f"  log      {server.log_path}\n"
                  f"  admin    repository API needs header {ADMIN_KEY_HEADER}: "
                  f"{args.admin_key_file or 'key kept in memory (--admin-key-file to keep it)'}\n"
                  f"Try: python -m sdconet.client IMAGE --url {e.http}\nCtrl-C to stop.", flush=True)
        restarts = 0
        while True:
            reason = _watch(server)
            if restarts >= args.max_restarts:
                log.error("giving up: %s; not restarting (--max-restarts %d reached): the server is stopped and "
                          "the launcher exits with code 1", reason, args.max_restarts)
                server.stop()
                return 1
            restarts += 1
            log.error("%s; restarting the server (restart %d of at most %d)", reason, restarts, args.max_restarts)
            server.stop()
            # a restarted server writes a log of its own: reopening --log-file would truncate the crashed one's
            log_file = None if args.log_file is None else args.log_file.with_name(
                f"{args.log_file.stem}.restart{restarts}{args.log_file.suffix}")
            e = server.endpoints  # the same ports, also those picked for port 0: clients keep their URLs
            started = time.monotonic()
            server = _start_server(args, (e.http_port, e.grpc_port, e.metrics_port), log_file, admin_key, policy)
            log.warning("server restarted and ready in %.1f s (pid %d)", time.monotonic() - started,
                        server.process.pid)
            log.warning("the restarted server logs to %s", server.log_path)
    except _Stop as stop:
        log.info("%s received: stopping the server", stop)
        code = server.stop() if server is not None else None
        log.info("server stopped (exit code %s)", code)
        return 0
    except ServerError as err:
        log.error("%s", err)
        if server is not None:
            server.stop()
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _start_server(args: argparse.Namespace, ports: tuple[int, int, int], log_file: Optional[Path],
                  admin_key: Optional[str], policy: HealPolicy) -> TritonServer:
    """A started, ready server on ``ports`` (http, grpc, metrics; 0 = picked free). A stale server on a port is
    stopped with ``--replace-stale`` and refused otherwise; another holder of a port is waited for
    ``BIND_ATTEMPTS`` times. Raises ServerError (PortInUseError naming the port and its holder) on failure."""
    attempt = 0
    while True:
        attempt += 1
        server = TritonServer(args.repo, host=args.host, http_port=ports[0], grpc_port=ports[1],
                              metrics_port=ports[2], binary=args.tritonserver, log_file=log_file,
                              log_verbose=args.log_verbose, admin_key=admin_key, heal_policy=policy)
        try:
            server.start()
            server.wait_ready(args.startup_timeout)
            return server
        except PortInUseError as err:
            server.stop()
            stale = [holder for holder in err.holders if holder.stale]
            if stale and args.replace_stale and attempt <= BIND_ATTEMPTS:
                for holder in stale:
                    stop_stale_server(holder)
                continue
            if stale or attempt >= BIND_ATTEMPTS:
                raise
            log.warning("%s; trying again in %.0f s (attempt %d of %d)", err, BIND_RETRY_WAIT_S, attempt + 1,
                        BIND_ATTEMPTS)
            time.sleep(BIND_RETRY_WAIT_S)
        except BaseException:  # a failed start or Ctrl-C while starting: leave nothing running
            server.stop()
            raise


def _watch(server: TritonServer) -> str:
    """Serve until something needs a restart; heal dead and stuck stubs on the way. Returns why a restart is
    needed."""
    while True:
        if server.process.poll() is not None:
            return (f"tritonserver exited unexpectedly with code {server.process.returncode}; log tail:\n"
                    f"{server.log_tail()}")
        try:
            server.heal()
        except RestartNeeded as err:  # a reload budget used up, or too much memory kept by replaced instances
            return str(err)
        except ServerError as err:
            return f"a crashed model could not be reloaded in-process ({err})"
        time.sleep(1.0)


if __name__ == "__main__":
    sys.exit(main())
