"""Every task of a faults cell accounted for by its sequence number (ran once, more than
once, pending, lost...) and what the fault did, as the cell's Outcome."""
from __future__ import annotations

import numpy as np

from .. import brokers, celery_workers
from . import Outcome
from ._fault_stream import Publisher


def account(rig, pub: Publisher, rows, left, t_fault: int, wall_fault: float, info: dict,
            why: str, back: int | None, vt: float | None) -> Outcome:
    params, fault = rig.params, rig.params["fault"]
    attempted = pub.attempted
    ok = pub.ok[:attempted]
    rows = rows[(rows[:, 1] >= 0) & (rows[:, 1] < attempted)]
    done = rows[rows[:, 3] > 0]
    completions = np.bincount(done[:, 1], minlength=attempted)
    starts = np.bincount(rows[:, 1], minlength=attempted)
    held = left["queued"] | left["invisible"]
    sent_idx = np.flatnonzero(ok)
    not_run = [i for i in sent_idx if completions[i] == 0]
    pending = [i for i in not_run if i in held]
    invisible = [i for i in not_run if i in left["invisible"]]
    lost = [i for i in not_run if i not in held]
    interrupted = [i for i in not_run if starts[i] > 0]
    ran = int((completions[sent_idx] > 0).sum())
    duplicates = int((completions[sent_idx] - 1).clip(min=0).sum())
    held_after_run = [i for i in sent_idx if completions[i] > 0 and i in held]
    unconfirmed = [i for i in np.flatnonzero(~ok) if completions[i] > 0]
    # Tasks in a worker's hands at the fault: started before it, not finished before it.
    at_fault = rows[(rows[:, 0] == 1) & (rows[:, 2] < t_fault)]
    finished_before = set(done[(done[:, 0] == 1) & (done[:, 3] <= t_fault)][:, 1].tolist())
    running_at_fault = len(set(at_fault[:, 1].tolist()) - finished_before)

    recovery_s = (back - t_fault) / 1e9 if back is not None else None

    lag = (pub.called[:attempted] - pub.intended[:attempted]) / 1e9
    errors = sum(c for c, _ in pub.errors.values())
    metrics = {
        "sent": int(len(sent_idx)), "received": ran, "lost": len(lost),
        "duplicates": duplicates, "pending": len(pending),
        "pending_invisible": len(invisible), "interrupted": len(interrupted),
        "running_at_fault": running_at_fault, "recovery_s": recovery_s,
        "publish_errors": int(errors), "ran_unconfirmed": len(unconfirmed),
        "publish_lag_max_s": float(lag.max()) if attempted else None,
        "publish_call_max_s": float((pub.returned[:attempted] - pub.called[:attempted])
                                    .max() / 1e9) if attempted else None,
        "fault_at_s": round((t_fault - pub.intended[0]) / 1e9, 3) if attempted else None,
        "worker_exits": len(rig.exits),
        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in info.items()},
    }
    notes = [what_happened(fault, info)]
    visible_at = left["visible_at"]
    if rig.server is not None:
        back = [visible_at[i] - wall_fault for i in invisible if i in visible_at]
        metrics["returns_after_s"] = round(max(back), 1) if back else None
        if back:
            notes.append(
                f"{len(invisible)} task(s) invisible in redis's unacked hash (pending): "
                f"visible again {max(back):,.0f} s after the fault (visibility_timeout "
                f"{vt:g} s from their delivery), then restored at the next sweep (~100 s "
                f"apart) or when a worker starts")
    if held_after_run:
        metrics["held_after_run"] = len(held_after_run)
        again = [visible_at[i] - wall_fault for i in held_after_run if i in visible_at]
        when = (f" (redis: {max(again):,.0f} s after the fault, when they become visible)"
                if again else "")
        notes.append(f"{len(held_after_run)} task(s) ran but the broker still holds them "
                     f"(their ack was lost): they will run again{when}")
    if lost:
        cut = sum(1 for i in lost if starts[i] > 0)
        rel = (pub.called[lost] - t_fault) / 1e9
        notes.append(f"lost {len(lost)}: ran nowhere and not held by the broker "
                     f"({cut} of them started and were cut short; published "
                     f"{rel.min():+.2f} s to {rel.max():+.2f} s from the fault)")
        declared = brokers.declared(rig.transport)
        if fault == "warm-shutdown" and declared and declared.shutdown_loss:
            notes.append(f"{rig.transport}: {declared.shutdown_loss}")
    if unconfirmed:
        notes.append(f"{len(unconfirmed)} task(s) whose send_task raised ran anyway")
    for kind, (count, first) in pub.errors.items():
        notes.append(f"publisher: {count} x {celery_workers.one_line(first)[:200]}")
    if pub.is_alive():
        notes.append("the publisher was still inside a send_task call when the cell "
                     "ended (blocked on the broker)")
    if recovery_s is None:
        notes.append("no task received after the fault ran within the window")
    for line in rig.exits:
        notes.append(f"{line}; started again, as a supervisor would")
    notes.append(f"stopped watching: {why}")
    return Outcome(metrics, {}, notes)

def what_happened(fault: str, info: dict) -> str:
    if fault == "worker-kill":
        return (f"SIGKILL to the worker's process group; replacement ready "
                f"{info.get('replacement_ready_s', 0):.1f} s after")
    if fault == "warm-shutdown":
        how = "cut with SIGKILL" if info.get("shutdown_killed") else "exited by itself"
        return (f"SIGTERM: warm shutdown in {info.get('shutdown_s', 0):.2f} s ({how}); "
                f"replacement ready {info.get('replacement_ready_s', 0):.1f} s after")
    if fault == "broker-restart":
        return f"broker stopped and started again in {info.get('down_s', 0):.2f} s"
    return f"{info.get('connections_dropped', 0)} worker connection(s) to the broker dropped"
