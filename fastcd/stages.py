"""Status lines and measured cost per stage (:class:`Stages`), the plan block they print first
(:func:`format_run_plan`; the plan itself comes from :mod:`fastcd.cost`), and this process's memory: the peak
resident set per stage (Linux: ``/proc/self/clear_refs`` resets the peak) and the free memory."""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager

import torch

from fastcd.io import status

LONG_RUN_S = 3600.0  # a plan over this says so before the work starts


def _status_kb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_gib() -> float:
    """Peak resident memory of this process since the last :func:`reset_peak` (GiB)."""
    kb = _status_kb("VmHWM")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 2**20


def rss_gib() -> float:
    kb = _status_kb("VmRSS")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 2**20


def reset_peak() -> None:
    """Start a new peak (Linux); elsewhere the peak stays the process's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def available_gib() -> float | None:
    kb = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    kb = float(line.split()[1])
    except OSError:
        return None
    return None if kb is None else kb / 2**20





def format_run_plan(plan: dict) -> list[str]:
    """The plan block: one line per stage (work, predicted time, the flag that makes it cheaper), a total line with
    the peak memory, and a warning line when the run is long or the memory short."""
    lines = []
    for st in plan["stages"]:
        t = f"{st['predicted_s'] / 60:.1f} min" if "predicted_s" in st else "not timed"
        lines.append(f"plan:   {st['stage']:<19} {st['what']}; {t}" + (f" (cheaper: {st['cheaper']})"
                                                                         if st["cheaper"] else ""))
    total = sum(st.get("predicted_s", 0.0) for st in plan["stages"])
    timed = all("predicted_s" in st for st in plan["stages"] if st["work"])
    head = (f"plan: {plan['title']}; predicted {total / 60:.1f} min" + ("" if timed else " (timed stages only)")
            + f", peak memory about {plan['peak_gib']:.1f} GiB" + (f" of {plan['available_gib']:.1f} GiB free"
                                                                  if plan.get("available_gib") else "")
            + (f" ({plan['timing']})" if plan.get("timing") else ""))
    lines.insert(0, head)
    for s_ in plan.get("scaled", []):
        lines.append(f"plan:   {s_}")
    warn = []
    if total > LONG_RUN_S:
        warn.append(f"the run is predicted to take {total / 3600:.1f} h")
    if plan.get("available_gib") and plan["peak_gib"] > plan["available_gib"]:
        warn.append(f"its peak memory ({plan['peak_gib']:.1f} GiB) exceeds the free memory "
                    f"({plan['available_gib']:.1f} GiB)")
    if warn:
        lines.append("plan: warning: " + " and ".join(warn) + "; the flags in brackets make it cheaper")
    plan["predicted_s"] = round(total, 1)
    return lines


class Stages:
    """Status lines and measured cost per stage: ``with stages("discovery", "what it does"):`` prints
    ``fastcd: discovery: ...`` at the start and ``fastcd: discovery: done in 12 s (planned 10 s), peak memory 3.1
    GiB`` at the end, and keeps ``{seconds, peak_rss_gib, predicted_s}`` in :attr:`records`."""

    def __init__(self, plan: dict | None = None, *, quiet: bool = False):
        self.records: dict[str, dict] = {}
        self.plan = plan or {"stages": []}
        self.quiet = quiet

    def say(self, msg: str) -> None:
        if not self.quiet:
            status(msg)

    def say_plan(self, plan: dict) -> dict:
        """Print the plan block and take its predictions."""
        self.plan = plan
        for line in format_run_plan(plan):
            self.say(line)
        return plan

    def what(self, name: str) -> str:
        return next((st["what"] for st in self.plan["stages"] if st["stage"] == name), "")

    @contextmanager
    def __call__(self, name: str, what: str = ""):
        self.say(f"fastcd: {name}: {what}" if what else f"fastcd: {name}")
        reset_peak()
        t = time.perf_counter()
        yield
        dt = time.perf_counter() - t
        peak = peak_rss_gib()
        rec = {"seconds": round(dt, 1), "peak_rss_gib": round(peak, 2)}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rec["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        pred = next((st.get("predicted_s") for st in self.plan["stages"] if st["stage"] == name), None)
        if pred is not None:
            rec["predicted_s"] = pred
        self.records[name] = rec
        self.say(f"fastcd: {name}: done in {dt:.0f} s" + (f" (planned {pred:.0f} s)" if pred is not None else "")
                 + f", peak memory {peak:.1f} GiB")
