"""Launch and stop a Triton Inference Server for a built repository.

``TritonServer`` runs the ``tritonserver`` on PATH (NVIDIA's container) or, failing that, the binary bundled in the
``nvidia-pytriton`` wheel. The bundled server needs three things, all handled here (see DESIGN §5):

1. a backend directory whose ``python/`` holds ``libtriton_python.so`` and the python backend stub built for the
   Python version of the models' execution environment;
2. ``LD_LIBRARY_PATH`` with ``nvidia_pytriton.libs`` and that Python's ``lib`` directory (``libpython3.X.so``);
3. ``EXECUTION_ENV_PATH`` in the python models' configs, pointing at an environment with numpy < 2 — written by the
   repository builder and re-checked here before start.

The server runs in its own process group on loopback by default; ``stop()`` sends SIGTERM (Triton drains in-flight
requests), escalates to SIGKILL on the group after a timeout, and returns only when no process of the group is left.

A server never outlives the process that started it (Linux): it is started with ``PR_SET_PDEATHSIG`` = SIGTERM, so a
SIGKILLed launcher's server shuts down as on Ctrl-C (Triton drains for ``exit_timeout_s``, then its stubs go with it).
The kernel sends that signal when the *thread* that forked the server exits, so a server started from any thread but
the main one is forked by one long-lived spawner thread. Each server carries ``SDCONET_LAUNCHER_PID`` in its
environment; a port held by a ``tritonserver`` whose launcher is gone is reported as a *stale server*
(:func:`port_holders`, :func:`stop_stale_server`), e.g. one left by a launcher from before this protection.

Ports: 0 means "pick a free one" (:func:`free_ports`, all distinct). A picked port can still be taken by another
process before Triton binds it; Triton then exits with "address already in use", and :meth:`TritonServer.wait_ready`
starts it again on freshly picked ports (``PORT_RETRIES`` times). A port given explicitly is never changed: a bind
failure on it raises :class:`PortInUseError` naming the port and what holds it.

Crashed python backend stubs: Triton 2.51 does not restart a stub that died (the model stays READY while every request
fails with "Stub process '<model>_0_0' is not healthy"). The server therefore runs in explicit model-control mode
(every model loaded at start), and :meth:`TritonServer.heal` -- called about once a second by the launcher's watch --
reloads a model whose stubs died or hang, within a reload budget (:mod:`sdconet.serve.healing`).

The repository API that explicit mode opens (load with config *and file* overrides, i.e. code execution through a
python model; unload, i.e. denial of service) is restricted, with the shared-memory, trace and logging APIs, to
requests carrying the server's admin key (``--http-restricted-api`` / ``--grpc-restricted-protocol``): a key of 32
random bytes the server generates unless given, sent as header :data:`ADMIN_KEY_HEADER` (HTTP) or
:data:`GRPC_ADMIN_KEY_HEADER` (gRPC metadata). Inference, health, metadata, model config and statistics stay open.
tritonserver reads the key from its command line only, so local users who may read ``/proc/<pid>/cmdline`` see it;
the launcher never logs it.
"""
from __future__ import annotations

import ctypes
import dataclasses
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, TypeVar

from sdconet.runtime.triton_client import DEFAULT_PORTS
from sdconet.serve.healing import UNHEALTHY_MARKER, CanaryResult, Healer, HealPolicy, canary_request
from sdconet.serve.python_env import inspect_python_env
from sdconet.utils.logging import get_logger
from sdconet.utils.process import pid_alive

log = get_logger(__name__)

DEFAULT_HOST = "127.0.0.1"
# the only backend the nvidia-pytriton server carries
BUNDLED_BACKENDS = ("python",)
# environment variable every started server carries: the pid of the process that started it (stale-server check)
LAUNCHER_PID_ENV = "SDCONET_LAUNCHER_PID"
PORT_RETRIES = 3  # fresh-port attempts after a bind failure on picked (port 0) ports
# the admin key's header; Triton's gRPC endpoint expects its own prefix on the metadata key (measured on 2.51)
ADMIN_KEY_HEADER = "sdconet-admin-key"
GRPC_ADMIN_KEY_HEADER = f"triton-grpc-protocol-{ADMIN_KEY_HEADER}"
# the APIs only the admin key may call: model load/unload/index, shared-memory registration (maps /dev/shm regions
# into the server), trace and log settings (write files)
RESTRICTED_APIS = ("model-repository", "shared-memory", "trace", "logging")
# what a key may hold: it goes into a tritonserver flag whose syntax is "<apis>:<key>=<value>"
_ADMIN_KEY_CHARS = re.compile(r"^[A-Za-z0-9_\-.~]{16,256}$")
# what Triton logs when it cannot bind an endpoint (its own message, and the OS's from gRPC / civetweb)
_BIND_FAILURE = re.compile(r"already in use|address in use|failed to bind|could not bind|bind failed",
                           re.IGNORECASE)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class ServerError(RuntimeError):
    """The server could not be started or stopped; the message carries the reason and the log tail."""


class ServerUnavailable(ServerError):
    """This machine cannot run a tritonserver at all (none installed, no stub for this Python, no shared libpython)."""


