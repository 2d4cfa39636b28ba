//! Leases on shared stages: one shard computes a stage, the others wait for it.
//!
//! Shards of one recipe share `OUT/.stages/` on a shared filesystem. A stage's
//! output appears there only when finished (a rename), so correctness never
//! depends on the lease: two shards computing the same stage write identical
//! bytes and the first rename wins. The lease only saves the work: before
//! computing stage KEY a shard takes `KEY.lease`, and a shard that finds it
//! held waits for `KEY/` to appear instead of computing it again.
//!
//! NFS-like filesystems do not make `flock` reliable, so the lease is taken by
//! an atomic create: the holder writes its record to a private file and
//! hard-links it to `KEY.lease`, which fails when the name exists (`link` is
//! atomic on NFS, as `open(2)` recommends for lock files there); where hard
//! links are not supported, by an exclusive create (`O_EXCL`). The holder
//! renews the record (a heartbeat counter) every [`LeaseTimes::beat`] by writing
//! a new file and renaming it over the lease. A waiter never compares clocks
//! across hosts: it takes the lease over when the record has not changed for
//! [`LeaseTimes::stale`] by its own clock, or at once when the holder ran on the
//! waiter's host and its process is gone (a requeued task on the same node).
//! Taking over renames the stale lease away (only one waiter's rename can
//! succeed) and then takes the lease as usual. A holder whose lease was taken
//! over (its heartbeat was late, not its process dead) says so and finishes;
//! the first of the two to finish is kept.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often a holder renews its lease and when a waiter gives up on a holder.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTimes {
    /// Interval between heartbeats.
    pub beat: Duration,
    /// A lease unchanged for this long (by the waiter's clock) is stale.
    pub stale: Duration,
}

impl LeaseTimes {
    /// 10 s heartbeats, stale after 120 s; `COMPRESS_LEASE_BEAT_S` and
    /// `COMPRESS_LEASE_STALE_S` (seconds, fractions allowed) override them.
    pub fn from_env() -> Result<LeaseTimes> {
        let read = |name: &str, default: f64| -> Result<Duration> {
            match std::env::var(name) {
                Err(_) => Ok(Duration::from_secs_f64(default)),
                Ok(v) => {
                    let s: f64 = v
                        .trim()
                        .parse()
                        .ok()
                        .filter(|s: &f64| *s > 0.0 && s.is_finite())
                        .with_context(|| {
                            format!("{name}={v}: expected a positive number of seconds")
                        })?;
                    Ok(Duration::from_secs_f64(s))
                }
            }
        };
        let times = LeaseTimes {
            beat: read("COMPRESS_LEASE_BEAT_S", 10.0)?,
            stale: read("COMPRESS_LEASE_STALE_S", 120.0)?,
        };
        if times.stale < times.beat * 3 {
            anyhow::bail!(
                "COMPRESS_LEASE_STALE_S ({:.1}s) must be at least three heartbeats ({:.1}s each)",
                times.stale.as_secs_f64(),
                times.beat.as_secs_f64()
            );
        }
        Ok(times)
    }
}

/// Who holds a lease: written into the lease file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// Host name.
    pub host: String,
    /// Process id on that host.
    pub pid: u32,
    /// The holder's `--shard` (None: an unsharded run).
    pub shard: Option<String>,
    /// The Slurm array task (`JOBID_TASK`) or job id, when run under Slurm.
    pub slurm: Option<String>,
    /// The job and stage it computes.
    pub job: String,
    /// The stage's label.
    pub stage: String,
    /// Unique per acquisition (host, pid and the time it was taken).
    pub token: String,
    /// Heartbeat counter.
    #[serde(default)]
    pub beat: u64,
}

