"""Checks of psycopg 3 (binary) against one PostgreSQL endpoint: the server
directly, or meridian-pgproxy in front of it.

    python psycopg_checks.py DSN GROUP [GROUP ...]

Prints one line per check, `ok NAME` or `FAIL NAME: reason`, then a summary
line, and exits 1 if any check failed (2 on a usage error). Each check opens
its own connections, names its objects with this process's id (the same
database serves the direct and the proxied runs) and is bounded by SIGALRM
(CHECK_TIMEOUT seconds), so a client that hangs costs one check, not the run.

The environment variable MERIDIAN_NODE_DSNS (DSNs of every PostgreSQL node,
separated by `;`) is used only to observe the servers (is a query running?),
never to act on them. The checks mirror tests of psycopg 3.3.4's own suite that
failed through the proxy; each names the upstream test it follows.
"""

import asyncio
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback

import psycopg
from psycopg import errors as e
from psycopg import pq

CHECK_TIMEOUT = 15
RUN = os.getpid()
GROUPS = {}


class CheckTimeout(Exception):
    pass


class CheckFailed(Exception):
    pass


def check(group, repeat=1):
    """Registers a check of `group`; `repeat` runs it that many times (each with fresh
    connections), for behaviour that depends on how messages happen to be split."""

    def register(fn):
        fn.repeat = repeat
        GROUPS.setdefault(group, []).append(fn)
        return fn

    return register


def ensure(cond, what):
    if not cond:
        raise CheckFailed(what)


def raises(exc_types, fn, what):
    """Runs fn, which must raise one of exc_types; returns the exception."""
    try:
        fn()
    except exc_types as ex:
        return ex
    except Exception as ex:  # noqa: BLE001 - reported as the wrong exception
        raise CheckFailed(f"{what}: expected {exc_types}, got {type(ex).__name__}: {ex}")
    raise CheckFailed(f"{what}: expected {exc_types}, nothing was raised")


def deadline_poll(within, what, fn, interval=0.05):
    """Polls fn until it returns a true value or `within` seconds pass."""
    end = time.monotonic() + within
    last = None
    while time.monotonic() < end:
        last = fn()
        if last:
            return last
        threading.Event().wait(interval)
    raise CheckFailed(f"{what}: not within {within} s (last: {last!r})")


def wait_readable(conn, within):
    """Waits until the server side sends something on conn's socket (or closes it)."""
    r, _, _ = select.select([conn.fileno()], [], [], within)
    return bool(r)


class Ctx:
    def __init__(self, dsn):
        self.dsn = dsn
        self.conns = []
        nodes = os.environ.get("MERIDIAN_NODE_DSNS", "")
        self.node_dsns = [d for d in nodes.split(";") if d.strip()] or [dsn]

    def connect(self, dsn=None, **kw):
        kw.setdefault("connect_timeout", 10)
        c = psycopg.connect(dsn or self.dsn, **kw)
        self.conns.append(c)
        return c

    def close_all(self):
        for c in self.conns:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - cleanup only
                pass
        self.conns = []

    def running_anywhere(self, marker):
        """How many sessions on any node run a query containing marker (observation only)."""
        n = 0
        for d in self.node_dsns:
            with psycopg.connect(d, autocommit=True, connect_timeout=5) as c:
                n += c.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
                    " AND query LIKE %s AND pid <> pg_backend_pid()",
                    [f"%{marker}%"],
                ).fetchone()[0]
        return n


def cleanup(ctx, *statements):
    """Runs each statement on a fresh connection, ignoring errors (they must not hide
    the check's own failure)."""
    try:
        c = ctx.connect(autocommit=True)
    except Exception:  # noqa: BLE001 - cleanup only
        return
    for sql in statements:
        try:
            c.execute(sql)
        except Exception:  # noqa: BLE001 - cleanup only
            pass


def prepared_statements(conn):
    """As psycopg's tests/test_prepared.py get_prepared_statements."""
    return conn.execute(
        "SELECT regexp_replace(statement, 'prepare _pg3_\\d+ as ', '', 'i'), prepare_time"
        " FROM pg_prepared_statements WHERE name != ''",
        prepare=False,
    ).fetchall()


# --- pipeline mode ---------------------------------------------------------

# An error the server raises 0.1 s into execution. psycopg's own test uses `select 1
# from nosuchtable`, which fails at once; then, directly against PostgreSQL, about 2 runs
# in 100 on a busy machine read the error before psycopg has sent the Sync of its
# commit(), so its COMMIT, ROLLBACK and `select 1` fall in the failed segment and the
# session stays in a failed transaction. That race is psycopg's, not the proxy's
# (the suite's rerun hides it); the late error keeps the sequence the check is about.
DELAYED_ERROR = "select 1 / (random() * 0)::int from pg_sleep(0.1)"


@check("pipeline", repeat=5)
def pipeline_error_then_commit_then_rollback(ctx):
    """tests/test_pipeline.py::test_errors_raised_on_commit, with an error that comes
    late (DELAYED_ERROR)."""
    conn = ctx.connect()
    with conn.pipeline():
        conn.execute(DELAYED_ERROR)
        raises(e.DivisionByZero, conn.commit, "commit after an error in the pipeline")
        conn.rollback()
        cur1 = conn.execute("select 1")
    cur2 = conn.execute("select 2")
    ensure(cur1.fetchone() == (1,), "select 1 after the rollback")
    ensure(cur2.fetchone() == (2,), "select 2 after the pipeline")


