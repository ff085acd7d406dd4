//! Pure parsers for what PostgreSQL leaves on disk about a data directory: the
//! output of `pg_controldata` (cluster state, timeline, checkpoint position,
//! whether pg_rewind will work) and the `postmaster.pid` lock file (pid, port,
//! readiness status).
//!
//! Both are parsed from text so the agent can decide (rewind or re-clone,
//! adopt a running postmaster or start one) without running anything. The
//! `pg_controldata` labels are those of PostgreSQL 12–17 in the C locale; the
//! caller must run it with `LC_ALL=C`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use meridian_shared::lsn::Lsn;

use super::PgError;

/// `Database cluster state` from `pg_controldata`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterState {
    /// `starting up`
    StartingUp,
    /// `shut down`: a clean primary shutdown (pg_rewind's precondition).
    ShutDown,
    /// `shut down in recovery`: a clean standby shutdown.
    ShutDownInRecovery,
    /// `shutting down`
    ShuttingDown,
    /// `in crash recovery`
    InCrashRecovery,
    /// `in archive recovery`: a running (or crashed) standby.
    InArchiveRecovery,
    /// `in production`: a running (or crashed) primary.
    InProduction,
    /// A label this parser does not know.
    Other(String),
}

impl ClusterState {
    fn parse(s: &str) -> ClusterState {
        match s {
            "starting up" => ClusterState::StartingUp,
            "shut down" => ClusterState::ShutDown,
            "shut down in recovery" => ClusterState::ShutDownInRecovery,
            "shutting down" => ClusterState::ShuttingDown,
            "in crash recovery" => ClusterState::InCrashRecovery,
            "in archive recovery" => ClusterState::InArchiveRecovery,
            "in production" => ClusterState::InProduction,
            other => ClusterState::Other(other.to_owned()),
        }
    }

    /// Whether the last shutdown was clean (no crash recovery needed).
    pub fn is_clean_shutdown(&self) -> bool {
        matches!(
            self,
            ClusterState::ShutDown | ClusterState::ShutDownInRecovery
        )
    }
}

/// The fields of `pg_controldata` Meridian decides on; every other line is in
/// [`ControlData::raw`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlData {
    /// `Database system identifier`: equal on a primary and its physical replicas.
    pub system_identifier: u64,
    /// `Database cluster state`
    pub state: ClusterState,
    /// `Latest checkpoint location`
    pub checkpoint_lsn: Lsn,
    /// `Latest checkpoint's REDO location`
    pub redo_lsn: Lsn,
    /// `Latest checkpoint's TimeLineID`
    pub timeline: u32,
    /// `Minimum recovery ending location`
    pub min_recovery_end_lsn: Lsn,
    /// `Data page checksum version` is not 0.
    pub data_checksums: bool,
    /// `wal_log_hints setting` is `on`.
    pub wal_log_hints: bool,
    /// Every `label: value` line, trimmed.
    pub raw: BTreeMap<String, String>,
}

impl ControlData {
    /// Whether `pg_rewind` can work on this data directory (hint bits WAL-logged).
    pub fn rewindable(&self) -> bool {
        self.data_checksums || self.wal_log_hints
    }

    /// Parses the output of `pg_controldata` (C locale).
    pub fn parse(text: &str) -> Result<ControlData, PgError> {
        let raw: BTreeMap<String, String> = text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let get = |key: &str| -> Result<&str, PgError> {
            raw.get(key)
                .map(String::as_str)
                .ok_or_else(|| PgError::Parse {
                    what: "pg_controldata output",
                    detail: format!("missing {key:?}"),
                })
        };
        let num = |key: &str| -> Result<u64, PgError> {
            let v = get(key)?;
            v.parse().map_err(|_| PgError::Parse {
                what: "pg_controldata output",
                detail: format!("{key:?} is not a number: {v:?}"),
            })
        };
        let lsn = |key: &str| -> Result<Lsn, PgError> { Ok(get(key)?.parse::<Lsn>()?) };
        let timeline = num("Latest checkpoint's TimeLineID")?;
        Ok(ControlData {
            system_identifier: num("Database system identifier")?,
            state: ClusterState::parse(get("Database cluster state")?),
            checkpoint_lsn: lsn("Latest checkpoint location")?,
            redo_lsn: lsn("Latest checkpoint's REDO location")?,
            timeline: u32::try_from(timeline).map_err(|_| PgError::Parse {
                what: "pg_controldata output",
                detail: format!("timeline {timeline} out of range"),
            })?,
            min_recovery_end_lsn: lsn("Minimum recovery ending location")?,
            data_checksums: num("Data page checksum version")? != 0,
            wal_log_hints: get("wal_log_hints setting")? == "on",
            raw,
        })
    }
}