class PortInUseError(ServerError):
    """An endpoint's port is taken: ``port`` and ``holders`` (:class:`PortHolder`, maybe none) say which, by what."""

    def __init__(self, message: str, port: int, holders: "list[PortHolder]"):
        super().__init__(message)
        self.port = port
        self.holders = holders


@dataclass(frozen=True)
class Endpoints:
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int

    @property
    def http(self) -> str:
        """``host:port`` as tritonclient.http expects it."""
        return f"{self._client_host}:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def metrics(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def _client_host(self) -> str:
        # a server bound to all interfaces is reached locally through loopback
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host


def bundled_tritonserver() -> Optional[Path]:
    """The ``tritonserver`` binary shipped in the ``nvidia-pytriton`` wheel, if installed."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(list(spec.submodule_search_locations)[0]) / "tritonserver" / "bin" / "tritonserver"
    return binary if binary.is_file() else None


def find_tritonserver() -> tuple[Path, bool]:
    """(binary, is_bundled): ``tritonserver`` on PATH first, else the nvidia-pytriton one."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path), False
    bundled = bundled_tritonserver()
    if bundled is None:
        raise ServerUnavailable("no tritonserver found: not on PATH and nvidia-pytriton is not installed "
                          "(pip install 'sdconet[serving]', or use NVIDIA's Triton container)")
    return bundled, True


def port_is_free(host: str, port: int) -> bool:
    """Nothing listens on ``host:port``. Connections of a server that just died linger in TIME_WAIT; Triton binds
    with SO_REUSEADDR and so does this probe, or a restart on the same ports would be refused for a minute."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int, host: str = DEFAULT_HOST) -> list[int]:
    """``count`` distinct ports the OS reports free on ``host`` right now.

    Every probe socket stays bound until all are picked: closing each one before asking for the next would let the
    OS hand the same port out twice. Another process may still take a port before the server binds it (the server
    retries with new ports, see the module docstring)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port(host: str = DEFAULT_HOST) -> int:
    """One port the OS reports free on ``host`` right now; for several, :func:`free_ports` (distinct)."""
    return free_ports(1, host)[0]