@check("pipeline", repeat=5)
def pipeline_error_then_rollback_autocommit(ctx):
    """tests/test_pipeline.py::test_rollback_explicit"""
    conn = ctx.connect(autocommit=True)
    with conn.pipeline():

        def fail():
            conn.execute("select 1 / %s", [0]).fetchone()

        raises(e.DivisionByZero, fail, "division by zero in the pipeline")
        conn.rollback()
        cur = conn.execute("select 1")
    ensure(cur.fetchone() == (1,), "select 1 after the rollback")


@check("pipeline", repeat=5)
def pipeline_commit_aborted(ctx):
    """tests/test_pipeline.py::test_pipeline_commit_aborted"""
    conn = ctx.connect()

    def run():
        with conn.pipeline():
            conn.execute("select error")
            conn.execute(f"create table voila_{RUN} ()")
            conn.commit()

    raises((e.UndefinedColumn, e.OperationalError), run, "commit of an aborted pipeline")
    conn.rollback()
    ensure(conn.execute("select 3").fetchone() == (3,), "the connection is usable afterwards")


@check("pipeline", repeat=5)
def pipeline_error_on_deferred_commit(ctx):
    """tests/test_pipeline.py::test_error_on_commit"""
    conn = ctx.connect()
    t = f"selfref_{RUN}"
    conn.execute(
        f"create table {t} (x serial primary key,"
        f" y int references {t} (x) deferrable initially deferred)"
    )
    conn.commit()
    try:
        with conn.pipeline():
            conn.execute(f"insert into {t} (y) values (-1)")
            raises(e.ForeignKeyViolation, conn.commit, "deferred FK at commit")
            cur1 = conn.execute("select 1")
        cur2 = conn.execute("select 2")
        ensure(cur1.fetchone() == (1,), "select 1 after the failed commit")
        ensure(cur2.fetchone() == (2,), "select 2 after the pipeline")
    finally:
        conn.rollback()
        conn.execute(f"drop table {t}")
        conn.commit()


@check("pipeline", repeat=5)
def pipeline_transaction_block_error(ctx):
    """tests/test_pipeline.py::test_errors_raised_on_transaction_exit"""
    conn = ctx.connect()
    here = False

    def run():
        nonlocal here
        with conn.transaction():
            conn.execute("select 1 from nosuchtable")
            here = True

    with conn.pipeline():
        raises(e.UndefinedTable, run, "error at the exit of a transaction block")
        cur1 = conn.execute("select 1")
    ensure(here, "the statement after the failing one was queued")
    cur2 = conn.execute("select 2")
    ensure(cur1.fetchone() == (1,) and cur2.fetchone() == (2,), "results after the block")