/// The content of `postmaster.pid` (written by a running postmaster, removed
/// on clean shutdown; a stale one survives a crash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostmasterPidFile {
    /// Line 1: the postmaster's pid.
    pub pid: u32,
    /// Line 2: the data directory.
    pub data_dir: PathBuf,
    /// Line 3: start time (Unix seconds).
    pub start_time: u64,
    /// Line 4: the port.
    pub port: u16,
    /// Line 5: the first unix socket directory (empty when none).
    pub socket_dir: String,
    /// Line 6: the first listen address (empty when none).
    pub listen_address: String,
    /// Line 7: the System V shared memory id (second field), once written.
    pub shmem_id: Option<i64>,
    /// Line 8: `starting`, `stopping`, `ready` or `standby`, once written.
    pub status: Option<String>,
}

impl PostmasterPidFile {
    /// Parses `postmaster.pid`. Lines beyond the fourth may be missing while
    /// the postmaster starts.
    pub fn parse(text: &str) -> Result<PostmasterPidFile, PgError> {
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        let bad = |detail: String| PgError::Parse {
            what: "postmaster.pid",
            detail,
        };
        let line = |i: usize| lines.get(i).copied().unwrap_or("");
        let pid = line(0)
            .parse::<u32>()
            .map_err(|_| bad(format!("pid line {:?}", line(0))))?;
        let start_time = line(2)
            .parse::<u64>()
            .map_err(|_| bad(format!("start time line {:?}", line(2))))?;
        let port = line(3)
            .parse::<u16>()
            .map_err(|_| bad(format!("port line {:?}", line(3))))?;
        Ok(PostmasterPidFile {
            pid,
            data_dir: PathBuf::from(line(1)),
            start_time,
            port,
            socket_dir: line(4).to_owned(),
            listen_address: line(5).to_owned(),
            shmem_id: line(6)
                .split_whitespace()
                .nth(1)
                .and_then(|id| id.parse().ok()),
            status: lines
                .get(7)
                .map(|s| (*s).to_owned())
                .filter(|s| !s.is_empty()),
        })
    }
}

