// Checks of the PostgreSQL JDBC driver (Debian's libpostgresql-jdbc-java)
// against one PostgreSQL endpoint: the server directly, or meridian-pgproxy in
// front of it.
//
//   java -cp DIR:/usr/share/java/postgresql.jar JdbcChecks JDBC_URL GROUP [GROUP ...]
//
// Prints one line per check, `ok NAME` or `FAIL NAME: reason`, then a summary
// line; exits 1 if any check failed (2 on a usage error). Each check opens its
// own connection, names its tables with this process's id and is bounded by
// CHECK_TIMEOUT_S (socketTimeout on the connection), so a hang costs one check.

import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.nio.charset.StandardCharsets;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;

import org.postgresql.PGConnection;
import org.postgresql.PGStatement;
import org.postgresql.copy.CopyManager;

public final class JdbcChecks {
    static final int CHECK_TIMEOUT_S = 20;
    static final long RUN = ProcessHandle.current().pid();

    interface Check {
        void run(Connection c) throws Exception;
    }

    static final class CheckFailed extends Exception {
        CheckFailed(String what) {
            super(what);
        }
    }

    static void ensure(boolean cond, String what) throws CheckFailed {
        if (!cond) {
            throw new CheckFailed(what);
        }
    }

    static long scalar(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery(sql)) {
            rs.next();
            return rs.getLong(1);
        }
    }

    static void exec(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement()) {
            s.execute(sql);
        }
    }

    /** Past prepareThreshold (5) executions the driver switches to a named server-side statement. */
    static void preparedPastThreshold(Connection c) throws Exception {
        try (PreparedStatement ps = c.prepareStatement("SELECT ?::int * 3, ?::text || 'x'")) {
            PGStatement pg = ps.unwrap(PGStatement.class);
            ensure(pg.getPrepareThreshold() == 5, "prepareThreshold " + pg.getPrepareThreshold());
            for (int i = 0; i < 12; i++) {
                ps.setInt(1, i);
                ps.setString(2, "v" + i);
                try (ResultSet rs = ps.executeQuery()) {
                    ensure(rs.next(), "a row at run " + i);
                    ensure(rs.getInt(1) == i * 3 && rs.getString(2).equals("v" + i + "x"),
                            "run " + i + ": " + rs.getInt(1) + " " + rs.getString(2));
                }
                if (i == 2) {
                    ensure(!pg.isUseServerPrepare(), "server-side prepare before the threshold");
                }
            }
            ensure(pg.isUseServerPrepare(), "server-side prepare after the threshold");
        }
    }

    /** The same inside a transaction, interleaved with another statement. */
    static void preparedInTransaction(Connection c) throws Exception {
        String t = "jdbc_ptx_" + RUN;
        exec(c, "CREATE TABLE " + t + " (id int primary key, v text)");
        try {
            c.setAutoCommit(false);
            try (PreparedStatement ins = c.prepareStatement("INSERT INTO " + t + " VALUES (?, ?)");
                 PreparedStatement sel = c.prepareStatement("SELECT v FROM " + t + " WHERE id = ?")) {
                for (int i = 0; i < 10; i++) {
                    ins.setInt(1, i);
                    ins.setString(2, "r" + i);
                    ensure(ins.executeUpdate() == 1, "insert " + i);
                    sel.setInt(1, i);
                    try (ResultSet rs = sel.executeQuery()) {
                        ensure(rs.next() && rs.getString(1).equals("r" + i), "select " + i);
                    }
                }
                ensure(ins.unwrap(PGStatement.class).isUseServerPrepare(), "insert is server-prepared");
            }
            c.commit();
            c.setAutoCommit(true);
            ensure(scalar(c, "SELECT count(*) FROM " + t) == 10, "committed rows");
        } finally {
            c.setAutoCommit(true);
            exec(c, "DROP TABLE IF EXISTS " + t);
        }
    }

    static void batchInsert(Connection c) throws Exception {
        String t = "jdbc_batch_" + RUN;
        exec(c, "CREATE TABLE " + t + " (id int primary key, v text)");
        try {
            c.setAutoCommit(false);
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO " + t + " VALUES (?, ?)")) {
                for (int i = 0; i < 1000; i++) {
                    ps.setInt(1, i);
                    ps.setString(2, "é" + i);
                    ps.addBatch();
                }
                int[] counts = ps.executeBatch();
                ensure(counts.length == 1000, counts.length + " counts");
                for (int n : counts) {
                    ensure(n == 1 || n == Statement.SUCCESS_NO_INFO, "count " + n);
                }
            }
            c.commit();
            c.setAutoCommit(true);
            ensure(scalar(c, "SELECT count(*) FROM " + t) == 1000, "rows");
            ensure(scalar(c, "SELECT sum(id) FROM " + t) == 499500, "sum");
        } finally {
            c.setAutoCommit(true);
            exec(c, "DROP TABLE IF EXISTS " + t);
        }
    }

    static void batchWithError(Connection c) throws Exception {
        String t = "jdbc_batche_" + RUN;
        exec(c, "CREATE TABLE " + t + " (id int primary key)");
        try {
            c.setAutoCommit(false);
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO " + t + " VALUES (?)")) {
                for (int i : new int[] {1, 2, 2, 3}) {
                    ps.setInt(1, i);
                    ps.addBatch();
                }
                try {
                    ps.executeBatch();
                    throw new CheckFailed("the duplicate key was not reported");
                } catch (java.sql.BatchUpdateException ex) {
                    ensure("23505".equals(ex.getSQLState()), "SQLSTATE " + ex.getSQLState());
                }
            }
            c.rollback();
            c.setAutoCommit(true);
            ensure(scalar(c, "SELECT count(*) FROM " + t) == 0, "rolled back");
        } finally {
            c.setAutoCommit(true);
            exec(c, "DROP TABLE IF EXISTS " + t);
        }
    }

    /** setFetchSize inside a transaction: a portal read 50 rows per Execute. */
    static void fetchSizeCursor(Connection c) throws Exception {
        c.setAutoCommit(false);
        try (PreparedStatement ps = c.prepareStatement(
                "SELECT g, repeat('z', 100) FROM generate_series(1, ?) g")) {
            ps.setFetchSize(50);
            ps.setInt(1, 5000);
            long sum = 0;
            int n = 0;
            try (ResultSet rs = ps.executeQuery()) {
                while (rs.next()) {
                    sum += rs.getInt(1);
                    n++;
                    if (n == 75) {
                        // Another statement while the portal is open (same transaction).
                        ensure(scalar(c, "SELECT 7") == 7, "statement between fetches");
                    }
                }
            }
            ensure(n == 5000 && sum == 5000L * 5001 / 2, n + " rows, sum " + sum);
            c.commit();
        } finally {
            c.setAutoCommit(true);
        }
    }

    static void copyInOut(Connection c) throws Exception {
        String t = "jdbc_copy_" + RUN;
        exec(c, "CREATE TABLE " + t + " (id int, name text, note text)");
        try {
            CopyManager cm = c.unwrap(PGConnection.class).getCopyAPI();
            StringBuilder in = new StringBuilder();
            for (int i = 1; i <= 3000; i++) {
                in.append(i).append('\t').append("nämé-").append(i).append('\t')
                        .append(i % 10 == 0 ? "\\N" : "tab\\there").append('\n');
            }
            byte[] data = in.toString().getBytes(StandardCharsets.UTF_8);
            long copied = cm.copyIn("COPY " + t + " FROM STDIN", new ByteArrayInputStream(data));
            ensure(copied == 3000, "copied in " + copied);
            ByteArrayOutputStream out = new ByteArrayOutputStream();
            long back = cm.copyOut("COPY (SELECT * FROM " + t + " ORDER BY id) TO STDOUT", out);
            ensure(back == 3000, "copied out " + back);
            ensure(new String(out.toByteArray(), StandardCharsets.UTF_8).equals(in.toString()),
                    "the text round trips byte for byte");
            ensure(scalar(c, "SELECT count(*) FROM " + t + " WHERE note IS NULL") == 300, "NULLs");
        } finally {
            exec(c, "DROP TABLE IF EXISTS " + t);
        }
    }

    static final Map<String, Map<String, Check>> GROUPS = new LinkedHashMap<>();

    static {
        Map<String, Check> g = new LinkedHashMap<>();
        g.put("prepared_past_threshold", JdbcChecks::preparedPastThreshold);
        g.put("prepared_in_transaction", JdbcChecks::preparedInTransaction);
        g.put("batch_insert", JdbcChecks::batchInsert);
        g.put("batch_with_error", JdbcChecks::batchWithError);
        g.put("fetch_size_cursor", JdbcChecks::fetchSizeCursor);
        g.put("copy_in_out", JdbcChecks::copyInOut);
        GROUPS.put("jdbc", g);
    }

    static String oneLine(Throwable ex) {
        String where = "";
        for (StackTraceElement e : ex.getStackTrace()) {
            if (e.getClassName().startsWith("JdbcChecks")) {
                where = " (line " + e.getLineNumber() + ")";
                break;
            }
        }
        String state = ex instanceof SQLException ? " [" + ((SQLException) ex).getSQLState() + "]" : "";
        return (ex.getClass().getName() + state + ": " + ex.getMessage() + where).replace('\n', ' ');
    }

    public static void main(String[] args) throws Exception {
        if (args.length < 2) {
            System.err.println("usage: JdbcChecks JDBC_URL GROUP... (groups: " + GROUPS.keySet() + ")");
            System.exit(2);
        }
        List<String> groups = new ArrayList<>();
        for (int i = 1; i < args.length; i++) {
            if (!GROUPS.containsKey(args[i])) {
                System.err.println("unknown group " + args[i]);
                System.exit(2);
            }
            groups.add(args[i]);
        }
        Properties props = new Properties();
        props.setProperty("socketTimeout", Integer.toString(CHECK_TIMEOUT_S));
        props.setProperty("connectTimeout", "10");
        System.out.println("# pgjdbc " + org.postgresql.util.DriverInfo.DRIVER_VERSION
                + ", java " + System.getProperty("java.version"));
        int passed = 0;
        int failed = 0;
        for (String group : groups) {
            for (Map.Entry<String, Check> e : GROUPS.get(group).entrySet()) {
                String reason = null;
                try (Connection c = DriverManager.getConnection(args[0], props)) {
                    e.getValue().run(c);
                } catch (CheckFailed ex) {
                    reason = ex.getMessage();
                } catch (Exception ex) {
                    reason = oneLine(ex);
                }
                if (reason == null) {
                    passed++;
                    System.out.println("ok " + e.getKey());
                } else {
                    failed++;
                    System.out.println("FAIL " + e.getKey() + ": " + reason);
                }
                System.out.flush();
            }
        }
        System.out.println("# summary: " + passed + " ok, " + failed + " FAIL");
        System.exit(failed > 0 ? 1 : 0);
    }
}