impl Holder {
    /// This process as the holder of `stage` of `job`.
    pub fn me(host: &str, shard: Option<&str>, job: &str, stage: &str) -> Holder {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let slurm = match (
            std::env::var("SLURM_ARRAY_JOB_ID"),
            std::env::var("SLURM_ARRAY_TASK_ID"),
        ) {
            (Ok(j), Ok(t)) => Some(format!("{j}_{t}")),
            _ => std::env::var("SLURM_JOB_ID").ok(),
        };
        Holder {
            host: host.to_owned(),
            pid: std::process::id(),
            shard: shard.map(String::from),
            slurm,
            job: job.to_owned(),
            stage: stage.to_owned(),
            token: format!("{host}-{}-{nanos}", std::process::id()),
            beat: 0,
        }
    }

    /// `shard 2/7 (host n1, pid 4242, slurm 17_1)`, for logs.
    pub fn describe(&self) -> String {
        let mut s = match &self.shard {
            Some(sh) => format!("shard {sh} "),
            None => "a run ".to_owned(),
        };
        s.push_str(&format!("(host {}, pid {}", self.host, self.pid));
        if let Some(j) = &self.slurm {
            s.push_str(&format!(", slurm {j}"));
        }
        s.push(')');
        s
    }
}

/// The outcome of [`try_acquire`].
pub enum Attempt {
    /// This process holds the lease until the [`Lease`] is dropped.
    Acquired(Lease),
    /// Another holds it: its record (None while it is unreadable) and the raw
    /// text, which [`Watch`] compares between polls.
    Held(Option<Holder>, String),
}

/// `KEY.lease` beside the stage folder `KEY`.
pub fn lease_path(stage_dir: &Path) -> PathBuf {
    let mut name = stage_dir.file_name().unwrap_or_default().to_os_string();
    name.push(".lease");
    stage_dir.with_file_name(name)
}

fn private_name(path: &Path, what: &str, holder: &Holder) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{what}-{}-{}", holder.host, holder.pid));
    path.with_file_name(name)
}

/// Writes `holder` to a private file and renames it to `to` (replacing it).
fn write_record(path: &Path, holder: &Holder, to: &Path) -> Result<()> {
    let tmp = private_name(path, "new", holder);
    std::fs::write(&tmp, serde_json::to_vec(holder)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, to)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), to.display()))
}

/// Tries to take the lease at `path` for `holder`; an error means the
/// filesystem cannot make leases (the caller computes without one).
pub fn try_acquire(path: &Path, holder: &Holder, times: LeaseTimes) -> Result<Attempt> {
    let tmp = private_name(path, "take", holder);
    std::fs::write(&tmp, serde_json::to_vec(holder)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    let taken = match linked {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            // A file system without hard links: an exclusive create (O_EXCL,
            // atomic on local file systems and NFS v3+), then the record; a
            // waiter reading it half-written sees a record that changes, which
            // counts as a heartbeat.
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .and_then(|mut f| {
                    use std::io::Write;
                    f.write_all(&serde_json::to_vec(holder)?)
                })
        }
        other => other,
    };
    match taken {
        Ok(()) => Ok(Attempt::Acquired(Lease::start(path, holder.clone(), times))),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let raw = std::fs::read_to_string(path).unwrap_or_default();
            Ok(Attempt::Held(serde_json::from_str(&raw).ok(), raw))
        }
        Err(e) => Err(e).with_context(|| format!("cannot create the lease {}", path.display())),
    }
}

/// A held lease: renewed by a thread until dropped, then removed.
pub struct Lease {
    path: PathBuf,
    token: String,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    lost: Arc<Mutex<Option<String>>>,
}

