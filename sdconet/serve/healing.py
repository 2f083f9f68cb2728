"""When a served python model is reloaded, and when the launcher gives up on it.

Triton 2.51 (the server bundled in nvidia-pytriton) heals no python backend stub by itself: a stub that died leaves
its model READY while every request fails, and a stub that is alive but stuck -- sleeping or deadlocked in
``execute`` (requests hang), or stopped (requests get ``Stub process '<model>_0_0' is not healthy``) -- is not
even visible in the process table. :class:`Healer` finds both, once per :meth:`Healer.heal` call (the launcher calls
it about once a second):

* **process count** (every call): a python model with fewer live stubs than instances needs a reload;
* **canary** (every ``canary_interval_s``): a python model that answered no request successfully since the last
  canary gets one small request built once from its config (:func:`canary_request`); no answer within
  ``canary_timeout_s`` while the model also completed no execution meanwhile means *hung*, an answer saying "is not
  healthy" means *unhealthy*. Any other answer, an error from the model's own code included, proves the stub runs.
  A hung or unhealthy model's stubs are SIGKILLed before the reload: a reload alone swaps in new instances but
  leaves the stuck stub, and the requests it holds, hanging for ever (measured).

Only models the repository index reports READY are healed: one that the admin-key holder unloaded (state
``UNAVAILABLE``, reason ``unloaded``), or that is loading, is left alone (logged once), so a deliberate unload never
turns into a reload or restart loop.

Each model has a reload budget (:class:`HealPolicy`): reload ``k`` waits ``backoff_s * 2**(k-2)`` after reload
``k-1`` (capped at ``max_backoff_s``); a model that needs more than ``reload_budget`` reloads raises
:class:`ReloadBudgetExhausted`, which the launcher answers with a full server restart (bounded by its
``--max-restarts``, after which it stops with one error line). A model that went ``budget_reset_s`` without needing
a reload gets its budget back.

A reload does not always free what the replaced instance held: when a stub dies while requests are in flight,
Triton 2.51 never releases the replaced model version (no "successfully unloaded" line in its log), so its python
backend shared-memory pool -- as large as the largest request that model ever received, 201 MB for the preprocess
model at the default 8192^2 limit -- stays mapped by tritonserver and in ``/dev/shm`` until the server exits
(measured; docs/serving.md, "Memory"). Once a model has been reloaded, each round therefore also asks the target how
much shared memory tritonserver maps that no live stub maps (``retained_shm_mb``; asked only while every stub is
alive, since a dead stub's own pool counts until its reload); it logs each new figure, and above
``max_retained_shm_mb`` raises :class:`RetainedMemoryExceeded`: only a restart frees that memory.

The healer talks to the server through :class:`HealTarget` (implemented by ``TritonServer``); its answers are parsed
here by :func:`index_states` and :func:`execution_counts` from the JSON Triton sends, so a test can stand in for the
server with the same answers.
"""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Protocol

from sdconet.utils.logging import get_logger

log = get_logger(__name__)

READY = "READY"
UNHEALTHY_MARKER = "is not healthy"  # the python backend's error for a stub that fails its health check
_TRITON_DTYPES = {"TYPE_BOOL": "BOOL", "TYPE_UINT8": "UINT8", "TYPE_UINT16": "UINT16", "TYPE_UINT32": "UINT32",
                  "TYPE_UINT64": "UINT64", "TYPE_INT8": "INT8", "TYPE_INT16": "INT16", "TYPE_INT32": "INT32",
                  "TYPE_INT64": "INT64", "TYPE_FP16": "FP16", "TYPE_FP32": "FP32", "TYPE_FP64": "FP64",
                  "TYPE_STRING": "BYTES", "TYPE_BF16": "BF16"}


