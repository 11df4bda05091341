"""Adapter cache hit rate across replicas: consistent hashing on the adapter id vs round-robin vs least-loaded.

A simulation (no server, no GPU), to size a scale-out: requests for N adapters with Zipf popularity
arrive as a Poisson stream and are routed to one of R replicas; each replica keeps an LRU cache of
C adapters in device slots (--max-gpu-adapters). A request whose adapter is in its replica's cache
is a hit; a miss loads it (evicting the least recently used). Requests last an exponential time,
and the arrival rate keeps about `--concurrency` requests in flight per replica, which is what
least-loaded balances on.

    python bench/affinity_sim.py                      # the table in docs/deployment.md
    python bench/affinity_sim.py --adapters 5000 --cache 32 --replicas 1 2 4 8 16 --zipf 1.0

Policies:
  ring-hash      Envoy's RING_HASH on the x-adapter-id header (a ring of >= 1024 points shared by
                 the replicas, each adapter to the first point at or after its hash);
  bounded-ring-hash  the same with bounded loads: a replica with 1.25x the mean in-flight count is
                 passed over for the next one on the ring (Envoy's hash_balance_factor: 125);
  round-robin    each request to the next replica;
  least-loaded   to the replica with the fewest requests in flight (ties at random).

Columns: the hit rate of each policy, and for the two ring hashes the busiest replica's share of
requests over the mean share (1.00 = even; hashing puts each hot adapter's whole traffic on one replica).
Simplifications: an adapter in use can be evicted (the server pins it while rows use it), loads
are instant, and replicas never fill up.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import heapq
import random
from collections import OrderedDict

import numpy as np


def h64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class Ring:
    def __init__(self, replicas: int, min_ring_size: int = 1024):
        per = max(1, -(-min_ring_size // replicas))
        points = sorted((h64(f"replica-{r}/{v}"), r) for r in range(replicas) for v in range(per))
        self.keys = [k for k, _ in points]
        self.owner = [r for _, r in points]

    def pick(self, key: str) -> int:
        i = bisect.bisect_left(self.keys, h64(key))
        return self.owner[i % len(self.keys)]

    def pick_bounded(self, key: str, load: list[int], factor: float) -> int:
        """Consistent hashing with bounded loads: the first replica clockwise whose in-flight count is
        under factor x the mean (Envoy's hash_balance_factor, as a ratio)."""
        cap = factor * (sum(load) + 1) / len(load)
        i = bisect.bisect_left(self.keys, h64(key))
        for j in range(len(self.keys)):
            r = self.owner[(i + j) % len(self.keys)]
            if load[r] + 1 <= cap:
                return r
        return self.owner[i % len(self.keys)]


def workload(adapters: int, s: float, requests: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, adapters + 1) ** s
    ranks = rng.choice(adapters, size=requests, p=weights / weights.sum())
    names = [f"adapter-{i:05d}" for i in rng.permutation(adapters)]  # popularity unrelated to the name
    return [names[r] for r in ranks]


def simulate(policy: str, stream: list[str], replicas: int, cache: int, concurrency: int, warmup: int,
             seed: int) -> tuple[float, float]:
    rng = random.Random(seed)
    caches = [OrderedDict() for _ in range(replicas)]
    inflight: list[list[float]] = [[] for _ in range(replicas)]  # finish times, a heap per replica
    ring = Ring(replicas)
    rate = replicas * concurrency  # arrivals per unit time; requests last 1 on average
    now, hits, counted, served = 0.0, 0, 0, [0] * replicas
    for n, adapter in enumerate(stream):
        now += rng.expovariate(rate)
        if policy in ("bounded-ring-hash", "least-loaded"):
            for heap in inflight:
                while heap and heap[0] <= now:
                    heapq.heappop(heap)
        if policy == "ring-hash":
            r = ring.pick(adapter)
        elif policy == "bounded-ring-hash":
            r = ring.pick_bounded(adapter, [len(h) for h in inflight], 1.25)
        elif policy == "round-robin":
            r = n % replicas
        else:
            least = min(len(h) for h in inflight)
            r = rng.choice([i for i, h in enumerate(inflight) if len(h) == least])
        heapq.heappush(inflight[r], now + rng.expovariate(1.0))
        lru = caches[r]
        hit = adapter in lru
        if hit:
            lru.move_to_end(adapter)
        else:
            lru[adapter] = True
            if len(lru) > cache:
                lru.popitem(last=False)
        if n >= warmup:
            hits += hit
            counted += 1
            served[r] += 1
    return hits / counted, max(served) / (counted / replicas)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--zipf", type=float, nargs="+", default=[0.8, 1.0, 1.2])
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--cache", type=int, nargs="+", default=[16, 64], help="adapter slots per replica")
    p.add_argument("--requests", type=int, default=60000)
    p.add_argument("--warmup", type=int, default=10000, help="requests before counting (caches fill)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight per replica, on average")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    policies = ["ring-hash", "bounded-ring-hash", "round-robin", "least-loaded"]
    print(f"{a.adapters} adapters, {a.requests} requests ({a.warmup} warm-up), "
          f"~{a.concurrency} in flight per replica, seed {a.seed}")
    print("| slots | zipf s | replicas | ring-hash hit | bounded ring-hash hit | round-robin hit | least-loaded hit "
          "| ring-hash max/mean load | bounded max/mean load |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for cache in a.cache:
        for s in a.zipf:
            stream = workload(a.adapters, s, a.requests, a.seed)
            for replicas in a.replicas:
                rates, skew = {}, {}
                for policy in policies:
                    rates[policy], skew[policy] = simulate(policy, stream, replicas, cache, a.concurrency,
                                                           a.warmup, a.seed)
                print(f"| {cache} | {s:.1f} | {replicas} | " + " | ".join(f"{rates[x]:.1%}" for x in policies)
                      + f" | {skew['ring-hash']:.2f} | {skew['bounded-ring-hash']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
