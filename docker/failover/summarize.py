"""Summarizes a failover run: requests, failed requests and latency percentiles before the
first event and during the events, from loadgen.py's records and the script's event log.

    python3 summarize.py RECORDS EVENTS [--json]
"""
import json
import sys


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main():
    records = [line.split() for line in open(sys.argv[1])]
    events = [line.rstrip("\n").split(" ", 1) for line in open(sys.argv[2]) if line.strip()]
    first = float(events[0][0]) if events else float("inf")
    phases = {"before": [r for r in records if float(r[0]) < first],
              "during": [r for r in records if float(r[0]) >= first]}
    rows = []
    for name, rs in phases.items():
        lat = [float(r[1]) for r in rs]
        failed = [r for r in rs if r[2] != "200"]
        kinds = sorted({r[2] for r in failed})
        rows.append({"phase": name, "requests": len(rs), "failed": len(failed), "failure_kinds": kinds,
                     "p50_ms": round(percentile(lat, 0.50), 1), "p99_ms": round(percentile(lat, 0.99), 1),
                     "max_ms": round(max(lat), 1) if lat else None})
    if "--json" in sys.argv:
        print(json.dumps({"events": events, "phases": rows}))
        return
    print("events (seconds from the start of the load):")
    for at, what in events:
        print(f"  {float(at):6.1f}  {what}")
    print("| phase | requests | failed | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        kinds = f" ({', '.join(r['failure_kinds'])})" if r["failure_kinds"] else ""
        print(f"| {r['phase']} | {r['requests']} | {r['failed']}{kinds} | {r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} |")
    sys.exit(1 if any(r["failed"] for r in rows) else 0)


if __name__ == "__main__":
    main()