impl Lease {
    fn start(path: &Path, mut holder: Holder, times: LeaseTimes) -> Lease {
        let (stop, stopped) = mpsc::channel::<()>();
        let lost = Arc::new(Mutex::new(None));
        let (lease_path, lost_by_thread, token) =
            (path.to_path_buf(), lost.clone(), holder.token.clone());
        let thread = std::thread::spawn(move || loop {
            match stopped.recv_timeout(times.beat) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            // Missing for a moment: a waiter is checking it (see `take_over`).
            let Ok(text) = std::fs::read_to_string(&lease_path) else {
                continue;
            };
            let current: Option<Holder> = serde_json::from_str(&text).ok();
            if current.as_ref().map(|h| &h.token) != Some(&holder.token) {
                let by = current.map_or("nobody".to_owned(), |h| h.describe());
                *lost_by_thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!(
                    "the lease {} was taken over by {by} (a heartbeat of ours came late); \
                     both compute the stage and the first to finish is kept",
                    lease_path.display()
                ));
                return;
            }
            holder.beat += 1;
            // A failed heartbeat only risks a takeover, which is safe.
            let _ = write_record(&lease_path, &holder, &lease_path);
        });
        Lease {
            path: path.to_path_buf(),
            token,
            stop: Some(stop),
            thread: Some(thread),
            lost,
        }
    }

    /// Set when another process took the lease over while this one held it.
    pub fn lost(&self) -> Option<String> {
        self.lost.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let ours = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|t| serde_json::from_str::<Holder>(&t).ok())
            .is_some_and(|h| h.token == self.token);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A waiter's view of a held lease: when its record last changed.
pub struct Watch {
    raw: String,
    since: Instant,
}

impl Watch {
    /// Starts watching the record `raw`.
    pub fn new(raw: &str) -> Watch {
        Watch {
            raw: raw.to_owned(),
            since: Instant::now(),
        }
    }

    /// Why the lease is stale (None: the holder is alive as far as we can tell).
    pub fn stale(
        &mut self,
        holder: Option<&Holder>,
        raw: &str,
        my_host: &str,
        times: LeaseTimes,
    ) -> Option<String> {
        if let Some(h) = holder {
            if h.host == my_host
                && h.pid != std::process::id()
                && !model::io::process_running(h.pid)
            {
                return Some(format!("its process {} on this host is gone", h.pid));
            }
        }
        if raw != self.raw {
            self.raw = raw.to_owned();
            self.since = Instant::now();
            return None;
        }
        let quiet = self.since.elapsed();
        (quiet >= times.stale).then(|| format!("no heartbeat for {:.0}s", quiet.as_secs_f64()))
    }
}