@dataclass(frozen=True)
class HealPolicy:
    """How hard to try before escalating (see the module docstring).

    Args:
        reload_budget: reloads one model may get before the server is restarted instead.
        backoff_s: wait between the first and the second reload of a model; doubles for each further one.
        max_backoff_s: longest wait between two reloads.
        budget_reset_s: a model whose last reload is this long ago gets its full budget back.
        canary_interval_s: seconds between canary rounds; 0 turns the canary off (process count only).
        canary_timeout_s: how long a canary may wait for its answer. Must exceed the longest legitimate execution of
            one model (a hung verdict also needs "no execution completed meanwhile", so a busy model is not hung).
        max_retained_shm_mb: shared memory of replaced instances that tritonserver may keep before the server is
            restarted (see the module docstring); 0 turns the check off. The default lets one preprocess pool at the
            default pixel limit (201 MB) stay, logged, and restarts on the second.
        retained_check_delay_s: the check waits this long after the last reload (an instance that Triton does
            release takes a moment to go).
    """

    reload_budget: int = 3
    backoff_s: float = 2.0
    max_backoff_s: float = 60.0
    budget_reset_s: float = 300.0
    canary_interval_s: float = 5.0
    canary_timeout_s: float = 10.0
    max_retained_shm_mb: float = 256.0
    retained_check_delay_s: float = 5.0

    def __post_init__(self) -> None:
        if self.reload_budget < 0:
            raise ValueError(f"reload_budget must be >= 0, got {self.reload_budget}")
        for name in ("backoff_s", "max_backoff_s", "budget_reset_s", "canary_interval_s", "max_retained_shm_mb",
                     "retained_check_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.canary_timeout_s <= 0:
            raise ValueError(f"canary_timeout_s must be > 0, got {self.canary_timeout_s}")

    def wait_before(self, reload_number: int) -> float:
        """Seconds reload ``reload_number`` (1-based) waits after the previous one: 0, backoff, 2*backoff, ..."""
        return 0.0 if reload_number <= 1 else min(self.max_backoff_s, self.backoff_s * 2 ** (reload_number - 2))


class RestartNeeded(RuntimeError):
    """Healing in-process is not enough: the server must be restarted (or the launcher stops)."""


class ReloadBudgetExhausted(RestartNeeded):
    """A model needed more reloads than its budget allows."""

    def __init__(self, model: str, reloads: int, window_s: float, why: str):
        super().__init__(f"model '{model}' failed again ({why}) after {reloads} reload(s) in {window_s:.0f} s: "
                         f"reload budget exhausted")
        self.model = model


class RetainedMemoryExceeded(RestartNeeded):
    """tritonserver keeps more shared memory of replaced model instances than the policy allows."""

    def __init__(self, retained_mb: float, limit_mb: float):
        super().__init__(f"tritonserver keeps {retained_mb:.0f} MB of shared memory of replaced model instances "
                         f"(python backend pools of stubs that died under load; over the limit of {limit_mb:g} MB): "
                         f"only a restart frees it")
        self.retained_mb = retained_mb


@dataclass(frozen=True)
class CanaryResult:
    """``status``: ``ok`` (the stub answered), ``unhealthy`` (Triton's "is not healthy"), ``timeout``, or
    ``error`` (no answer for another reason, e.g. the server is going down: no verdict on the stub)."""

    status: str
    detail: str = ""


class HealTarget(Protocol):
    """What the healer needs from a running server (``TritonServer`` implements it)."""

    def python_models(self) -> list[str]: ...

    def missing_stubs(self) -> dict[str, tuple[int, int]]: ...

    def repository_index(self) -> list[dict]: ...  # POST /v2/repository/index (admin key), parsed JSON

    def model_statistics(self) -> dict: ...  # GET /v2/models/stats, parsed JSON

    def canary(self, model: str, timeout_s: float) -> CanaryResult: ...

    def kill_stubs(self, model: str) -> list[int]: ...

    def reload_model(self, model: str) -> None: ...

    def retained_shm_mb(self) -> float: ...  # shared memory tritonserver maps that no live stub maps


def index_states(index: Iterable[dict]) -> dict[str, tuple[str, str]]:
    """Repository index entries (``{"name", "version", "state", "reason"?}``) -> model -> (state, reason). A model
    with several versions is READY when any version is."""
    states: dict[str, tuple[str, str]] = {}
    for entry in index:
        name, state = entry["name"], entry.get("state", "")
        if states.get(name, ("",))[0] != READY:
            states[name] = (state, entry.get("reason", ""))
    return states


def execution_counts(statistics: dict) -> dict[str, tuple[int, int]]:
    """``/v2/models/stats`` -> model -> (successful requests, executions), summed over versions."""
    counts: dict[str, tuple[int, int]] = {}
    for entry in statistics.get("model_stats", []):
        success = int(entry.get("inference_stats", {}).get("success", {}).get("count", 0))
        executions = int(entry.get("execution_count", 0))
        before = counts.get(entry["name"], (0, 0))
        counts[entry["name"]] = (before[0] + success, before[1] + executions)
    return counts


def canary_request(config: dict) -> bytes:
    """A KServe-v2 JSON inference body for a model config (as ``GET /v2/models/<m>/config`` returns it): every
    required input (or the first one, when all are optional), batch 1, each variable dim 1, zeros / empty strings.
    Small, and shaped as the server checks it, so it reaches the model's own code."""
    inputs = [item for item in config.get("input", []) if not item.get("optional", False)] or \
        config.get("input", [])[:1]
    if not inputs:
        raise ValueError(f"model '{config.get('name')}' has no inputs to build a canary from")
    batched = int(config.get("max_batch_size", 0)) > 0
    tensors = []
    for item in inputs:
        datatype = _TRITON_DTYPES.get(item["data_type"])
        if datatype is None:
            raise ValueError(f"model '{config.get('name')}' input '{item['name']}': no canary for {item['data_type']}")
        shape = ([1] if batched else []) + [1 if int(d) < 0 else int(d) for d in item.get("dims", [])]
        size = 1
        for d in shape:
            size *= d
        value = "" if datatype == "BYTES" else (False if datatype == "BOOL" else 0)
        tensors.append({"name": item["name"], "shape": shape, "datatype": datatype, "data": [value] * size})
    return json.dumps({"inputs": tensors}).encode()


@dataclass
class _Budget:
    reloads: int = 0
    first_reload: Optional[float] = None
    last_reload: Optional[float] = None
    not_before: float = 0.0
    waiting_logged: bool = False


@dataclass
class Healer:
    """Heals the python models of one server process (one per ``TritonServer`` start; see the module docstring).
    ``clock`` is injectable so the budget can be tested without waiting."""

    target: HealTarget
    policy: HealPolicy = field(default_factory=HealPolicy)
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self._budgets: dict[str, _Budget] = {}
        self._left_alone: dict[str, tuple[str, str]] = {}  # models not READY, as last logged
        self._next_canary = self.clock()  # the first call runs a canary round
        self._counts_after_canary: Optional[dict[str, tuple[int, int]]] = None
        self._retained_logged = 0.0
        self._lock = threading.Lock()

    def heal(self) -> list[str]:
        """One round: returns the models reloaded. Raises :class:`ReloadBudgetExhausted` (restart the server), or
        the target's error when a reload fails."""
        with self._lock:
            now = self.clock()
            missing = self.target.missing_stubs()
            if not missing:  # a dead stub's own pool is still mapped by the server until its model is reloaded
                self._check_retained(now)
            suspects = {model: (f"{alive} of {expected} python backend stub(s) alive (a stub crashed or was killed)",
                                False) for model, (expected, alive) in missing.items()}
            canary_due = self.policy.canary_interval_s > 0 and now >= self._next_canary
            if not suspects and not canary_due:
                return []
            states = index_states(self.target.repository_index())
            self._note_left_alone(states)
            suspects = {model: why for model, why in suspects.items() if states.get(model, ("",))[0] == READY}
            if canary_due:
                for model, why in self._canary_round(states, skip=set(suspects)).items():
                    suspects.setdefault(model, why)
                self._next_canary = self.clock() + self.policy.canary_interval_s
            return [model for model, (why, kill) in suspects.items() if self._reload(model, why, kill)]

    # -------------------------------------------------------------------------------------------------------------
    def _check_retained(self, now: float) -> None:
        """After a reload: log each new figure of retained shared memory, raise over the limit (module docstring)."""
        limit = self.policy.max_retained_shm_mb
        reloads = [budget.last_reload for budget in self._budgets.values() if budget.last_reload is not None]
        if not limit or not reloads or now - max(reloads) < self.policy.retained_check_delay_s:
            return
        retained = self.target.retained_shm_mb()
        if retained > self._retained_logged + 1.0:
            log.warning("tritonserver keeps %.0f MB of shared memory of replaced model instances (a stub died under "
                        "load and Triton did not release its old instance); only a restart frees it (done over %g MB)",
                        retained, limit)
        self._retained_logged = retained
        if retained > limit:
            raise RetainedMemoryExceeded(retained, limit)

    def _note_left_alone(self, states: dict[str, tuple[str, str]]) -> None:
        for model in self.target.python_models():
            state = states.get(model, ("MISSING", "not in the repository index"))
            if state[0] == READY:
                if self._left_alone.pop(model, None) is not None:
                    log.info("model '%s' is READY again; healing it as before", model)
            elif self._left_alone.get(model) != state:
                self._left_alone[model] = state
                log.warning("model '%s' is %s%s: not healing it (unloaded or being loaded through the repository "
                            "API, or failed to load)", model, state[0], f" ({state[1]})" if state[1] else "")

    def _canary_round(self, states: dict[str, tuple[str, str]], skip: set[str]) -> dict[str, tuple[str, bool]]:
        """Canaries for the READY python models (but ``skip``, already due for a reload) that served nothing since
        the last round -> model -> (why, kill)."""
        before = execution_counts(self.target.model_statistics())
        previous = self._counts_after_canary or {}
        quiet = [model for model in self.target.python_models()
                 if states.get(model, ("",))[0] == READY and model not in skip
                 and (model not in previous or before.get(model, (0, 0))[0] <= previous[model][0])]
        results: dict[str, CanaryResult] = {}
        if quiet:
            # in parallel: several stuck models cost one timeout, not one each
            with ThreadPoolExecutor(max_workers=len(quiet), thread_name_prefix="sdconet-canary") as pool:
                futures = {model: pool.submit(self.target.canary, model, self.policy.canary_timeout_s)
                           for model in quiet}
                results = {model: future.result() for model, future in futures.items()}
        after = execution_counts(self.target.model_statistics())
        self._counts_after_canary = after
        verdicts = {}
        for model, result in results.items():
            if result.status == "unhealthy":
                verdicts[model] = (f"alive but unhealthy: a canary request got '{result.detail}'", True)
            elif result.status == "timeout":
                if after.get(model, (0, 0))[1] > before.get(model, (0, 0))[1]:
                    log.info("model '%s': the canary timed out after %.1f s but executions completed meanwhile "
                             "(busy, not hung)", model, self.policy.canary_timeout_s)
                else:
                    verdicts[model] = (f"hung: a canary request got no answer in {self.policy.canary_timeout_s:.1f} s "
                                       f"and no execution completed meanwhile", True)
            elif result.status == "error":
                log.info("model '%s': the canary got no answer (%s); no verdict this round", model, result.detail)
        return verdicts

    def _reload(self, model: str, why: str, kill: bool) -> bool:
        """Reload ``model`` if its budget and backoff allow; False while it waits out its backoff."""
        now = self.clock()
        budget = self._budgets.setdefault(model, _Budget())
        if budget.last_reload is not None and now - budget.last_reload >= self.policy.budget_reset_s:
            self._budgets[model] = budget = _Budget()  # healthy long enough: the full budget again
        if budget.reloads >= self.policy.reload_budget:
            since = budget.first_reload if budget.first_reload is not None else now
            raise ReloadBudgetExhausted(model, budget.reloads, now - since, why)
        number = budget.reloads + 1
        if now < budget.not_before:
            if not budget.waiting_logged:
                log.warning("model '%s': %s; reload %d of %d in %.1f s (backoff)", model, why, number,
                            self.policy.reload_budget, budget.not_before - now)
                budget.waiting_logged = True
            return False
        log.warning("model '%s': %s; reloading the model (reload %d of %d)", model, why, number,
                    self.policy.reload_budget)
        if kill:
            killed = self.target.kill_stubs(model)
            log.warning("model '%s': killed its stuck stub process(es) %s first", model, killed)
        started = self.clock()
        self.target.reload_model(model)
        done = self.clock()
        budget.reloads = number
        if budget.first_reload is None:
            budget.first_reload = started
        budget.last_reload = done
        budget.not_before = done + self.policy.wait_before(number + 1)
        budget.waiting_logged = False
        log.warning("model '%s' reloaded in %.1f s; serving again", model, done - started)
        return True
