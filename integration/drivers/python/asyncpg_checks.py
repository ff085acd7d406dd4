"""Checks of asyncpg against one PostgreSQL endpoint: the server directly, or
meridian-pgproxy in front of it.

    python asyncpg_checks.py DSN GROUP [GROUP ...]

DSN is a libpq keyword/value string (host, port, user, dbname). Prints one line
per check, `ok NAME` or `FAIL NAME: reason`, then a summary line, and exits 1 if
any check failed (2 on a usage error). Each check opens its own connections,
names its tables with this process's id and is bounded by CHECK_TIMEOUT seconds.
MERIDIAN_NODE_DSNS (libpq DSNs of every node, `;`-separated) is used only to
observe the servers.
"""

import asyncio
import os
import sys
import traceback

import asyncpg

CHECK_TIMEOUT = 20
RUN = os.getpid()
GROUPS = {}


class CheckFailed(Exception):
    pass


def check(group):
    def register(fn):
        GROUPS.setdefault(group, []).append(fn)
        return fn

    return register


def ensure(cond, what):
    if not cond:
        raise CheckFailed(what)


def parse_dsn(dsn):
    kv = dict(p.split("=", 1) for p in dsn.split())
    return {
        "host": kv.get("host", "127.0.0.1"),
        "port": int(kv.get("port", "5432")),
        "user": kv.get("user", "postgres"),
        "database": kv.get("dbname", "postgres"),
        "ssl": False,
    }


class Ctx:
    def __init__(self, dsn):
        self.params = parse_dsn(dsn)
        nodes = os.environ.get("MERIDIAN_NODE_DSNS", "")
        self.nodes = [parse_dsn(d) for d in nodes.split(";") if d.strip()] or [self.params]
        self.conns = []

    async def connect(self, **kw):
        c = await asyncpg.connect(**self.params, timeout=10, **kw)
        self.conns.append(c)
        return c

    async def close_all(self):
        for c in self.conns:
            try:
                await asyncio.wait_for(c.close(), 2)
            except Exception:  # noqa: BLE001 - cleanup only
                c.terminate()
        self.conns = []

    async def running_anywhere(self, marker):
        n = 0
        for p in self.nodes:
            c = await asyncpg.connect(**p, timeout=5)
            try:
                n += await c.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
                    " AND query LIKE $1 AND pid <> pg_backend_pid()",
                    f"%{marker}%",
                )
            finally:
                await c.close()
        return n


async def deadline_poll(within, what, fn, interval=0.05):
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    last = None
    while loop.time() < end:
        last = await fn()
        if last:
            return last
        await asyncio.sleep(interval)
    raise CheckFailed(f"{what}: not within {within} s (last: {last!r})")


@check("asyncpg")
async def statement_cache_reuse(ctx):
    """The same query many times: asyncpg prepares it once (named) and reuses it."""
    conn = await ctx.connect()
    for i in range(20):
        got = await conn.fetchval("SELECT $1::int * 2 + $2::int", i, 1)
        ensure(got == i * 2 + 1, f"run {i}: {got}")
    ensure(len(conn._stmt_cache) >= 1, "asyncpg cached the statement")


@check("asyncpg")
async def explicit_prepare(ctx):
    conn = await ctx.connect()
    stmt = await conn.prepare("SELECT g, $1::text || g FROM generate_series(1, $2::int) g")
    for n in (1, 5, 50):
        rows = await stmt.fetch("r", n)
        ensure(len(rows) == n and rows[-1][1] == f"r{n}", f"{n} rows: {rows[-1:]}")
    ensure([a.name for a in stmt.get_attributes()] == ["g", "?column?"], "attributes")


@check("asyncpg")
async def statement_cache_after_type_change(ctx):
    """asyncpg re-prepares a cached statement whose result type changed (outside a transaction)."""
    conn = await ctx.connect()
    t = f"apg_tc_{RUN}"
    await conn.execute(f"CREATE TABLE {t} (a int)")
    try:
        await conn.execute(f"INSERT INTO {t} VALUES (1)")
        ensure(await conn.fetchval(f"SELECT a FROM {t}") == 1, "int")
        await conn.execute(f"ALTER TABLE {t} ALTER COLUMN a TYPE text")
        ensure(await conn.fetchval(f"SELECT a FROM {t}") == "1", "text after ALTER")
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {t}")


@check("asyncpg")
async def copy_records_to_table_binary(ctx):
    conn = await ctx.connect()
    t = f"apg_copy_{RUN}"
    await conn.execute(f"CREATE TABLE {t} (id int, name text, score float8, tags int[])")
    try:
        records = [(i, f"name-{i}\u00e9", i / 4, [i, None]) for i in range(2000)]
        res = await conn.copy_records_to_table(t, records=records)
        ensure(res == "COPY 2000", f"status {res!r}")
        got = await conn.fetchrow(f"SELECT count(*), sum(id), sum(score) FROM {t}")
        ensure(tuple(got) == (2000, 1999000, 499750.0), f"{tuple(got)}")
        row = await conn.fetchrow(f"SELECT name, tags FROM {t} WHERE id = 1234")
        ensure(tuple(row) == ("name-1234\u00e9", [1234, None]), f"{tuple(row)}")
        buf = []

        class Sink:
            async def __call__(self, data):
                buf.append(data)

        out = await conn.copy_from_table(t, output=Sink(), format="binary")
        ensure(out == "COPY 2000" and sum(map(len, buf)) > 2000 * 20, f"copy out {out!r}")
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {t}")


