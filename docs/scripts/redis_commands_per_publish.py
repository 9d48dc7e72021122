"""Which redis commands one Kombu publish sends and how long each takes, at 20 msg/s (default
exchange; with exchange=name instead, each publish also sends an SMEMBERS routing lookup).
Run: .venv/bin/python docs/scripts/redis_commands_per_publish.py (needs Redis at 127.0.0.1:6379)."""
import collections
import time
import redis.client
from kombu import Connection, Queue, Exchange
calls = []
orig = redis.client.Redis.execute_command
def counted(self, *args, **kw):
    t = time.perf_counter_ns(); out = orig(self, *args, **kw)
    calls.append((args[0], (time.perf_counter_ns() - t) / 1000)); return out
redis.client.Redis.execute_command = counted
orig_pipe = redis.client.Pipeline.execute
def pipe(self, *a, **kw):
    t = time.perf_counter_ns(); out = orig_pipe(self, *a, **kw)
    calls.append(("PIPELINE", (time.perf_counter_ns() - t) / 1000)); return out
redis.client.Pipeline.execute = pipe
name = "wf-cmds"
with Connection("redis://127.0.0.1:6379/0") as conn:
    q = Queue(name, Exchange(name), name); prod = conn.Producer(); prod.maybe_declare(q)
    per = []
    for i in range(60):
        time.sleep(0.05); calls.clear(); t = time.perf_counter_ns()
        prod.publish({"i": i}, exchange="", routing_key=name, serializer="json")
        per.append(((time.perf_counter_ns() - t) / 1000, list(calls)))
    q(conn.default_channel).delete()
tot = sorted(p[0] for p in per)
print("publish p50 us", round(tot[30]), "commands per publish:", collections.Counter(c for _, cs in per for c, _ in cs))
for cmd in ("SMEMBERS", "LPUSH"):
    v = sorted(d for _, cs in per for c, d in cs if c == cmd)
    if v: print(cmd, "p50 us", round(v[len(v)//2]))
inside = sorted(p[0] - sum(d for _, d in p[1]) for p in per)
print("publish minus redis commands, p50 us", round(inside[30]))