@check("pipeline", repeat=5)
def pipeline_many_statements_before_sync(ctx):
    """Thousands of queued statements (parameters and results both ways) before one Sync."""
    conn = ctx.connect(autocommit=True)
    t = f"many_{RUN}"
    conn.execute(f"create table {t} (id int primary key, pad text)")
    n = 3000
    pad = "x" * 200
    try:
        with conn.pipeline():
            cur = conn.cursor()
            cur.executemany(f"insert into {t} values (%s, %s)", [(i, pad) for i in range(n)])
            curs = [conn.execute("select %s::int, repeat('y', 200)", [i]) for i in range(n)]
        ensure(all(c.fetchone()[0] == i for i, c in enumerate(curs)), "results in order")
        got = conn.execute(f"select count(*), sum(id) from {t}").fetchone()
        ensure(got == (n, n * (n - 1) // 2), f"rows inserted: {got}")
    finally:
        conn.execute(f"drop table if exists {t}")


@check("pipeline", repeat=5)
def pipeline_flush_without_sync(ctx):
    """libpq pipeline: a result requested with PQsendFlushRequest, before any Sync."""
    conn = ctx.connect(autocommit=True)
    pgconn = conn.pgconn
    pgconn.enter_pipeline_mode()
    pgconn.send_query_params(b"select $1::int + 1", [b"41"])
    pgconn.send_flush_request()
    while pgconn.flush() != 0:
        pass

    def result():
        # Busy-wait on the socket with a deadline: the result must come without a Sync.
        end = time.monotonic() + 5
        while time.monotonic() < end:
            pgconn.consume_input()
            if not pgconn.is_busy():
                return pgconn.get_result()
            select.select([pgconn.socket], [], [], 0.1)
        raise CheckFailed("no result within 5 s of a Flush (no Sync sent)")

    res = result()
    ensure(res is not None and res.status == pq.ExecStatus.TUPLES_OK, f"status {res and res.status}")
    ensure(res.get_value(0, 0) == b"42", f"value {res.get_value(0, 0)!r}")
    ensure(pgconn.get_result() is None, "end of the query's results")
    pgconn.pipeline_sync()
    while pgconn.flush() != 0:
        pass
    res = result()
    ensure(res.status == pq.ExecStatus.PIPELINE_SYNC, f"then the sync: {res.status}")
    pgconn.exit_pipeline_mode()
    ensure(conn.execute("select 7").fetchone() == (7,), "usable after the pipeline")


@check("pipeline", repeat=5)
def pipeline_auto_prepare(ctx):
    """tests/test_pipeline.py::test_auto_prepare"""
    conn = ctx.connect(autocommit=True)
    conn.prepare_threshold = 5
    with conn.pipeline():
        cursors = [
            conn.execute("select count(*) from pg_prepared_statements where name != ''")
            for _ in range(10)
        ]
        ensure(len(conn._prepared._names) == 1, "one statement prepared by psycopg")
    res = [c.fetchone()[0] for c in cursors]
    ensure(res == [0] * 5 + [1] * 5, f"pg_prepared_statements counts {res}")


@check("pipeline", repeat=5)
def pipeline_statement_prepared_in_pipeline_reused(ctx):
    """A statement psycopg prepares inside a pipeline keeps working after it."""
    conn = ctx.connect(autocommit=True)
    conn.prepare_threshold = 1
    with conn.pipeline():
        curs = [conn.execute("select %s::int * 2", [i]) for i in range(6)]
    ensure([c.fetchone()[0] for c in curs] == [0, 2, 4, 6, 8, 10], "results in the pipeline")
    ensure(conn.execute("select %s::int * 2", [21]).fetchone() == (42,), "after the pipeline")


def run_async(ctx, coro_fn, within=10):
    """Runs an asyncio check on psycopg's AsyncConnection; on a hang the task is
    abandoned after its connections are cut (awaiting a cancelled pipeline could
    hang as well)."""
    conns = []

    async def connect(**kw):
        kw.setdefault("connect_timeout", 10)
        c = await psycopg.AsyncConnection.connect(ctx.dsn, **kw)
        conns.append(c)
        return c

    async def main():
        task = asyncio.ensure_future(coro_fn(connect))
        done, _ = await asyncio.wait({task}, timeout=within)
        if not done:
            for c in conns:
                c.pgconn.finish()
            task.cancel()
            raise CheckFailed(f"hang: no result within {within} s")
        for c in conns:
            await c.close()
        task.result()

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


@check("pipeline", repeat=5)
def pipeline_async_commit_aborted(ctx):
    """tests/test_pipeline_async.py::test_pipeline_commit_aborted (hung through the proxy)"""

    async def run(connect):
        conn = await connect()
        try:
            async with conn.pipeline():
                await conn.execute("select error")
                await conn.execute(f"create table voila_{RUN} ()")
                await conn.commit()
            raise CheckFailed("the pipeline's error was not raised")
        except (e.UndefinedColumn, e.OperationalError):
            pass
        await conn.rollback()
        cur = await conn.execute("select 3")
        ensure(await cur.fetchone() == (3,), "the connection is usable afterwards")

    run_async(ctx, run)


@check("pipeline", repeat=5)
def pipeline_async_error_then_commit_then_rollback(ctx):
    """tests/test_pipeline_async.py::test_errors_raised_on_commit, with an error that
    comes late (DELAYED_ERROR)."""

    async def run(connect):
        conn = await connect()
        async with conn.pipeline():
            await conn.execute(DELAYED_ERROR)
            try:
                await conn.commit()
                raise CheckFailed("commit after an error did not raise")
            except e.DivisionByZero:
                pass
            await conn.rollback()
            cur1 = await conn.execute("select 1")
        cur2 = await conn.execute("select 2")
        ensure(await cur1.fetchone() == (1,) and await cur2.fetchone() == (2,), "results")

    run_async(ctx, run)


@check("pipeline", repeat=5)
def pipeline_auto_prepare_after_another_client(ctx):
    """test_auto_prepare as the suite runs it: earlier clients prepared statements too."""
    prev = ctx.connect(autocommit=True)
    prev.prepare_threshold = 0
    prev.execute("select 'left behind'")
    prev.close()
    pipeline_auto_prepare(ctx)


# --- prepared statements ---------------------------------------------------


@check("prepared")
def prepared_none_left_by_a_previous_client(ctx):
    """A new connection sees no prepared statement of an earlier client."""
    for i in range(3):
        prev = ctx.connect(autocommit=True)
        prev.prepare_threshold = 0
        prev.execute(f"select 'left behind {i}'")
        mine = prepared_statements(prev)
        ensure(len(mine) == 1, f"the earlier client sees {mine}, want its own one")
        prev.close()
    conn = ctx.connect(autocommit=True)
    left = prepared_statements(conn)
    ensure(not left, f"a new connection sees {left}")


@check("prepared")
def prepared_change_type(ctx):
    """tests/test_prepared.py::test_change_type"""
    conn = ctx.connect()
    conn.prepare_threshold = 0
    ty, t = f"prepenum_{RUN}", f"preptable_{RUN}"
    ins = f"INSERT INTO {t} (bar) VALUES (%(enum_col)s::{ty}[])"
    try:
        for _ in range(2):
            conn.execute(f"CREATE TYPE {ty} AS ENUM ('foo', 'bar', 'baz')")
            conn.execute(f"CREATE TABLE {t}(id integer, bar {ty}[])")
            conn.cursor().execute(ins, {"enum_col": ["foo"]})
            if _ == 0:
                conn.execute(f"DROP TABLE {t}")
                conn.execute(f"DROP TYPE {ty}")
        n = len(prepared_statements(conn))
        ensure(n == 3, f"{n} prepared statements, psycopg's suite expects 3")
    finally:
        conn.rollback()


@check("prepared")
def prepared_change_type_execute_rollback(ctx):
    """tests/test_prepared.py::test_change_type_execute"""
    conn = ctx.connect()
    conn.prepare_threshold = 0
    ty, t = f"prepenum_{RUN}", f"preptable_{RUN}"
    for _ in range(3):
        conn.execute(f"CREATE TYPE {ty} AS ENUM ('foo', 'bar', 'baz')")
        conn.execute(f"CREATE TABLE {t}(id integer, bar {ty}[])")
        conn.cursor().execute(
            f"INSERT INTO {t} (bar) VALUES (%(enum_col)s::{ty}[])", {"enum_col": ["foo"]}
        )
        conn.rollback()


@check("prepared")
def prepared_change_type_executemany(ctx):
    """tests/test_prepared.py::test_change_type_executemany"""
    conn = ctx.connect()
    ty, t = f"prepenum_{RUN}", f"preptable_{RUN}"
    for _ in range(3):
        conn.execute(f"CREATE TYPE {ty} AS ENUM ('foo', 'bar', 'baz')")
        conn.execute(f"CREATE TABLE {t}(id integer, bar {ty}[])")
        conn.cursor().executemany(
            f"INSERT INTO {t} (bar) VALUES (%(enum_col)s::{ty}[])",
            [{"enum_col": ["foo"]}, {"enum_col": ["foo", "bar"]}],
        )
        conn.rollback()


@check("prepared")
def prepared_cached_plan_result_type_changed(ctx):
    """'cached plan must not change result type' after ALTER COLUMN TYPE; the ROLLBACK
    makes psycopg forget its statements (DEALLOCATE ALL) and prepare them anew."""
    conn = ctx.connect()
    conn.prepare_threshold = 0
    t = f"plan_{RUN}"
    conn.execute(f"CREATE TABLE {t} (a int)")
    conn.execute(f"INSERT INTO {t} VALUES (1)")
    conn.commit()
    try:
        q = f"SELECT * FROM {t}"
        ensure(conn.execute(q).fetchone() == (1,), "first run")
        conn.commit()
        conn.execute(f"ALTER TABLE {t} ALTER COLUMN a TYPE text")
        conn.commit()
        ex = raises(e.FeatureNotSupported, lambda: conn.execute(q).fetchone(), "run after ALTER")
        ensure("cached plan must not change result type" in str(ex), f"message: {ex}")
        conn.rollback()
        ensure(not conn._prepared._names, "psycopg forgot its statements at the rollback")
        ensure(conn.execute(q).fetchone() == ("1",), "re-prepared run")
        ensure(conn.execute(q).fetchone() == ("1",), "second run of the new statement")
        conn.commit()
        n = len(prepared_statements(conn))
        ensure(n == 1, f"{n} statements on the server after DEALLOCATE ALL, want 1")
    finally:
        conn.rollback()
        conn.execute(f"DROP TABLE IF EXISTS {t}")
        conn.commit()


@check("prepared")
def prepared_evict_lru_deallocate(ctx):
    """tests/test_prepared.py::test_evict_lru_deallocate"""
    conn = ctx.connect(autocommit=True)
    conn.prepared_max = 5
    conn.prepare_threshold = 0
    for i in range(10):
        conn.execute("select 'a'")
        conn.execute(f"select {i}")
    ensure(len(conn._prepared._names) == 5, "psycopg keeps 5")
    stmts = sorted(prepared_statements(conn), key=lambda r: r[1])
    got = [s for s, _ in stmts]
    want = [f"select {i}" for i in ["'a'", 6, 7, 8, 9]]
    ensure(got == want, f"pg_prepared_statements {got}, want {want}")


@check("prepared")
def prepared_evicted_names_reusable(ctx):
    """After psycopg's DEALLOCATE of evicted statements, new statements keep working."""
    conn = ctx.connect(autocommit=True)
    conn.prepared_max = 2
    conn.prepare_threshold = 0
    for rnd in range(3):
        for i in range(6):
            got = conn.execute(f"select {i} + %s::int", [rnd]).fetchone()
            ensure(got == (i + rnd,), f"round {rnd} statement {i}: {got}")


# --- client encodings ------------------------------------------------------


@check("encoding")
def encoding_latin9_query_text(ctx):
    """tests/test_cursor_common.py::test_query_encode[latin9]"""
    conn = ctx.connect(autocommit=True)
    conn.execute("SET client_encoding TO 'LATIN9'")
    ensure(conn.info.encoding == "iso8859-15", f"codec {conn.info.encoding}")
    (res,) = conn.execute("select '\u20ac'").fetchone()
    ensure(res == "\u20ac", f"got {res!r}")


@check("encoding")
def encoding_latin9_parameters(ctx):
    conn = ctx.connect(autocommit=True)
    conn.execute("SET client_encoding TO 'LATIN9'")
    (res,) = conn.execute("select %s || 'x'", ["\u20ac\u00e9"]).fetchone()
    ensure(res == "\u20ac\u00e9x", f"got {res!r}")


@check("encoding")
def encoding_latin9_column_name(ctx):
    """tests/test_column.py::test_name_encode[latin9]"""
    conn = ctx.connect(autocommit=True)
    conn.execute("set client_encoding to latin9")
    cur = conn.cursor()
    (res,) = cur.execute("""select 'x' as "\u20ac" """).fetchone()
    ensure(res == "x", f"got {res!r}")
    ensure(cur.description[0].name == "\u20ac", f"column {cur.description[0].name!r}")


@check("encoding")
def encoding_latin9_error_message(ctx):
    """tests/pq/test_misc.py::test_error_message_encoding"""
    conn = ctx.connect(autocommit=True)
    pgconn = conn.pgconn
    res = pgconn.exec_(b"set client_encoding to latin9")
    ensure(res.status == pq.ExecStatus.COMMAND_OK, f"SET: {res.status}")
    res = pgconn.exec_('select 1 from "foo\u20acbar"'.encode("latin9"))
    ensure(res.status == pq.ExecStatus.FATAL_ERROR, f"status {res.status}")
    msg = pq.error_message(res, encoding="latin9")
    ensure("foo\u20acbar" in msg, f"message {msg!r}")


def connect_encoding(ctx, enc, out, codec):
    """tests/test_connection_info.py::test_encoding_env_var"""
    conn = ctx.connect(client_encoding=enc)
    clienc = conn.info.parameter_status("client_encoding")
    ensure(clienc == out, f"ParameterStatus client_encoding {clienc!r}, want {out!r}")
    ensure(conn.info.encoding == codec, f"codec {conn.info.encoding!r}, want {codec!r}")
    (server_says,) = conn.execute("show client_encoding").fetchone()
    ensure(server_says == out, f"SHOW client_encoding {server_says!r}")


@check("encoding")
def encoding_connect_utf8(ctx):
    connect_encoding(ctx, "utf8", "UTF8", "utf-8")


@check("encoding")
def encoding_connect_utf_8(ctx):
    connect_encoding(ctx, "utf-8", "UTF8", "utf-8")


@check("encoding")
def encoding_connect_eucjp(ctx):
    connect_encoding(ctx, "eucjp", "EUC_JP", "euc_jp")


@check("encoding")
def encoding_connect_euc_jp_text(ctx):
    conn = ctx.connect(client_encoding="euc-jp")
    (res,) = conn.execute("select %s || '\u6f22'", ["\u65e5\u672c"]).fetchone()
    ensure(res == "\u65e5\u672c\u6f22", f"got {res!r}")


# --- server-side session ends, pids, cancel --------------------------------


@check("session_end")
def session_backend_pid_matches(ctx):
    """pg_backend_pid() is what the server announced in BackendKeyData."""
    conn = ctx.connect(autocommit=True)
    (pid,) = conn.execute("select pg_backend_pid()").fetchone()
    ensure(pid == conn.info.backend_pid, f"pg_backend_pid() {pid}, info.backend_pid {conn.info.backend_pid}")


@check("session_end")
def session_notify_carries_own_pid(ctx):
    """tests/test_notify.py::test_notify: a NOTIFY from the session's own backend."""
    conn = ctx.connect(autocommit=True)
    conn.execute("listen foo")
    conn.execute("notify foo, '1'")
    got = list(conn.notifies(timeout=5, stop_after=1))
    ensure(len(got) == 1, f"{len(got)} notifications")
    n = got[0]
    ensure((n.channel, n.payload) == ("foo", "1"), f"{n}")
    ensure(n.pid == conn.info.backend_pid, f"Notify pid {n.pid}, info.backend_pid {conn.info.backend_pid}")


@check("session_end")
def session_notify_from_other_carries_its_pid(ctx):
    listener = ctx.connect(autocommit=True)
    notifier = ctx.connect(autocommit=True)
    listener.execute("listen bar")
    notifier.execute("notify bar, 'x'")
    got = list(listener.notifies(timeout=5, stop_after=1))
    ensure(len(got) == 1, f"{len(got)} notifications")
    ensure(got[0].pid == notifier.info.backend_pid, f"pid {got[0].pid}, notifier {notifier.info.backend_pid}")


@check("session_end")
def session_terminate_backend_from_other(ctx):
    """pg_terminate_backend(conn.info.backend_pid) from another connection ends conn."""
    conn = ctx.connect(autocommit=True)
    other = ctx.connect(autocommit=True)
    (done,) = other.execute("select pg_terminate_backend(%s)", [conn.info.backend_pid]).fetchone()
    ensure(done is True, f"pg_terminate_backend returned {done}")
    wait_readable(conn, 5)
    ex = raises(psycopg.OperationalError, lambda: conn.execute("select 1"), "query after termination")
    ensure(isinstance(ex, e.AdminShutdown), f"{type(ex).__name__}: {ex}")
    ensure(conn.closed, "conn.closed")


@check("session_end")
def session_terminate_own_backend(ctx):
    """tests/test_connection.py::test_right_exception_on_server_disconnect"""
    conn = ctx.connect(autocommit=True)
    raises(
        e.AdminShutdown,
        lambda: conn.execute("select pg_terminate_backend(%s)", [conn.pgconn.backend_pid]),
        "terminating the session's own backend",
    )
    ensure(conn.closed, "conn.closed")


@check("session_end")
def session_idle_in_transaction_timeout(ctx):
    """tests/test_connection.py::test_right_exception_on_session_timeout"""
    conn = ctx.connect()
    conn.execute("SET SESSION idle_in_transaction_session_timeout = 100")
    # The server sends the FATAL and closes once the timeout fires.
    readable = wait_readable(conn, 5)
    ex = raises(psycopg.Error, lambda: conn.execute("SELECT * from pg_tables"), "query after the timeout")
    ensure(
        type(ex) is e.IdleInTransactionSessionTimeout,
        f"{type(ex).__name__}: {ex} (socket readable: {readable})",
    )


@check("session_end")
def session_cancel_running_query(ctx):
    """conn.cancel() from another thread stops a running pg_sleep."""
    conn = ctx.connect(autocommit=True)
    marker = f"cancel_me_{RUN}"
    err = []

    def canceller():
        try:
            deadline_poll(10, "the sleep running", lambda: ctx.running_anywhere(marker) == 1)
            conn.cancel_safe(timeout=5)
        except Exception as ex:  # noqa: BLE001 - reported below
            err.append(ex)

    t = threading.Thread(target=canceller)
    t.start()
    t0 = time.monotonic()
    ex = raises(e.QueryCanceled, lambda: conn.execute(f"select pg_sleep(30) /* {marker} */"), "pg_sleep")
    t.join(10)
    ensure(not err, f"canceller: {err}")
    ensure(time.monotonic() - t0 < 10, "cancelled promptly")
    ensure("canceling statement due to user request" in str(ex), str(ex))
    ensure(conn.execute("select 1").fetchone() == (1,), "usable after the cancel")


@check("session_end")
def session_cancel_watched_through_the_endpoint(ctx):
    """tests/pq/test_pgconn.py::test_cancel_conn_blocking: another connection to the
    same endpoint sees the running query in pg_stat_activity, then libpq >= 17's
    cancel connection (PQcancelBlocking) stops it."""
    from psycopg import pq

    marker = f"watched_{RUN}"
    pgconn = pq.PGconn.connect(ctx.dsn.encode())
    ensure(pgconn.status == pq.ConnStatus.OK, "connected")
    try:
        pgconn.send_query_params(f"select pg_sleep($1) /* {marker} */".encode(), [b"30"])
        monitor = ctx.connect(autocommit=True)
        deadline_poll(10, "the sleep visible in pg_stat_activity through the endpoint", lambda: monitor.execute(
            "select count(*) from pg_stat_activity where state = 'active' and query like %s"
            " and pid <> pg_backend_pid()",
            [f"%{marker}%"],
        ).fetchone()[0] == 1)
        cancel = pgconn.cancel_conn()
        cancel.blocking()
        ensure(cancel.status == pq.ConnStatus.OK, f"cancel status {cancel.status}")
        res = pgconn.get_result()
        ensure(res is not None, "a result")
        code = res.error_field(pq.DiagnosticField.SQLSTATE)
        ensure(code == b"57014", f"SQLSTATE {code}")
    finally:
        pgconn.finish()


@check("session_end")
def session_ctrl_c(ctx):
    """tests/test_concurrency.py::test_ctrl_c: SIGINT to a client in pg_sleep."""
    marker = f"ctrl_c_{RUN}"
    script = (
        "import psycopg\n"
        f"with psycopg.connect({ctx.dsn!r}) as conn:\n"
        f"    conn.execute('select pg_sleep(60) /* {marker} */')\n"
    )
    proc = subprocess.Popen([sys.executable, "-s", "-c", script], stderr=subprocess.PIPE)
    try:
        deadline_poll(10, "the sleep running", lambda: ctx.running_anywhere(marker) == 1)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            _, stderr = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            raise CheckFailed("the client did not stop within 5 s of SIGINT")
        ensure(b"KeyboardInterrupt" in stderr or b"QueryCanceled" in stderr, stderr.decode()[-300:])
        deadline_poll(5, "the sleep ended on the server", lambda: ctx.running_anywhere(marker) == 0)
        ensure(time.monotonic() - t0 < 5, "stopped promptly")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- target_session_attrs, two-phase commit, temp/unlogged reads -----------


@check("target_session_attrs")
def tsa_read_write(ctx):
    conn = ctx.connect(target_session_attrs="read-write", autocommit=True)
    ensure(conn.execute("select 1").fetchone() == (1,), "select 1")
    (ro,) = conn.execute("show transaction_read_only").fetchone()
    ensure(ro == "off", f"transaction_read_only {ro}")


@check("target_session_attrs")
def tsa_primary(ctx):
    conn = ctx.connect(target_session_attrs="primary", autocommit=True)
    ensure(conn.execute("select 1").fetchone() == (1,), "select 1")


@check("target_session_attrs")
def tsa_read_write_can_write(ctx):
    conn = ctx.connect(target_session_attrs="read-write", autocommit=True)
    t = f"tsa_{RUN}"
    conn.execute(f"create table {t} (x int)")
    conn.execute(f"insert into {t} values (1)")
    conn.execute(f"drop table {t}")


@check("target_session_attrs")
def tsa_read_only_setting_in_autocommit(ctx):
    """tests/test_connection.py::test_set_transaction_param_implicit[read_only-True]:
    the setting read with its name as a parameter, and as a literal."""
    conn = ctx.connect(autocommit=True)
    cur = conn.execute(
        "select current_setting(%s), current_setting(%s)",
        ["transaction_read_only", "default_transaction_read_only"],
    )
    got = cur.fetchone()
    ensure(got == ("off", "off"), f"read-only settings {got}")
    (lit,) = conn.execute("select current_setting('transaction_read_only')").fetchone()
    ensure(lit == "off", f"transaction_read_only {lit}")


@check("two_phase")
def tpc_commit_prepared(ctx):
    """tests/test_tpc.py: tpc_begin / tpc_prepare / tpc_commit, seen in pg_prepared_xacts."""
    conn = ctx.connect()
    t = f"tpc_{RUN}"
    conn.execute(f"create table {t} (data text)")
    conn.commit()
    gid = f"meridian-tpc-{RUN}"
    try:
        conn.tpc_begin(gid)
        conn.execute(f"insert into {t} values ('test_tpc_commit')")
        conn.tpc_prepare()
        ensure(conn.info.transaction_status == pq.TransactionStatus.IDLE, "idle after PREPARE")
        other = ctx.connect(autocommit=True)
        deadline_poll(
            5,
            "the prepared transaction in pg_prepared_xacts",
            lambda: other.execute(
                "select count(*) from pg_prepared_xacts where gid = %s", [gid]
            ).fetchone()[0]
            == 1,
        )
        conn.tpc_commit()
        (n,) = conn.execute(f"select count(*) from {t}").fetchone()
        ensure(n == 1, f"{n} rows after tpc_commit")
        conn.commit()
        (left,) = conn.execute("select count(*) from pg_prepared_xacts where gid = %s", [gid]).fetchone()
        ensure(left == 0, "nothing left prepared")
        conn.commit()
    finally:
        # A fresh connection: conn may be in the middle of the two-phase transaction.
        cleanup(ctx, f"rollback prepared '{gid}'", f"drop table if exists {t}")


@check("two_phase")
def tpc_rollback_prepared_from_other_connection(ctx):
    conn = ctx.connect()
    t = f"tpcr_{RUN}"
    conn.execute(f"create table {t} (data text)")
    conn.commit()
    try:
        xid = conn.xid(2, f"meridian-tpcr-{RUN}", "b")
        conn.tpc_begin(xid)
        conn.execute(f"insert into {t} values ('x')")
        conn.tpc_prepare()
        conn.close()
        other = ctx.connect()
        found = [x for x in other.tpc_recover() if x.gtrid == xid.gtrid]
        ensure(len(found) == 1, f"tpc_recover found {found}")
        other.tpc_rollback(found[0])
        (n,) = other.execute(f"select count(*) from {t}").fetchone()
        ensure(n == 0, f"{n} rows after tpc_rollback")
        other.commit()
    finally:
        cleanup(ctx, f"drop table if exists {t}")


@check("temp_unlogged")
def temp_table_read(ctx):
    conn = ctx.connect(autocommit=True)
    conn.execute("create temp table tt (x int)")
    conn.execute("insert into tt values (1), (2)")
    ensure(conn.execute("select sum(x) from tt").fetchone() == (3,), "sum")
    ensure(conn.execute("select count(*) from pg_temp.tt").fetchone() == (2,), "pg_temp.tt")


@check("temp_unlogged")
def temp_table_read_schema_qualified_create(ctx):
    conn = ctx.connect(autocommit=True)
    conn.execute("create table pg_temp.tq (x int)")
    conn.execute("insert into pg_temp.tq values (5)")
    ensure(conn.execute("select x from tq").fetchone() == (5,), "select from tq")


@check("temp_unlogged")
def temp_table_read_in_transaction(ctx):
    conn = ctx.connect()
    conn.execute("create temp table ttx (x int) on commit preserve rows")
    conn.commit()
    conn.execute("insert into ttx values (1)")
    conn.commit()
    ensure(conn.execute("select count(*) from ttx").fetchone() == (1,), "count")
    conn.commit()


@check("temp_unlogged")
def temp_table_read_in_pipeline(ctx):
    """A read in the same pipeline right after CREATE TEMP TABLE."""
    conn = ctx.connect(autocommit=True)
    with conn.pipeline():
        conn.execute("create temp table tp (x int)")
        conn.execute("insert into tp values (1), (2), (3)")
        cur = conn.execute("select count(*) from tp")
    ensure(cur.fetchone() == (3,), "count in the pipeline")
    with conn.pipeline():
        cur = conn.execute("select sum(x) from tp")
    ensure(cur.fetchone() == (6,), "sum in a later pipeline")


@check("temp_unlogged")
def unlogged_table_read_same_session(ctx):
    conn = ctx.connect(autocommit=True)
    t = f"unl_{RUN}"
    conn.execute(f"create unlogged table {t} (x int)")
    try:
        conn.execute(f"insert into {t} values (1)")
        ensure(conn.execute(f"select count(*) from {t}").fetchone() == (1,), "count")
    finally:
        conn.execute(f"drop table {t}")


@check("temp_unlogged")
def unlogged_table_read_other_session(ctx):
    conn = ctx.connect(autocommit=True)
    t = f"unlo_{RUN}"
    conn.execute(f"create unlogged table {t} (x int)")
    try:
        conn.execute(f"insert into {t} values (1), (2)")
        reader = ctx.connect(autocommit=True)
        ensure(reader.execute(f"select count(*) from {t}").fetchone() == (2,), "count")
        ensure(reader.execute(f"select count(*) from {t}", prepare=True).fetchone() == (2,), "prepared")
    finally:
        conn.execute(f"drop table {t}")


# --- one backend shared by two clients (transaction pooling) ---------------


def isolation(ctx, setup, probe, own_probe):
    """Client a creates session state with `setup` (SQL statements, or a callable taking
    the connection); client b, on the same one-backend pool, must never see it through
    `probe` (SQL answering true when visible): neither while a holds it (b either runs on
    another backend or waits for a's pinned one) nor after a leaves. a keeps seeing its
    own state through `own_probe` (SQL, or a callable returning true)."""
    a = ctx.connect(autocommit=True)
    if callable(setup):
        setup(a)
    else:
        for sql in setup:
            a.execute(sql)
    answer, error = [], []

    def run_b():
        # b connects here too: a proxy may hold b's login until a backend is free.
        try:
            b = ctx.connect(autocommit=True)
            answer.append(b.execute(probe, prepare=False).fetchone()[0])
        except Exception as ex:  # noqa: BLE001 - reported below
            error.append(ex)

    t = threading.Thread(target=run_b)
    t.start()
    # A leak shows at once; a correct proxy may also hold b until a leaves.
    t.join(1.0)
    early = None if t.is_alive() else (answer[:1] or error[:1])
    ensure(not (early and early[0] is True), "b sees a's state while a is connected")
    if callable(own_probe):
        mine = own_probe(a)
    else:
        (mine,) = a.execute(own_probe, prepare=False).fetchone()
    ensure(mine is True, "a no longer sees its own state")
    a.close()
    t.join(10)
    ensure(not t.is_alive(), "b got no answer within 10 s of a leaving")
    ensure(not error, f"b: {error[:1]}")
    ensure(answer == [False], f"b sees a's state after a left: {answer}")


@check("pool_isolation")
def iso_temp_table(ctx):
    q = "select to_regclass('iso_tt') is not null"
    isolation(ctx, ["create temp table iso_tt (x int)"], q, q)


@check("pool_isolation")
def iso_pg_temp_table(ctx):
    q = "select to_regclass('pg_temp.iso_pt') is not null"
    isolation(ctx, ["create table pg_temp.iso_pt (x int)"], q, q)


@check("pool_isolation")
def iso_temp_view(ctx):
    q = "select to_regclass('iso_tv') is not null"
    isolation(ctx, ["create temp view iso_tv as select 1 as x"], q, q)


@check("pool_isolation")
def iso_temp_sequence(ctx):
    q = "select to_regclass('iso_ts') is not null"
    isolation(ctx, ["create temp sequence iso_ts"], q, q)


@check("pool_isolation")
def iso_pg_temp_type(ctx):
    q = "select to_regtype('pg_temp.iso_ty') is not null"
    isolation(ctx, ["create type pg_temp.iso_ty as (a int, b text)"], q, q)


@check("pool_isolation")
def iso_pg_temp_domain(ctx):
    q = "select to_regtype('pg_temp.iso_dom') is not null"
    isolation(ctx, ["create domain pg_temp.iso_dom as int check (value > 0)"], q, q)


@check("pool_isolation")
def iso_pg_temp_function(ctx):
    q = "select to_regprocedure('pg_temp.iso_fn()') is not null"
    isolation(ctx, ["create function pg_temp.iso_fn() returns int language sql as 'select 1'"], q, q)


@check("pool_isolation")
def iso_sql_prepare(ctx):
    q = "select count(*) > 0 from pg_prepared_statements where name = 'iso_prep'"
    isolation(ctx, ["prepare iso_prep as select 1"], q, q)


@check("pool_isolation")
def iso_protocol_prepared_statement(ctx):
    text = "select 'iso-proto-marker'::text"

    def prepare(a):
        a.prepare_threshold = 0
        a.execute(text, prepare=True)

    def reuse(a):
        return a.execute(text, prepare=True).fetchone() == ("iso-proto-marker",)

    q = "select count(*) > 0 from pg_prepared_statements where statement like '%iso-proto-marker%'"
    isolation(ctx, prepare, q, reuse)


@check("pool_isolation")
def iso_cursor_with_hold(ctx):
    q = "select count(*) > 0 from pg_cursors where name = 'iso_cur'"
    isolation(ctx, ["declare iso_cur cursor with hold for select generate_series(1, 10)"], q, q)


@check("pool_isolation")
def iso_advisory_lock(ctx):
    q = ("select count(*) > 0 from pg_locks where locktype = 'advisory'"
         " and objid = 4243 and pid = pg_backend_pid()")
    isolation(ctx, ["select pg_advisory_lock(4243)"], q, q)


@check("pool_isolation")
def iso_listen(ctx):
    q = "select count(*) > 0 from pg_listening_channels() c where c = 'iso_ch'"
    isolation(ctx, ["listen iso_ch"], q, q)


@check("pool_isolation")
def iso_set_role(ctx):
    setup = ctx.connect(autocommit=True)
    setup.execute(
        "do $$ begin create role iso_role; exception when duplicate_object then null; end $$"
    )
    setup.close()
    q = "select current_user = 'iso_role'"
    isolation(ctx, ["set role iso_role"], q, q)


@check("pool_isolation")
def iso_session_set(ctx):
    q = "select current_setting('work_mem') = '7777kB'"
    isolation(ctx, ["set work_mem = '7777kB'"], q, q)


@check("pool_isolation")
def iso_search_path(ctx):
    q = "select current_setting('search_path') = 'iso_schema, public'"
    isolation(ctx, ["set search_path = iso_schema, public"], q, q)


# --- runner ----------------------------------------------------------------


def on_alarm(signum, frame):
    raise CheckTimeout(f"no result within {CHECK_TIMEOUT} s")


def run_check(ctx, fn):
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(CHECK_TIMEOUT)
    try:
        for i in range(fn.repeat):
            try:
                fn(ctx)
            except CheckFailed as ex:
                raise CheckFailed(f"{ex} (run {i + 1} of {fn.repeat})" if fn.repeat > 1 else str(ex))
            finally:
                ctx.close_all()
        return None
    except CheckFailed as ex:
        return str(ex)
    except CheckTimeout as ex:
        return f"hang: {ex}"
    except Exception as ex:  # noqa: BLE001 - every error is a failed check
        tb = traceback.extract_tb(ex.__traceback__)
        where = next((f"line {f.lineno}" for f in reversed(tb) if f.filename == __file__), "")
        return f"{type(ex).__module__}.{type(ex).__name__}: {ex} ({where})".replace("\n", " | ")
    finally:
        signal.alarm(0)
        ctx.close_all()


def main(argv):
    if len(argv) < 3 or any(g not in GROUPS for g in argv[2:]):
        print(f"usage: {argv[0]} DSN GROUP... (groups: {' '.join(GROUPS)})", file=sys.stderr)
        return 2
    dsn = argv[1]
    print(f"# psycopg {psycopg.__version__}, libpq {pq.version()}, impl {pq.__impl__}", flush=True)
    failed = passed = 0
    for group in argv[2:]:
        for fn in GROUPS[group]:
            reason = run_check(Ctx(dsn), fn)
            if reason is None:
                passed += 1
                print(f"ok {fn.__name__}", flush=True)
            else:
                failed += 1
                print(f"FAIL {fn.__name__}: {reason}", flush=True)
    print(f"# summary: {passed} ok, {failed} FAIL", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