/// How many processes are attached to the System V shared memory segment `shmid`, from the
/// text of `/proc/sysvipc/shm`; `None` when the segment is gone. PostgreSQL refuses to start
/// while its old segment has attachments ("pre-existing shared memory block is still in use").
pub fn shm_attachments(sysvipc_shm: &str, shmid: i64) -> Option<u64> {
    sysvipc_shm.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1)?.parse::<i64>().ok()? == shmid).then(|| f.get(6)?.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_attachments() {
        let table = "       key      shmid perms  size  cpid  lpid nattch   uid\n\
                       10018915      32768   600    56  2758  2787      3   101\n\
                       10026866      32769   600    56  2771  2784      0   101\n";
        assert_eq!(shm_attachments(table, 32768), Some(3));
        assert_eq!(shm_attachments(table, 32769), Some(0));
        assert_eq!(shm_attachments(table, 5), None);
        let pid_file =
            "23662\n/data\n1796092000\n5432\n\n127.0.0.1\n  10678270    786610\nready   \n";
        let parsed = PostmasterPidFile::parse(pid_file).unwrap();
        assert_eq!(parsed.shmem_id, Some(786610));
        assert_eq!(parsed.status.as_deref(), Some("ready"));
    }

    const PRIMARY: &str = "\
pg_control version number:            1300
Catalog version number:               202209061
Database system identifier:           7311939839104525000
Database cluster state:               in production
pg_control last modified:             Sat 28 Nov 2026 16:40:01 UTC
Latest checkpoint location:           0/2000060
Latest checkpoint's REDO location:    0/2000028
Latest checkpoint's REDO WAL file:    000000010000000000000002
Latest checkpoint's TimeLineID:       1
Latest checkpoint's PrevTimeLineID:   1
Latest checkpoint's full_page_writes: on
Minimum recovery ending location:     0/0
Min recovery ending loc's timeline:   0
wal_level setting:                    logical
wal_log_hints setting:                on
Data page checksum version:           1
Mock authentication nonce:            4f1c
";

    #[test]
    fn parses_a_primary() {
        let c = ControlData::parse(PRIMARY).unwrap();
        assert_eq!(c.system_identifier, 7_311_939_839_104_525_000);
        assert_eq!(c.state, ClusterState::InProduction);
        assert!(!c.state.is_clean_shutdown());
        assert_eq!(c.checkpoint_lsn, Lsn(0x200_0060));
        assert_eq!(c.redo_lsn, Lsn(0x200_0028));
        assert_eq!(c.timeline, 1);
        assert_eq!(c.min_recovery_end_lsn, Lsn::ZERO);
        assert!(c.data_checksums);
        assert!(c.wal_log_hints);
        assert!(c.rewindable());
        assert_eq!(c.raw["wal_level setting"], "logical");
        // A value containing colons keeps them.
        assert_eq!(
            c.raw["pg_control last modified"],
            "Sat 28 Nov 2026 16:40:01 UTC"
        );
    }

    #[test]
    fn parses_a_cleanly_stopped_standby_on_a_later_timeline() {
        let text = PRIMARY
            .replace("in production", "shut down in recovery")
            .replace("TimeLineID:       1", "TimeLineID:       3")
            .replace(
                "wal_log_hints setting:                on",
                "wal_log_hints setting:                off",
            )
            .replace(
                "checksum version:           1",
                "checksum version:           0",
            );
        let c = ControlData::parse(&text).unwrap();
        assert_eq!(c.state, ClusterState::ShutDownInRecovery);
        assert!(c.state.is_clean_shutdown());
        assert_eq!(c.timeline, 3);
        assert!(!c.rewindable());
    }

    #[test]
    fn unknown_state_is_kept() {
        let text = PRIMARY.replace("in production", "unrecognized status code");
        let c = ControlData::parse(&text).unwrap();
        assert_eq!(
            c.state,
            ClusterState::Other("unrecognized status code".into())
        );
    }

    #[test]
    fn missing_or_garbled_fields_are_errors() {
        let without = PRIMARY
            .lines()
            .filter(|l| !l.starts_with("Latest checkpoint location"))
            .collect::<Vec<_>>()
            .join("\n");
        let err = ControlData::parse(&without).unwrap_err().to_string();
        assert!(err.contains("Latest checkpoint location"), "{err}");
        let garbled = PRIMARY.replace("0/2000060", "zz");
        assert!(ControlData::parse(&garbled).is_err());
        assert!(ControlData::parse("").is_err());
    }

    #[test]
    fn parses_a_ready_pid_file() {
        let text =
            "4242\n/tmp/x/node0\n1795885201\n54321\n\n127.0.0.1\n  1234567     98310\nready   \n";
        let p = PostmasterPidFile::parse(text).unwrap();
        assert_eq!(p.pid, 4242);
        assert_eq!(p.data_dir, PathBuf::from("/tmp/x/node0"));
        assert_eq!(p.start_time, 1_795_885_201);
        assert_eq!(p.port, 54321);
        assert_eq!(p.socket_dir, "");
        assert_eq!(p.listen_address, "127.0.0.1");
        assert_eq!(p.status.as_deref(), Some("ready"));
    }

    #[test]
    fn a_starting_pid_file_has_no_status_yet() {
        let p = PostmasterPidFile::parse("17\n/d\n1\n5432\n").unwrap();
        assert_eq!(p.pid, 17);
        assert_eq!(p.status, None);
        assert!(PostmasterPidFile::parse("x\n/d\n1\n5432\n").is_err());
        assert!(PostmasterPidFile::parse("17\n/d\n").is_err());
    }
}
