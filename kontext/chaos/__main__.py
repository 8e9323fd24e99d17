"""``python -m kontext.chaos``: every scenario against one process-per-service cluster."""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

from kontext.app.embedded import free_port
from kontext.app.runtime import SERVICES
from kontext.chaos import report, scenarios
from kontext.chaos.cluster import Cluster
from kontext.chaos.load import ReplyTally
from kontext.chaos.receiver import WebhookReceiver
from kontext.connections import create_pool


async def main(rate: float, duration: float, names: list[str], record: bool) -> int:
    """Run the scenarios (``names``, or all), print the table; 0 if nothing was lost or doubled."""
    # Outside the root user's home: embedded Postgres opens traversal on every parent.
    workdir = Path(tempfile.mkdtemp(prefix="kontext-chaos-", dir="/tmp"))
    cluster = Cluster(workdir)
    rows: list[scenarios.Row] = []
    try:
        print(f"starting the cluster in {workdir} ...", flush=True)
        await cluster.start()
        tally = ReplyTally(cluster.broker.bootstrap_servers, cluster.settings.topics.replies)
        await tally.start()
        pool = await create_pool(cluster.settings, min_size=0, max_size=4)
        chaos = scenarios.Chaos(cluster, tally, pool, rate=rate, duration=duration)
        receiver = WebhookReceiver(free_port())
        receiver.start()
        every: dict[str, Callable[[scenarios.Chaos], Awaitable[scenarios.Row]]] = {
            "poison": scenarios.poison,
            # One scenario per service kind; long enough for both kills (and their
            # restarts) to land under load.
            **{
                f"kill-{name}": partial(scenarios.kill_service, name=name, duration=duration * 1.5)
                for name in SERVICES
            },
            "webhook-down": lambda c: scenarios.webhook_receiver_down(c, receiver, duration / 2),
            "restart-postgres": scenarios.restart_postgres,
            "restart-broker": scenarios.restart_broker,
        }
        try:
            for n, name in enumerate(names or every):
                if n:
                    await scenarios.fresh_broker(chaos)
                row = await every[name](chaos)
                rows.append(row)
                print(report.table([row]).splitlines()[-1], flush=True)
        finally:
            receiver.stop()
            await tally.stop()
            await pool.close()
    finally:
        codes = cluster.stop()
    body = report.table(rows)
    print(body)
    bad = [n for n, c in codes.items() if c != 0]
    if bad:
        print(f"services that did not stop cleanly: {bad}; logs in {workdir}", file=sys.stderr)
    ok = len(rows) == len(names or every) and all(
        r.lost == 0 and r.answered_twice == 0 for r in rows
    )
    if record:
        report.record(
            "Fault injection (`make chaos`)",
            f"Embedded Tansu broker and PostgreSQL 18, one `kontext worker` process per service, "
            f"`null` engine (no model: the pipeline's guarantees under load), hash embeddings, "
            f"job lease 15 s (doubling per attempt), reconcile every 1 s, Kafka session timeout "
            f"2 s; the broker restarted between scenarios, so each starts on an empty log "
            f"(the embedded broker's in-memory log serves fetches more slowly as it grows); "
            f"load {rate:g} jobs/s over HTTP for {duration:g} s per scenario "
            f"({duration * 1.5:g} s for each kill -9 scenario: two kills, each restarted, so "
            f"both land under load). Lost: accepted (202) but not "
            f"final in the ledger with a reply on the reply topic (and, for webhooks, a "
            f"delivery); answered twice: more than one reply record (or delivered job) per job "
            f"id. Recovery: from the repair (for kill -9, each kill; the worst) until every job "
            f"accepted before it was answered.",
            body,
        )
    if ok:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    # Over half the pipeline's measured capacity on a 2-core machine (850-970 turns/s,
    # docs/benchmarks.md).
    parser.add_argument("--rate", type=float, default=650.0, help="jobs per second")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    parser.add_argument(
        "--scenarios", default="", help="comma-separated subset (default: all, in order)"
    )
    parser.add_argument("--record", action="store_true", help="append to docs/reliability.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    sys.exit(
        asyncio.run(
            main(args.rate, args.duration, [n for n in args.scenarios.split(",") if n], args.record)
        )
    )
