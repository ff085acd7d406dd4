"""How often a notification reaches its listener after the notifier's own answer.

psycopg's test_notify.py::test_stop_after asserts, with a zero timeout, that a
notification has arrived once the notifying thread has ended. Directly against
PostgreSQL the listener's backend is signalled at commit, before the notifier's answer
is sent, and always wins. Through any hop (meridian-pgproxy, PgBouncer) the two
connections are relayed independently and the notification sometimes lands tens of
microseconds after the answer. This counts it:

    python3 integration/bench/notify-race.py "host=127.0.0.1 port=6432 user=postgres dbname=postgres" [ROUNDS]

Prints how many of ROUNDS (default 300) notifications were not there yet, and by how
many microseconds the late ones followed. Needs psycopg 3 (the driver checks' venv).
"""

import sys
import threading
import time

import psycopg


def main(dsn, rounds):
    listener = psycopg.connect(dsn, autocommit=True)
    listener.execute("LISTEN meridian_notify_race")
    notifier = psycopg.connect(dsn, autocommit=True)
    late = []
    for _ in range(rounds):
        t = threading.Thread(
            target=lambda: notifier.execute("NOTIFY meridian_notify_race, 'x'")
        )
        t.start()
        t.join()
        if len(list(listener.notifies(timeout=0.0))) != 1:
            t0 = time.monotonic()
            got = list(listener.notifies(timeout=1.0, stop_after=1))
            if len(got) != 1:
                sys.exit("a notification never arrived")
            late.append(round((time.monotonic() - t0) * 1e6))
    print(f"late: {len(late)} of {rounds}; by µs (sorted): {sorted(late)}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 300)
