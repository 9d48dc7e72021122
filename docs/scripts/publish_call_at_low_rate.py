"""Publish call duration at a low rate (20 msg/s, held producer, default exchange): Kombu
redis vs the unix transport, then a bare redis-py LPUSH. Run: .venv/bin/python docs/scripts/publish_call_at_low_rate.py
(needs Redis at 127.0.0.1:6379; uses its own queues and deletes them)."""
import tempfile
import time
from pathlib import Path
import transports  # noqa
from kombu import Exchange, Queue
from bench import brokers
import redis as redispy

def run(env, name, n=100, period=0.05):
    with env.connection() as conn:
        q = Queue(name, Exchange(name), name)
        prod = conn.Producer()
        prod.maybe_declare(q)
        ts = []
        for i in range(n):
            time.sleep(period)
            t = time.perf_counter_ns()
            prod.publish({"i": i}, exchange="", routing_key=name, serializer="json")
            ts.append((time.perf_counter_ns() - t) / 1000)
        q(conn.default_channel).delete()
    ts.sort()
    return ts[len(ts)//2], ts[int(len(ts)*0.9)]

folder = Path(tempfile.mkdtemp())
for rnd in range(2):
    for t in ("unix", "redis"):
        with brokers.broker(t, folder) as env:
            print(rnd, t, "publish call p50/p90 us", [round(x) for x in run(env, f"wf-pub-{t}-{rnd}")], flush=True)
# a raw redis-py LPUSH at the same pace, for the round trip alone
r = redispy.Redis.from_url("redis://127.0.0.1:6379/0")
ts = []
for i in range(100):
    time.sleep(0.05); t = time.perf_counter_ns(); r.lpush("wf-raw", b"x"); ts.append((time.perf_counter_ns()-t)/1000)
r.delete("wf-raw"); ts.sort(); print("redis-py LPUSH p50/p90 us", round(ts[50]), round(ts[90]))