@dataclass(frozen=True)
class PortHolder:
    """A process listening on a port: its pid, label (:func:`process_label`), and for a tritonserver the pid of the
    launcher that started it (None when unknown) and whether that launcher is gone (a stale server)."""

    pid: int
    label: str
    launcher_pid: Optional[int] = None
    stale: bool = False
    repo: Optional[str] = None

    def describe(self) -> str:
        if self.label != "tritonserver":
            return f"{self.label} (pid {self.pid})"
        what = f"tritonserver (pid {self.pid}{f', repository {self.repo}' if self.repo else ''})"
        if self.stale:
            return f"a stale {what} whose launcher (pid {self.launcher_pid}) is gone"
        if self.launcher_pid is not None:
            return f"{what} of the running launcher pid {self.launcher_pid}"
        return what


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on TCP ``port`` on any address (/proc/net/tcp and tcp6; state 0A = LISTEN)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def _launcher_of(pid: int) -> Optional[int]:
    """The launcher pid a tritonserver carries in its environment, else the one in the shared-memory prefix that
    older launchers passed (``shm-region-prefix-name=sdconet<pid>_``); None when neither is readable."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(LAUNCHER_PID_ENV.encode() + b"="):
            value = item.split(b"=", 1)[1]
            return int(value) if value.isdigit() else None
    for arg in argv:
        match = re.search(rb"shm-region-prefix-name=sdconet(\d+)_", arg)
        if match:
            return int(match.group(1))
    return None


def _parent_pid(pid: int) -> Optional[int]:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def _readlink(path: Path) -> Optional[str]:
    try:
        return os.readlink(path)
    except OSError:  # closed meanwhile (e.g. the listing's own descriptor)
        return None


def port_holders(port: int) -> list[PortHolder]:
    """The processes listening on TCP ``port`` that this user may inspect (others' sockets are not visible in
    their /proc/PID/fd). A tritonserver is *stale* when the launcher it records is no longer its parent: that
    launcher died (e.g. SIGKILL) and nothing will stop, heal or restart the server."""
    inodes = _listening_inodes(port)
    if not inodes:
        return []
    targets = {f"socket:[{inode}]" for inode in inodes}
    holders = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:  # gone, or another user's process
            continue
        if not any(_readlink(fd) in targets for fd in fds):
            continue
        pid = int(entry.name)
        label = process_label(pid)
        if label != "tritonserver":
            holders.append(PortHolder(pid, label))
            continue
        launcher = _launcher_of(pid)
        repo = None
        try:
            for arg in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0"):
                if arg.startswith("--model-repository="):
                    repo = arg.split("=", 1)[1]
        except OSError:
            pass
        # stale = its launcher is gone; a live launcher whose server is a grandchild (a --tritonserver wrapper
        # script that forks) is not
        stale = launcher is not None and _parent_pid(pid) != launcher and not pid_alive(launcher)
        holders.append(PortHolder(pid, label, launcher, stale, repo))
    return holders


def stop_stale_server(holder: PortHolder, timeout_s: float = 30.0) -> None:
    """SIGTERM a stale server's process group (Triton drains and exits), SIGKILL it after ``timeout_s``; returns
    once none of its processes is left. Refuses anything but a stale tritonserver."""
    if not holder.stale or holder.label != "tritonserver":
        raise ServerError(f"refusing to stop {holder.describe()}: not a stale tritonserver of this project")
    log.warning("stopping %s", holder.describe())
    try:
        if os.getpgid(holder.pid) != holder.pid:  # not a group leader (started by something else): the process only
            os.kill(holder.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while pid_alive(holder.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if pid_alive(holder.pid):
                os.kill(holder.pid, signal.SIGKILL)
            return
        os.killpg(holder.pid, signal.SIGTERM)  # the server leads its own process group (start_new_session)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while process_group_members(holder.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if process_group_members(holder.pid):
        log.warning("the stale server (pid %d) did not exit %.0f s after SIGTERM; killing its process group",
                    holder.pid, timeout_s)
        try:
            os.killpg(holder.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        while process_group_members(holder.pid) and time.monotonic() < deadline + 10:
            time.sleep(0.1)


def port_in_use_error(name: str, host: str, port: int, when: str = "is in use") -> PortInUseError:
    """PortInUseError for endpoint ``name`` naming what holds the port and what to do."""
    holders = port_holders(port)
    held = f" by {', '.join(h.describe() for h in holders)}" if holders else ""
    advice = f"pass another --{name}-port (0 = a free one)"
    stale = [h for h in holders if h.stale]
    if stale:
        advice = (f"stop it (kill -TERM -- -{stale[0].pid}), rerun python -m sdconet.serve with --replace-stale, "
                  f"or {advice}")
    return PortInUseError(f"{name} port {port} on {host} {when}{held}; {advice}", port, holders)


SHM_DIR = Path("/dev/shm")
# the python backend's shared-memory regions of our servers: "sdconet<launcher pid>_<scratch tag>_<uuid>"
_SHM_REGION = re.compile(r"^(sdconet(\d+)_.{8}_)")


def remove_stale_shm_regions(shm_dir: Path = SHM_DIR) -> int:
    """Delete the shared-memory regions (``shm_dir``, i.e. /dev/shm) of servers that were SIGKILLed: a stopped or
    SIGTERMed server removes its own, a killed one leaves tens of MB of RAM behind. A region goes when the launcher
    pid in its name is gone and no live process names its prefix on its command line (a stale server or its stubs
    still use it). Returns how many were removed."""
    try:
        names = [path.name for path in shm_dir.iterdir()]
    except OSError:
        return 0
    prefixes = {}
    for name in names:
        match = _SHM_REGION.match(name)
        if match and not pid_alive(int(match.group(2))):
            prefixes.setdefault(match.group(1), []).append(name)
    if not prefixes:
        return 0
    for entry in Path("/proc").iterdir():  # a region a live process names is in use, whoever launched it
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            for prefix in [prefix for prefix in prefixes if prefix in cmdline]:
                del prefixes[prefix]
    removed = 0
    for name in (name for group in prefixes.values() for name in group):
        try:
            (shm_dir / name).unlink()
            removed += 1
        except OSError:  # another user's, or removed meanwhile
            pass
    return removed


_T = TypeVar("_T")
_spawner: Optional[ThreadPoolExecutor] = None
_spawner_lock = threading.Lock()


def _from_long_lived_thread(start: Callable[[], _T]) -> _T:
    """Run ``start`` (which forks the server) in the main thread or in one spawner thread that lives as long as
    the process: PDEATHSIG fires when the forking thread exits, which must not be a short-lived worker thread."""
    global _spawner
    if threading.current_thread() is threading.main_thread():
        return start()
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdconet-triton-spawner")
    return _spawner.submit(start).result()


def _die_with_parent_hook() -> Optional[Callable[[], None]]:
    """A ``preexec_fn`` asking the kernel to SIGTERM the child when the forking thread exits (Linux; None
    elsewhere). Resolved here in the parent, so the child only makes the call; the parent pid is checked after it,
    since a parent that died before the prctl would never signal."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)  # a failure only loses the protection
        if os.getppid() != parent:
            os._exit(70)  # the launcher died before the prctl: do not start an orphan

    return hook


def _python_env_paths(repo: Path) -> set[str]:
    """EXECUTION_ENV_PATH values of the python models in ``repo``."""
    from sdconet.serve.triton_repo import parse_model_config

    paths = set()
    for config_path in sorted(repo.glob("*/config.pbtxt")):
        config = parse_model_config(config_path)
        if config.backend == "python" and "EXECUTION_ENV_PATH" in config.parameters:
            paths.add(config.parameters["EXECUTION_ENV_PATH"].string_value)
    return paths


def tensorrt_plugin_args(repo: Path) -> list[str]:
    """``--backend-config=tensorrt,plugins=a.so;b.so`` for the plugin libraries the repository's manifest lists
    (engines built with ``--plugin-lib``); the tensorrt_plan backend loads them before deserializing the engine."""
    from sdconet.serve.triton_repo import MANIFEST_NAME

    manifest_path = repo / MANIFEST_NAME
    if not manifest_path.is_file():
        return []
    libs = json.loads(manifest_path.read_text()).get("plugin_libs") or []
    for lib in libs:
        if not Path(lib).is_file():  # the repository may have been built on another machine or outside a container
            log.warning("plugin library %s (listed in %s) is not on this machine; the TensorRT engine will fail to "
                        "load unless the server sees it at that path", lib, manifest_path)
    return [f"--backend-config=tensorrt,plugins={';'.join(libs)}"] if libs else []