@check("asyncpg")
async def executemany_insert(ctx):
    conn = await ctx.connect()
    t = f"apg_many_{RUN}"
    await conn.execute(f"CREATE TABLE {t} (id int primary key, v text)")
    try:
        await conn.executemany(f"INSERT INTO {t} VALUES ($1, $2)", [(i, str(i)) for i in range(1000)])
        got = await conn.fetchrow(f"SELECT count(*), sum(id) FROM {t}")
        ensure(tuple(got) == (1000, 499500), f"{tuple(got)}")
        try:
            await conn.executemany(f"INSERT INTO {t} VALUES ($1, $2)", [(5000, "a"), (1, "dup")])
            raise CheckFailed("a duplicate key in executemany was not reported")
        except asyncpg.UniqueViolationError:
            pass
        ensure(await conn.fetchval(f"SELECT count(*) FROM {t}") == 1000, "the failed batch left nothing")
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {t}")


@check("asyncpg")
async def listen_add_listener(ctx):
    listener = await ctx.connect()
    notifier = await ctx.connect()
    got = asyncio.Queue()
    await listener.add_listener("apg_ch", lambda c, pid, ch, payload: got.put_nowait((pid, ch, payload)))
    for i in range(3):
        await notifier.execute(f"NOTIFY apg_ch, 'p{i}'")
        pid, ch, payload = await asyncio.wait_for(got.get(), 5)
        ensure((ch, payload) == ("apg_ch", f"p{i}"), f"{ch} {payload}")
    await listener.execute("SELECT 1")
    await notifier.execute("NOTIFY apg_ch, 'after a query'")
    _, _, payload = await asyncio.wait_for(got.get(), 5)
    ensure(payload == "after a query", payload)


@check("asyncpg")
async def listen_notifier_pid(ctx):
    """The pid in a notification is the notifier's server pid as its connection knows it."""
    listener = await ctx.connect()
    notifier = await ctx.connect()
    got = asyncio.Queue()
    await listener.add_listener("apg_pid", lambda c, pid, ch, payload: got.put_nowait(pid))
    await notifier.execute("NOTIFY apg_pid")
    pid = await asyncio.wait_for(got.get(), 5)
    ensure(pid == notifier.get_server_pid(), f"pid {pid}, notifier {notifier.get_server_pid()}")


@check("asyncpg")
async def timeout_cancels_query(ctx):
    """fetch(..., timeout=) sends a CancelRequest; the connection is usable right after."""
    conn = await ctx.connect()
    marker = f"apg_sleep_{RUN}"
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        await conn.fetch(f"SELECT pg_sleep(30) /* {marker} */", timeout=0.5)
        raise CheckFailed("no timeout")
    except asyncio.TimeoutError:
        pass
    ensure(await asyncio.wait_for(conn.fetchval("SELECT 42"), 5) == 42, "usable after the timeout")
    ensure(loop.time() - t0 < 6, "prompt")
    await deadline_poll(5, "the sleep ended on the server", lambda: _none_running(ctx, marker))


async def _none_running(ctx, marker):
    return await ctx.running_anywhere(marker) == 0


@check("asyncpg")
async def transaction_rollback(ctx):
    conn = await ctx.connect()
    t = f"apg_tx_{RUN}"
    await conn.execute(f"CREATE TABLE {t} (x int)")
    try:
        try:
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {t} VALUES (1)")
                await conn.fetchval("SELECT 1 / 0")
        except asyncpg.DivisionByZeroError:
            pass
        ensure(await conn.fetchval(f"SELECT count(*) FROM {t}") == 0, "rolled back")
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {t} VALUES (2)")
        ensure(await conn.fetchval(f"SELECT sum(x) FROM {t}") == 2, "committed")
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {t}")


async def run_check(ctx, fn):
    # asyncio.wait_for would wait for the cancelled check to unwind, and asyncpg's
    # cleanup of a cancelled query can itself wait on the server: abandon the task
    # instead, after cutting its connections.
    task = asyncio.ensure_future(fn(ctx))
    done, _ = await asyncio.wait({task}, timeout=CHECK_TIMEOUT)
    try:
        if not done:
            for c in ctx.conns:
                c.terminate()
            task.cancel()
            return f"hang: no result within {CHECK_TIMEOUT} s"
        ex = task.exception()
        if ex is None:
            return None
        if isinstance(ex, CheckFailed):
            return str(ex)
        tb = traceback.extract_tb(ex.__traceback__)
        where = next((f"line {f.lineno}" for f in reversed(tb) if f.filename == __file__), "")
        return f"{type(ex).__module__}.{type(ex).__name__}: {ex} ({where})".replace("\n", " | ")
    finally:
        await ctx.close_all()


async def main(argv):
    if len(argv) < 3 or any(g not in GROUPS for g in argv[2:]):
        print(f"usage: {argv[0]} DSN GROUP... (groups: {' '.join(GROUPS)})", file=sys.stderr)
        return 2
    print(f"# asyncpg {asyncpg.__version__}", flush=True)
    failed = passed = 0
    for group in argv[2:]:
        for fn in GROUPS[group]:
            reason = await run_check(Ctx(argv[1]), fn)
            if reason is None:
                passed += 1
                print(f"ok {fn.__name__}", flush=True)
            else:
                failed += 1
                print(f"FAIL {fn.__name__}: {reason}", flush=True)
    print(f"# summary: {passed} ok, {failed} FAIL", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv)))
