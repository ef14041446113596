// An application on HikariCP with the PostgreSQL JDBC driver: a DataSource
// that re-reads the sidecar's file (--format json) whenever Hikari opens a
// connection, and Hikari's own validation (JDBC4 Connection.isValid on
// checkout, which Hikari skips for a connection used in the last 500 ms).
//
//     java HikariPool FILE checked|defaults CONFIG_JSON
//
// `checked` sets maxLifetime as low as Hikari allows (30 s, its floor) and
// a pool no larger than the work needs; `defaults` is Hikari as it comes
// (maxLifetime 30 min). One JSON report line, the shape of pool_run.py's.

import com.zaxxer.hikari.HikariConfig;
import com.zaxxer.hikari.HikariDataSource;
import java.io.PrintWriter;
import java.nio.file.Files;
import java.nio.file.Path;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.Map;
import java.util.Properties;
import java.util.TreeMap;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.atomic.AtomicLong;
import java.util.logging.Logger;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import javax.sql.DataSource;

public class HikariPool {
  /** The flat JSON object the sidecar writes: string, number or null values. */
  static Map<String, String> readCredential(Path file) throws Exception {
    String text = Files.readString(file);
    Map<String, String> m = new TreeMap<>();
    Matcher kv = Pattern.compile("\"(\\w+)\"\\s*:\\s*(?:\"((?:[^\"\\\\]|\\\\.)*)\"|(-?\\d+)|null)").matcher(text);
    while (kv.find()) {
      String v = kv.group(2) != null ? kv.group(2) : kv.group(3);
      if (v != null) m.put(kv.group(1), v.replace("\\/", "/").replace("\\\\", "\\"));
    }
    if (!m.containsKey("lease_id")) throw new IllegalStateException("no lease_id in " + file);
    return m;
  }

  /** Opens each connection with what the file says now. */
  static final class FileDataSource implements DataSource {
    final Path file;
    FileDataSource(Path file) { this.file = file; }

    @Override public Connection getConnection() throws SQLException {
      Map<String, String> c;
      try { c = readCredential(file); } catch (Exception e) { throw new SQLException("read " + file + ": " + e.getMessage()); }
      Properties p = new Properties();
      p.setProperty("user", c.get("username"));
      p.setProperty("password", c.get("password"));
      p.setProperty("connectTimeout", "5");
      if (c.containsKey("sslmode")) p.setProperty("sslmode", c.get("sslmode"));
      if (c.containsKey("sslrootcert")) p.setProperty("sslrootcert", c.get("sslrootcert"));
      String url = "jdbc:postgresql://" + c.get("host") + ":" + c.get("port") + "/" + c.get("database");
      return DriverManager.getConnection(url, p);
    }
    @Override public Connection getConnection(String u, String p) throws SQLException { return getConnection(); }
    @Override public PrintWriter getLogWriter() { return null; }
    @Override public void setLogWriter(PrintWriter out) {}
    @Override public void setLoginTimeout(int seconds) {}
    @Override public int getLoginTimeout() { return 0; }
    @Override public Logger getParentLogger() { return Logger.getGlobal(); }
    @Override public <T> T unwrap(Class<T> c) throws SQLException { throw new SQLException("not a wrapper"); }
    @Override public boolean isWrapperFor(Class<?> c) { return false; }
  }

  static String firstLine(Throwable e) {
    String s = e.getClass().getSimpleName() + ": " + e.getMessage();
    s = s.split("\n")[0];
    return s.length() > 200 ? s.substring(0, 200) : s;
  }

  static String quote(String s) {
    if (s == null) return "null";
    return "\"" + s.replace("\\", "\\\\").replace("\"", "\\\"") + "\"";
  }

  static long intOf(String json, String key) {
    Matcher m = Pattern.compile("\"" + key + "\"\\s*:\\s*(\\d+)").matcher(json);
    if (!m.find()) throw new IllegalArgumentException("config has no " + key);
    return Long.parseLong(m.group(1));
  }