def process_group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid`` (Linux /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # fields after the parenthesised command: state ppid pgrp ...
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def process_label(pid: int) -> str:
    """``tritonserver``, ``stub:<model>`` for a python backend stub (its first argument is the model's
    ``<model>/<version>/model.py``), or the executable's name."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    name = Path(argv[0].decode(errors="replace")).name
    if name == "triton_python_backend_stub" and len(argv) > 1:
        return f"stub:{Path(argv[1].decode(errors='replace')).parents[1].name}"
    return name


def shm_mappings(pid: int) -> set[str]:
    """Names of the ``/dev/shm`` files that process ``pid`` maps (empty when it is gone)."""
    names = set()
    try:
        text = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return names
    for line in text.splitlines():
        parts = line.split(None, 5)  # address perms offset dev inode [path]
        if len(parts) == 6 and parts[5].startswith("/dev/shm/"):
            names.add(parts[5][len("/dev/shm/"):].removesuffix(" (deleted)"))
    return names


def retained_shm_bytes(server_pid: int, stub_pids_: list[int]) -> dict[str, int]:
    """``/dev/shm`` files mapped by ``server_pid`` but by none of ``stub_pids_`` -> bytes they hold (tmpfs blocks).
    For tritonserver and its live python backend stubs: the pools of model instances that Triton replaced but
    never released (each instance's stub maps its own pool)."""
    held = set().union(*(shm_mappings(pid) for pid in stub_pids_)) if stub_pids_ else set()
    retained = {}
    for name in sorted(shm_mappings(server_pid) - held):
        try:
            retained[name] = os.stat(f"/dev/shm/{name}").st_blocks * 512
        except OSError:
            continue  # unlinked meanwhile
    return retained


def stub_pids(pgid: int, model: str) -> list[int]:
    """Live python backend stub processes of ``model`` in the server's process group ``pgid``."""
    return [pid for pid in process_group_members(pgid) if process_label(pid) == f"stub:{model}"]


def expected_stubs(repo: Path) -> dict[str, int]:
    """Python models of ``repo`` -> how many backend stubs they run (one per model instance)."""
    from sdconet.serve.triton_repo import parse_model_config

    counts = {}
    for config_path in sorted(repo.glob("*/config.pbtxt")):
        config = parse_model_config(config_path)
        if config.backend == "python":
            counts[config.name] = sum(group.count or 1 for group in config.instance_group) or 1
    return counts


def check_admin_key(key: str) -> str:
    """``key`` when it can serve as the admin key (16..256 characters of ``A-Z a-z 0-9 _ - . ~``), else ValueError."""
    if not _ADMIN_KEY_CHARS.match(key):
        raise ValueError(f"an admin key must be 16..256 characters of A-Z a-z 0-9 _ - . ~ (got {len(key)} "
                         f"characters{'' if key.isascii() else ', not all ASCII'})")
    return key


def admin_key_from_file(path: str | Path) -> str:
    """The admin key in ``path``, or a new one written there (mode 0600) when the file does not exist.

    An existing file must be readable by its owner only: a key others can read protects nothing. Raises ServerError
    naming the file."""
    path = Path(path)
    if path.exists():
        mode = path.stat().st_mode
        if mode & 0o077:
            raise ServerError(f"admin key file {path} is readable by others (mode {mode & 0o777:o}); "
                              f"chmod 600 {path}")
        try:
            return check_admin_key(path.read_text().strip())
        except ValueError as err:
            raise ServerError(f"admin key file {path}: {err}") from err
    key = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # O_EXCL: never through a planted link
    except OSError as err:
        raise ServerError(f"cannot create admin key file {path}: {err}") from err
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key


class TritonServer:
    """A ``tritonserver`` process serving ``repo`` (context manager: start on enter, stop on exit).

    Args:
        repo: a repository written by :func:`sdconet.serve.triton_repo.build_repository`.
        host: address the HTTP, gRPC and metrics endpoints bind to (loopback by default).
        http_port, grpc_port, metrics_port: Triton's defaults 8000/8001/8002 unless given; 0 = a free port picked at
            start (all distinct; picked again when another process takes one first). ``endpoints`` has the ports
            in use once started.
        binary: a ``tritonserver`` to run; default :func:`find_tritonserver`.
        log_file: where the server's output goes; default a file in the server's scratch directory.
        log_verbose: Triton's ``--log-verbose`` level.
        exit_timeout_s: how long Triton may drain in-flight requests on SIGTERM before it is killed.
        admin_key: the key the restricted APIs (:data:`RESTRICTED_APIS`) require; default a fresh random one
            (:attr:`admin_key`). Give the same key to a restarted server so its key holders keep access.
        heal_policy: reload budget, backoff and canary settings of :meth:`heal`.
    """

    def __init__(self, repo: str | Path, *, host: str = DEFAULT_HOST, http_port: int = DEFAULT_PORTS["http"],
                 grpc_port: int = DEFAULT_PORTS["grpc"], metrics_port: int = DEFAULT_PORTS["metrics"],
                 binary: str | Path | None = None, log_file: str | Path | None = None, log_verbose: int = 0,
                 exit_timeout_s: int = 10, admin_key: Optional[str] = None,
                 heal_policy: Optional[HealPolicy] = None):
        self.repo = Path(repo).absolute()
        if not self.repo.is_dir():
            raise ServerError(f"model repository {self.repo} does not exist")
        self.endpoints = Endpoints(host, http_port, grpc_port, metrics_port)
        # the endpoints whose port is picked at start (given as 0)
        self._auto_ports = tuple(name for name, port in (("http", http_port), ("grpc", grpc_port),
                                                         ("metrics", metrics_port)) if port == 0)
        if binary is not None:
            self.binary, self.bundled = Path(binary), False
        else:
            self.binary, self.bundled = find_tritonserver()
        self.log_verbose = log_verbose
        self.exit_timeout_s = exit_timeout_s
        self._expected_stubs = expected_stubs(self.repo)
        self._reloads = 0  # reload_model's marker
        self.admin_key = check_admin_key(admin_key) if admin_key is not None else secrets.token_urlsafe(32)
        self._healer = Healer(self, heal_policy or HealPolicy())
        self._canary_bodies: dict[str, bytes] = {}
        self._scratch: Optional[Path] = None
        self._shm_prefix: Optional[str] = None  # the python backend's region prefix of the bundled server
        self._log_file = Path(log_file) if log_file is not None else None
        self._default_log = log_file is None  # the log lives in the scratch directory of each start
        self._log_handle = None
        self.process: Optional[subprocess.Popen] = None

    # ---------------------------------------------------------------------------------------------------------------
    @property
    def log_path(self) -> Optional[Path]:
        return self._log_file

    def log_tail(self, lines: int = 40) -> str:
        if self._log_file is None or not self._log_file.is_file():
            return ""
        return "\n".join(self._log_file.read_text(errors="replace").splitlines()[-lines:])

    def _bundled_runtime(self) -> tuple[Path, str]:
        """(python backend stub, libpython directory) for the bundled server and this repository's python models.

        Raises ServerUnavailable when this machine cannot run the bundled server (no stub for the Python version, no
        shared libpython)."""
        env_paths = _python_env_paths(self.repo)
        infos = [inspect_python_env(path) for path in sorted(env_paths)]
        versions = {info.version for info in infos}
        if len(versions) > 1:
            raise ServerError(f"the python models use environments of different Python versions {sorted(versions)}; "
                              f"one server can load one python backend stub")
        if infos:
            version, libdir = infos[0].version, infos[0].libdir
        else:
            log.warning("no python model in %s sets EXECUTION_ENV_PATH: the stub will use the base interpreter of "
                        "%s, whose numpy must be < 2", self.repo, sys.executable)
            version = f"{sys.version_info[0]}.{sys.version_info[1]}"
            libdir = sysconfig.get_config_var("LIBDIR")
        if not libdir or not list(Path(libdir).glob(f"libpython{version}.so*")):
            raise ServerUnavailable(f"the python backend stub links libpython{version}.so, which is not in {libdir!r}: "
                                    f"use a Python built with --enable-shared (pyenv: "
                                    f"PYTHON_CONFIGURE_OPTS=--enable-shared)")
        stubs = self.binary.parents[1] / "python_backend_stubs"
        stub = stubs / version / "triton_python_backend_stub"
        if not stub.is_file():
            available = sorted(p.name for p in stubs.iterdir()) if stubs.is_dir() else []
            raise ServerUnavailable(f"nvidia-pytriton has no python backend stub for Python {version} "
                                    f"(has {available})")
        return stub, libdir

    def preflight(self) -> None:
        """Every check possible without starting: the server has the backends the repository needs and, for the
        bundled server, the python environment, stub and libpython are usable. Raises ServerError /
        ServerUnavailable."""
        self._check_backends()
        if self.bundled:
            self._bundled_runtime()

    def _prepare_bundled(self, env: dict[str, str]) -> list[str]:
        """Backend directory with the matching stub + library path for the bundled server -> extra arguments."""
        stub, libdir = self._bundled_runtime()
        dist = self.binary.parents[1]  # .../pytriton/tritonserver
        backend_dir = self._scratch / "backends" / "python"
        backend_dir.mkdir(parents=True)
        self._shm_prefix = f"sdconet{os.getpid()}_{self._scratch.name[-8:]}_"  # unique to this start
        for item in (dist / "backends" / "python").iterdir():
            if item.is_file():
                shutil.copy2(item, backend_dir / item.name)
        shutil.copy2(stub, backend_dir / "triton_python_backend_stub")
        libs = dist.parents[1] / "nvidia_pytriton.libs"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(libs), libdir, env.get("LD_LIBRARY_PATH", "")) if p)
        return [f"--backend-directory={self._scratch / 'backends'}",
                # a unique shared-memory prefix, so several servers on one machine never collide
                f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}"]

    def _check_backends(self) -> None:
        if not self.bundled:
            return
        from sdconet.serve.triton_repo import parse_model_config

        for config_path in sorted(self.repo.glob("*/config.pbtxt")):
            config = parse_model_config(config_path)
            if config.platform == "ensemble":
                continue
            kind = config.backend or config.platform
            if kind not in BUNDLED_BACKENDS:
                raise ServerError(f"model '{config.name}' needs the '{kind}' backend, which the tritonserver bundled "
                                  f"in nvidia-pytriton does not have (python only); serve backend 'cpu' here, or "
                                  f"run NVIDIA's Triton container (tritonserver on PATH) for 'trt'/'onnx'")

    def admin_headers(self, protocol: str = "http") -> dict[str, str]:
        """The header that unlocks the restricted APIs, for tritonclient's ``headers=`` (``http`` or ``grpc``)."""
        if protocol not in ("http", "grpc"):
            raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
        return {ADMIN_KEY_HEADER if protocol == "http" else GRPC_ADMIN_KEY_HEADER: self.admin_key}

    def command(self) -> list[str]:
        e = self.endpoints
        args = [str(self.binary), f"--model-repository={self.repo}",
                f"--http-address={e.host}", f"--http-port={e.http_port}",
                f"--grpc-address={e.host}", f"--grpc-port={e.grpc_port}",
                f"--metrics-address={e.host}", f"--metrics-port={e.metrics_port}",
                f"--exit-timeout-secs={self.exit_timeout_s}", f"--log-verbose={self.log_verbose}",
                "--strict-readiness=true", "--disable-auto-complete-config",
                # explicit control, everything loaded at start: lets heal() reload a model whose stub died
                "--model-control-mode=explicit", "--load-model=*",
                # ... which opens the repository API: only the admin key may load/unload (see the module docstring)
                f"--http-restricted-api={','.join(RESTRICTED_APIS)}:{ADMIN_KEY_HEADER}={self.admin_key}",
                f"--grpc-restricted-protocol={','.join(RESTRICTED_APIS)}:{ADMIN_KEY_HEADER}={self.admin_key}"]
        if self.bundled:
            args.append("--allow-gpu-metrics=false")  # CPU-only build: skip the NVML/DCGM probes
        args += tensorrt_plugin_args(self.repo)
        return args

    def _pick_ports(self) -> None:
        """Fresh distinct free ports for the endpoints given as 0 (none of them equal to a port given explicitly)."""
        if not self._auto_ports:
            return
        e = self.endpoints
        fixed = {getattr(e, f"{name}_port") for name in ("http", "grpc", "metrics") if name not in self._auto_ports}
        picked = [port for port in free_ports(len(self._auto_ports) + len(fixed), e.host) if port not in fixed]
        self.endpoints = dataclasses.replace(e, **{f"{name}_port": port
                                                   for name, port in zip(self._auto_ports, picked)})

    def start(self) -> "TritonServer":
        """Start the process (returns at once; call :meth:`wait_ready`). Raises PortInUseError when a port given
        explicitly is taken (naming what holds it)."""
        if self.process is not None:
            raise ServerError("server already started")
        self._check_backends()  # the bundled runtime is checked while it is prepared below
        for attempt in range(PORT_RETRIES + 1):
            self._pick_ports()
            e = self.endpoints
            taken = [(name, port) for name, port in (("http", e.http_port), ("grpc", e.grpc_port),
                                                     ("metrics", e.metrics_port)) if not port_is_free(e.host, port)]
            explicit = [(name, port) for name, port in taken if name not in self._auto_ports]
            if explicit:
                raise port_in_use_error(*explicit[0][:1], e.host, explicit[0][1])
            if not taken:
                break
            if attempt == PORT_RETRIES:  # picked ports taken again and again: something grabs every free port
                raise port_in_use_error(taken[0][0], e.host, taken[0][1], when="was taken right after it was picked")
        self._scratch = Path(tempfile.mkdtemp(prefix="sdconet-triton-"))
        env = dict(os.environ)
        env[LAUNCHER_PID_ENV] = str(os.getpid())  # lets a later launcher tell a stale server from a live one
        try:
            args = self.command()
            if self.bundled:
                args += self._prepare_bundled(env)
            if self._default_log:
                self._log_file = self._scratch / "tritonserver.log"
            self._log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log_handle = open(self._log_file, "w")
            log.info("starting %s", " ".join(args).replace(self.admin_key, "<admin key>"))
            # own session/process group: a terminal's Ctrl-C reaches us, and we shut the server down in order;
            # PDEATHSIG: it gets SIGTERM when we die without stopping it (SIGKILL, a crash)
            hook = _die_with_parent_hook()
            self.process = _from_long_lived_thread(lambda: subprocess.Popen(
                args, env=env, stdout=self._log_handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=hook))
        except BaseException:
            self._cleanup()
            raise
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.endpoints.http}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def bind_failure(self) -> Optional[str]:
        """The endpoint (``http``/``grpc``/``metrics``) whose port the exited server could not bind, from its log;
        ``"?"`` when the log reports a bind failure without naming the port, None when it reports none."""
        lines = [line for line in self.log_tail(200).splitlines() if _BIND_FAILURE.search(line)]
        if not lines:
            return None
        e = self.endpoints
        for name, port in (("http", e.http_port), ("grpc", e.grpc_port), ("metrics", e.metrics_port)):
            if any(re.search(rf":{port}\b", line) for line in lines):
                return name
        return "?"

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Block until ``/v2/health/ready`` answers 200; raise (and stop the server) if it exits or times out.

        A server that exits because another process took one of its picked (port 0) ports first is started again on
        new ports, at most ``PORT_RETRIES`` times; a bind failure on an explicit port raises PortInUseError."""
        if self.process is None:
            raise ServerError("server not started")
        deadline = time.monotonic() + timeout_s
        retries = 0
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                tail = self.log_tail()
                failed = self.bind_failure()
                e = self.endpoints
                self.stop()
                if failed is not None and self._auto_ports and (failed == "?" or failed in self._auto_ports) \
                        and retries < PORT_RETRIES:
                    retries += 1
                    log.warning("tritonserver could not bind %s (taken by another process after it was picked); "
                                "starting it again on new ports (retry %d of %d)",
                                "one of its picked ports" if failed == "?" else
                                f"its {failed} port {getattr(e, f'{failed}_port')}", retries, PORT_RETRIES)
                    self.process = None
                    if self._scratch is not None:  # the failed attempt's log was just reported above
                        shutil.rmtree(self._scratch, ignore_errors=True)
                    self.start()
                    continue
                if failed is not None and failed != "?":
                    raise port_in_use_error(failed, e.host, getattr(e, f"{failed}_port"),
                                            when="was taken before tritonserver could bind it")
                raise ServerError(f"tritonserver exited with code {code} before becoming ready; log "
                                  f"({self._log_file}):\n{tail}")
            if self.is_ready():
                if "failed to start Metrics service" in self.log_tail(200):  # Triton serves on without it
                    log.warning("tritonserver could not bind metrics port %d (%s); it serves without metrics",
                                self.endpoints.metrics_port, port_in_use_error(
                                    "metrics", self.endpoints.host, self.endpoints.metrics_port,
                                    when="was taken before tritonserver could bind it"))
                return
            time.sleep(0.25)
        tail = self.log_tail()
        self.stop()
        raise ServerError(f"tritonserver not ready after {timeout_s:.0f} s; log ({self._log_file}):\n{tail}")

    def stub_pids(self, model: str) -> list[int]:
        """Live python backend stub processes of ``model``."""
        return [] if self.process is None else stub_pids(self.process.pid, model)

    def retained_shm_mb(self) -> float:
        """MB of shared memory tritonserver maps that no live stub maps: python backend pools of replaced model
        instances that Triton never released (see :mod:`sdconet.serve.healing`)."""
        if self.process is None:
            return 0.0
        stubs = [pid for pid in process_group_members(self.process.pid) if process_label(pid).startswith("stub:")]
        return sum(retained_shm_bytes(self.process.pid, stubs).values()) / (1 << 20)

    def python_models(self) -> list[str]:
        """The repository's python models (the ones with backend stubs to heal)."""
        return sorted(self._expected_stubs)

    def missing_stubs(self) -> dict[str, tuple[int, int]]:
        """Python models with fewer live stubs than instances -> (expected, alive)."""
        if self.process is None:
            return {}
        alive: dict[str, int] = {}
        for pid in process_group_members(self.process.pid):
            label = process_label(pid)
            if label.startswith("stub:"):
                alive[label[5:]] = alive.get(label[5:], 0) + 1
        return {model: (count, alive.get(model, 0)) for model, count in self._expected_stubs.items()
                if alive.get(model, 0) < count}

    def _request(self, path: str, body: Optional[bytes] = None, *, admin: bool = False,
                 timeout_s: float = 30.0) -> bytes:
        """``GET`` (or ``POST`` ``body``) ``/v2/<path>`` -> the answer's body; the admin key goes along when
        ``admin``. Raises ServerError naming the call and Triton's error on an HTTP error; URLError / timeouts pass."""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if admin:
            headers.update(self.admin_headers("http"))
        request = urllib.request.Request(f"http://{self.endpoints.http}/v2/{path}", data=body, headers=headers,
                                         method="POST" if body is not None else "GET")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            raise ServerError(f"{request.method} /v2/{path} answered HTTP {err.code} "
                              f"{err.read().decode(errors='replace')}") from err

    def repository_index(self) -> list[dict]:
        """``POST /v2/repository/index`` (admin key): ``[{"name", "version", "state", "reason"?}, ...]``."""
        try:
            return json.loads(self._request("repository/index", b"{}", admin=True))
        except (urllib.error.URLError, OSError) as err:
            raise ServerError(f"reading the repository index failed: {err}") from err

    def model_statistics(self) -> dict:
        """``GET /v2/models/stats``: every model's inference statistics."""
        try:
            return json.loads(self._request("models/stats"))
        except (urllib.error.URLError, OSError) as err:
            raise ServerError(f"reading the model statistics failed: {err}") from err

    def canary(self, model: str, timeout_s: float) -> CanaryResult:
        """One small inference straight to ``model`` (:func:`~sdconet.serve.healing.canary_request`, built once from
        its config) -> ok / unhealthy / timeout / error (see :class:`~sdconet.serve.healing.CanaryResult`)."""
        try:
            if model not in self._canary_bodies:
                self._canary_bodies[model] = canary_request(json.loads(self._request(f"models/{model}/config")))
            self._request(f"models/{model}/infer", self._canary_bodies[model], timeout_s=timeout_s)
            return CanaryResult("ok")
        except ServerError as err:  # an error answer: from the model's code (it runs), or the backend's verdict
            text = str(err)
            return CanaryResult("unhealthy", text) if UNHEALTHY_MARKER in text else CanaryResult("ok", text)
        except (TimeoutError, socket.timeout) as err:
            return CanaryResult("timeout", str(err))
        except (urllib.error.URLError, OSError) as err:
            if isinstance(getattr(err, "reason", None), (TimeoutError, socket.timeout)):
                return CanaryResult("timeout", str(err))
            return CanaryResult("error", str(err))

    def kill_stubs(self, model: str, timeout_s: float = 10.0) -> list[int]:
        """SIGKILL ``model``'s backend stubs (a stuck stub holds its requests for ever; a reload alone leaves it);
        returns their pids once they are gone."""
        pids = self.stub_pids(model)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout_s
        while set(self.stub_pids(model)) & set(pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        return pids

    def reload_model(self, model: str, timeout_s: float = 120.0) -> None:
        """Reload ``model`` through the repository API (new instances, new stubs); raises ServerError on failure.

        A load of a loaded, unchanged model is a no-op, so the model's own config goes along as an override with
        one marker parameter changed (``sdconet_reload``, which no model reads): Triton then builds new instances
        and swaps them in without an unload gap. The load carries the admin key."""
        try:
            config = json.loads(self._request(f"models/{model}/config", timeout_s=timeout_s))
        except (ServerError, urllib.error.URLError, OSError) as err:
            raise ServerError(f"reading the config of model '{model}' failed: {err}") from err
        self._reloads += 1
        config.setdefault("parameters", {})["sdconet_reload"] = {"string_value": str(self._reloads)}
        body = json.dumps({"parameters": {"config": json.dumps(config)}}).encode()
        try:
            self._request(f"repository/models/{model}/load", body, admin=True, timeout_s=timeout_s)
        except ServerError as err:
            raise ServerError(f"reloading model '{model}' failed: {err}") from err
        except (urllib.error.URLError, OSError) as err:
            raise ServerError(f"reloading model '{model}' failed: {err}") from err

    def heal(self) -> list[str]:
        """Reload every READY python model whose backend stub died or hangs, within its reload budget; returns the
        models reloaded (logged as it goes). See :mod:`sdconet.serve.healing`.

        Raises :class:`~sdconet.serve.healing.RestartNeeded` (``ReloadBudgetExhausted`` when a model used up its
        budget, ``RetainedMemoryExceeded`` when replaced instances keep too much shared memory), ServerError
        when a reload fails: either way the caller restarts the server."""
        return self._healer.heal()

    def stop(self, timeout_s: Optional[float] = None) -> int | None:
        """SIGTERM, wait (``exit_timeout_s`` + 10 s by default), then SIGKILL the process group. Returns the exit
        code (None if never started). Afterwards no process of the server's group is alive."""
        if self.process is None:
            return None
        timeout_s = self.exit_timeout_s + 10 if timeout_s is None else timeout_s
        pgid = self.process.pid  # start_new_session: the server leads its own group
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not exit %.0f s after SIGTERM; killing its process group", timeout_s)
                os.killpg(pgid, signal.SIGKILL)
                self.process.wait()
        # python backend stubs are the server's children; make sure none outlives it
        deadline = time.monotonic() + 10
        while process_group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if process_group_members(pgid):
            log.warning("killing %d leftover process(es) of the server's group", len(process_group_members(pgid)))
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        code = self.process.returncode
        self._remove_shm_regions()
        self._cleanup(keep_log=code != 0)
        return code

    def _remove_shm_regions(self) -> None:
        """Unlink the python backend's ``/dev/shm`` regions of this start once its process group is gone. A server
        that exits cleanly removes them itself; a killed or crashed one leaves them, each as large as its pool
        grew (201 MB for the preprocess model at the default pixel limit), until the machine reboots."""
        if self._shm_prefix is None or (self.process is not None and process_group_members(self.process.pid)):
            return
        removed = 0
        for path in Path("/dev/shm").glob(self._shm_prefix + "*"):
            try:
                size = path.stat().st_blocks * 512
                path.unlink()
                removed += size
            except OSError:
                continue
        if removed:
            log.warning("removed %.0f MB of shared memory the stopped server left in /dev/shm (it did not exit "
                        "cleanly)", removed / (1 << 20))

    def _cleanup(self, keep_log: bool = True) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        if self._scratch is None:
            return
        if keep_log and self._log_file is not None and self._log_file.parent == self._scratch:
            # the default log lives in the scratch directory: keep it after a failure, drop the backend copies
            shutil.rmtree(self._scratch / "backends", ignore_errors=True)
        else:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def __enter__(self) -> "TritonServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