/// Moves a stale lease out of the way so it can be taken; false when another
/// waiter moved it first, the holder finished, or the lease changed since it
/// was judged stale (`observed`): a fresh lease moved by mistake is put back.
pub fn take_over(path: &Path, me: &Holder, observed: &str) -> Result<bool> {
    let aside = private_name(path, "stale", me);
    match std::fs::rename(path, &aside) {
        Ok(()) => {
            let moved = std::fs::read_to_string(&aside).unwrap_or_default();
            let stale = moved == observed;
            if !stale {
                // Fails only if someone took the name meanwhile, which is as good.
                let _ = std::fs::hard_link(&aside, path);
            }
            let _ = std::fs::remove_file(&aside);
            Ok(stale)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot move the stale lease {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn times(beat_ms: u64, stale_ms: u64) -> LeaseTimes {
        LeaseTimes {
            beat: Duration::from_millis(beat_ms),
            stale: Duration::from_millis(stale_ms),
        }
    }

    fn holder(host: &str, pid: u32, shard: &str) -> Holder {
        Holder {
            host: host.into(),
            pid,
            shard: Some(shard.into()),
            slurm: None,
            job: "m/v".into(),
            stage: "stage 1 quantize".into(),
            token: format!("{host}-{pid}-{shard}"),
            beat: 0,
        }
    }

    #[test]
    fn one_of_many_takes_the_lease_and_it_is_removed_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.lease");
        let t = times(20, 200);
        let a = try_acquire(&path, &holder("h", 1, "1/2"), t).unwrap();
        let Attempt::Acquired(lease) = a else {
            panic!("the first attempt must take the lease")
        };
        match try_acquire(&path, &holder("h", 2, "2/2"), t).unwrap() {
            Attempt::Held(Some(h), _) => assert_eq!(h.shard.as_deref(), Some("1/2")),
            _ => panic!("the second attempt must see the first holder"),
        }
        drop(lease);
        assert!(!path.exists());
        // Only the lease itself remains between attempts: no private files left.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_beating_holder_is_never_stale_and_a_silent_one_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.lease");
        let t = times(20, 150);
        let Attempt::Acquired(lease) = try_acquire(&path, &holder("other", 7, "1/2"), t).unwrap()
        else {
            panic!()
        };
        let me = holder("mine", 9, "2/2");
        let raw = std::fs::read_to_string(&path).unwrap();
        let mut watch = Watch::new(&raw);
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(500) {
            let raw = std::fs::read_to_string(&path).unwrap();
            let h: Holder = serde_json::from_str(&raw).unwrap();
            assert_eq!(watch.stale(Some(&h), &raw, &me.host, t), None);
            std::thread::sleep(Duration::from_millis(10));
        }
        let beats: Holder = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert!(beats.beat >= 5, "{beats:?}");
        // The holder's process freezes: its record stops changing, and the lease
        // goes stale after `stale` by the waiter's clock.
        lease.stop.as_ref().unwrap().send(()).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let raw = std::fs::read_to_string(&path).unwrap();
        let mut watch = Watch::new(&raw);
        assert_eq!(watch.stale(None, &raw, &me.host, t), None);
        std::thread::sleep(Duration::from_millis(200));
        let why = watch.stale(None, &raw, &me.host, t).expect("stale");
        assert!(why.contains("no heartbeat"), "{why}");
        // Two waiters race to take over: exactly one moves the lease away.
        let won: Vec<bool> = [holder("mine", 9, "2/2"), holder("mine", 10, "3/3")]
            .iter()
            .map(|w| take_over(&path, w, &raw).unwrap())
            .collect();
        assert_eq!(won, [true, false]);
        // A waiter that judged the old record stale does not move a new one.
        let newer = holder("third", 11, "1/3");
        std::fs::write(&path, serde_json::to_vec(&newer).unwrap()).unwrap();
        assert!(!take_over(&path, &me, &raw).unwrap());
        let back: Holder = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(back, newer);
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            try_acquire(&path, &me, t).unwrap(),
            Attempt::Acquired(_)
        ));
        drop(lease);
    }

    #[test]
    fn a_holder_gone_from_this_host_is_stale_at_once_and_learns_it_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.lease");
        let t = times(20, 60_000);
        // No process has pid u32::MAX (Linux pids stop at 2^22).
        let dead = holder("here", u32::MAX, "1/2");
        std::fs::write(&path, serde_json::to_vec(&dead).unwrap()).unwrap();
        let raw = std::fs::read_to_string(&path).unwrap();
        let mut watch = Watch::new(&raw);
        let why = watch.stale(Some(&dead), &raw, "here", t).expect("stale");
        assert!(why.contains("is gone"), "{why}");
        // On another host the pid cannot be checked: only the heartbeat decides.
        assert_eq!(watch.stale(Some(&dead), &raw, "elsewhere", t), None);

        // A live holder whose lease is taken over says so.
        std::fs::remove_file(&path).unwrap();
        let Attempt::Acquired(lease) = try_acquire(&path, &holder("a", 1, "1/2"), t).unwrap()
        else {
            panic!()
        };
        let raw = std::fs::read_to_string(&path).unwrap();
        assert!(take_over(&path, &holder("b", 2, "2/2"), &raw).unwrap());
        let Attempt::Acquired(theirs) = try_acquire(&path, &holder("b", 2, "2/2"), t).unwrap()
        else {
            panic!()
        };
        std::thread::sleep(Duration::from_millis(100));
        let lost = lease.lost().expect("the first holder must notice");
        assert!(
            lost.contains("taken over by shard 2/2 (host b, pid 2)"),
            "{lost}"
        );
        drop(lease);
        // The loser does not remove the winner's lease.
        assert!(path.exists());
        drop(theirs);
        assert!(!path.exists());
    }
}