  public static void main(String[] args) throws Exception {
    Path file = Path.of(args[0]);
    boolean checked = args[1].equals("checked");
    String config = args[2];
    int workers = (int) intOf(config, "workers");
    long intervalMs = intOf(config, "interval_ms");
    long handoversWanted = intOf(config, "handovers");
    long tailMs = intOf(config, "tail_s") * 1000;
    long maxMs = intOf(config, "max_s") * 1000;
    long longS = intOf(config, "long_s");

    HikariConfig hc = new HikariConfig();
    hc.setDataSource(new FileDataSource(file));
    if (checked) {
      // Validate on every checkout: by default Hikari skips the check for a
      // connection used in the last 500 ms, and in a handover drain's final
      // third sessions are ended within milliseconds of their going idle
      // (this pool keeps its connections busy, and its 30 s lifetime floor
      // keeps them past the drain).
      System.setProperty("com.zaxxer.hikari.aliveBypassWindowMs", "0");
      hc.setMaximumPoolSize(workers + 2);
      hc.setMaxLifetime(Math.max(30_000L, intOf(config, "max_lifetime_s") * 1000));
    }
    HikariDataSource pool = new HikariDataSource(hc);

    AtomicLong queries = new AtomicLong();
    AtomicLong failed = new AtomicLong();
    Map<String, Long> errors = new ConcurrentHashMap<>();
    Map<String, Object> longReport = new ConcurrentHashMap<>();
    longReport.put("started", false);
    java.util.concurrent.atomic.AtomicBoolean stop = new java.util.concurrent.atomic.AtomicBoolean();

    Runnable worker = () -> {
      while (!stop.get()) {
        try (Connection c = pool.getConnection(); Statement s = c.createStatement();
             ResultSet rs = s.executeQuery("SELECT item FROM orders WHERE id = 1")) {
          rs.next();
          if (!"coffee".equals(rs.getString(1))) throw new SQLException("unexpected row " + rs.getString(1));
          queries.incrementAndGet();
        } catch (Exception e) {
          queries.incrementAndGet();
          failed.incrementAndGet();
          errors.merge(firstLine(e), 1L, Long::sum);
        }
        try { Thread.sleep(intervalMs); } catch (InterruptedException e) { return; }
      }
    };
    Thread[] threads = new Thread[workers];
    for (int i = 0; i < workers; i++) { threads[i] = new Thread(worker); threads[i].start(); }

    // The long query runs on a connection checked out now (as a request
    // handler holds one), so it is a session of the replaced credential
    // that is busy when that lease is handed over.
    Connection held = pool.getConnection();
    long started = System.currentTimeMillis();
    Map<String, String> current = readCredential(file);
    long handovers = 0;
    long lastChange = 0;
    Thread longThread = null;
    while (true) {
      Thread.sleep(25);
      long now = System.currentTimeMillis();
      if (now - started > maxMs) break;
      if (handovers >= handoversWanted && now - lastChange >= tailMs) break;
      Map<String, String> seen;
      try { seen = readCredential(file); } catch (Exception e) { continue; }
      if (!seen.get("lease_id").equals(current.get("lease_id"))) {
        handovers++;
        lastChange = now;
        if (checked) {
          // HikariCP's own way to follow a rotated credential: idle
          // connections of the old one close now, busy ones as they are
          // returned, so none is left for the handover's drain to end
          // between a validation and a query (Hikari's lifetime floor of
          // 30 s would keep them past the drain's final third).
          pool.getHikariPoolMXBean().softEvictConnections();
        }
        if (longThread == null) {
          String oldUser = current.get("username");
          longThread = new Thread(() -> {
            longReport.put("started", true);
            longReport.put("old_user", oldUser);
            long t0 = System.currentTimeMillis();
            try (Connection c = held;
                 PreparedStatement ps = c.prepareStatement("SELECT current_user::text, pg_sleep(?)::text")) {
              ps.setLong(1, longS);
              try (ResultSet rs = ps.executeQuery()) {
                rs.next();
                longReport.put("user", rs.getString(1));
              }
              longReport.put("ok", true);
            } catch (Exception e) {
              longReport.put("ok", false);
              longReport.put("error", firstLine(e));
              errors.merge("long query: " + firstLine(e), 1L, Long::sum);
            }
            longReport.put("seconds", (System.currentTimeMillis() - t0) / 1000.0);
          });
          longThread.start();
        }
        current = seen;
      }
    }
    stop.set(true);
    for (Thread t : threads) t.join();
    if (longThread != null) longThread.join();
    else held.close();
    pool.close();

    StringBuilder out = new StringBuilder();
    out.append("{\"queries\":").append(queries.get())
        .append(",\"failed\":").append(failed.get())
        .append(",\"handovers\":").append(handovers)
        .append(",\"errors\":{");
    boolean first = true;
    for (Map.Entry<String, Long> e : new TreeMap<>(errors).entrySet()) {
      if (!first) out.append(",");
      first = false;
      out.append(quote(e.getKey())).append(":").append(e.getValue());
    }
    out.append("},\"long_query\":{");
    first = true;
    for (Map.Entry<String, Object> e : new TreeMap<>(longReport).entrySet()) {
      if (!first) out.append(",");
      first = false;
      Object v = e.getValue();
      out.append(quote(e.getKey())).append(":").append(v instanceof String ? quote((String) v) : String.valueOf(v));
    }
    out.append("},\"elapsed_s\":").append((System.currentTimeMillis() - started) / 1000.0).append("}");
    System.out.println(out);
  }
}
