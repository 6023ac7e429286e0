"""Bounded closed-loop load for the failover test: CLIENTS threads, each with one keep-alive
connection, POST /v1/score in a loop for DURATION seconds. Every request is recorded as
`start_offset_s latency_ms outcome` (outcome: the HTTP status, or the error's name) in OUT.
A failed request is anything but 200: warm behind the balancer must never surface one.

    python3 loadgen.py URL CLIENTS DURATION OUT
"""
import http.client
import json
import sys
import threading
import time
from urllib.parse import urlparse

BODY = json.dumps({"inputs": [
    {"prompt": "Write a positive review of a movie.", "response": "A gorgeous, moving film with a wonderful cast."},
    {"prompt": "Write a positive review of a movie.", "response": "Dull, overlong and badly acted."},
    {"prompt": "Write a positive review of a movie.", "response": "It has its moments, but the ending drags."},
    {"prompt": "Write a positive review of a movie.", "response": "Funny, sharp and surprisingly tender."},
]}).encode()


def client(url, stop_at, t0, records, lock):
    conn = None
    while time.monotonic() < stop_at:
        start = time.monotonic()
        try:
            if conn is None:
                conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
            conn.request("POST", "/v1/score", BODY, {"content-type": "application/json"})
            resp = conn.getresponse()
            payload = resp.read()
            outcome = str(resp.status)
            if resp.status == 200 and len(json.loads(payload)["scores"]) != 4:
                outcome = "bad-body"
        except Exception as e:  # noqa: BLE001 - every failure is recorded, whatever it is
            outcome = type(e).__name__
            if conn is not None:
                conn.close()
            conn = None
        end = time.monotonic()
        with lock:
            records.append((start - t0, (end - start) * 1000.0, outcome))


def main():
    url, clients, duration, out = urlparse(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    records, lock = [], threading.Lock()
    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(url, t0 + duration, t0, records, lock)) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with open(out, "w") as f:
        for start, latency, outcome in sorted(records):
            f.write(f"{start:.3f} {latency:.2f} {outcome}\n")


if __name__ == "__main__":
    main()
