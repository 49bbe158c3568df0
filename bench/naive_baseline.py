#!/usr/bin/env python3
"""The naive sync a billing engineer would otherwise write (Python 3 standard library only).

Pull MetalSoft `resource_utilization_detailed` window by window, map each line with a dict,
POST one Lago event per request, and commit one SQLite row per event. It is the baseline of
`billsync bench --baseline`, which starts the simulators, runs this script against them and
counts what reached Lago. Prints `pulled=N sent=M` on success.
"""

import argparse
import datetime as dt
import hashlib
import json
import sqlite3
import urllib.request

# resource_type → (metric, property, value field, factor): a dict, as people write it.
METRICS = {
    "instance": ("instance_hours", "hours", "quantity", 1 / 3600),
    "drive": ("storage_cost", "amount", "cost", 1.2),
    "shared_drive": ("storage_cost", "amount", "cost", 1.2),
    "data_lake": ("storage_cost", "amount", "cost", 1.2),
    "network": ("network_gb", "value", "quantity", 1),
}


def post(url, key, body):
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req) as resp:
        return json.loads(resp.read())


def lines(report):
    for infra, types in (report.get("detailed_report") or {}).items():
        for rtype, items in types.items():
            for item in items:
                yield infra, rtype, item
    for infra, buckets in (report.get("network_report") or {}).items():
        for bucket, directions in buckets.items():
            for direction, d in directions.items():
                if isinstance(d, dict):
                    for item in d.get("metered_waypoints") or []:
                        yield infra, bucket, dict(item, direction=direction)


def main():
    p = argparse.ArgumentParser()
    for a in ("--metalsoft", "--metalsoft-key", "--lago", "--lago-key", "--start", "--db", "--prefix"):
        p.add_argument(a, required=True)
    p.add_argument("--users", type=int, required=True)
    p.add_argument("--days", type=int, required=True)
    args = p.parse_args()
    db = sqlite3.connect(args.db)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS sent (key TEXT PRIMARY KEY, payload TEXT)")
    start = dt.datetime.fromisoformat(args.start.replace("Z", "+00:00"))
    rpc = args.metalsoft.rstrip("/") + "/api/developer/developer"
    events = args.lago.rstrip("/") + "/api/v1/events"
    pulled = sent = 0
    for user in range(1, args.users + 1):
        for day in range(args.days):
            a = start + dt.timedelta(days=day)
            b = a + dt.timedelta(days=1)
            fmt = "%Y-%m-%dT%H:%M:%SZ"
            report = post(rpc, args.metalsoft_key, {
                "jsonrpc": "2.0", "id": 1, "method": "resource_utilization_detailed",
                "params": [user, a.strftime(fmt), b.strftime(fmt)],
            })["result"]
            for infra, rtype, item in lines(report):
                pulled += 1
                if rtype not in METRICS or item.get("is_reservation") == "1":
                    continue
                metric, prop, field, factor = METRICS[rtype]
                value = round(float(item.get(field) or 0) * factor, 6)
                natural = "|".join([str(user), infra, rtype, str(item.get("product_id")),
                                    item.get("start_timestamp", ""), item.get("direction", ""),
                                    a.strftime(fmt)])
                key = args.prefix + "." + hashlib.sha256(natural.encode()).hexdigest()[:24]
                event = {
                    "transaction_id": key,
                    "external_subscription_id": "sub_bench_%d" % user,
                    "code": metric,
                    "timestamp": int(a.timestamp()),
                    "properties": {prop: str(value)},
                }
                post(events, args.lago_key, {"event": event})
                db.execute("INSERT OR REPLACE INTO sent VALUES (?, ?)", (key, json.dumps(event)))
                db.commit()
                sent += 1
    print("pulled=%d sent=%d" % (pulled, sent))


if __name__ == "__main__":
    main()
