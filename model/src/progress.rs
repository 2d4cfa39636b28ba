//! Progress for long work: an indicatif bar on a terminal, plain lines otherwise
//! (so CI logs show progress without control characters); and the peak memory
//! the reports of long work give.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::Instant;

/// A progress reporter for `len` steps of one task.
pub struct Progress {
    bar: Option<ProgressBar>,
    name: String,
    len: u64,
    start: Instant,
}

impl Progress {
    /// Starts reporting on stderr.
    pub fn new(len: u64, name: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(len);
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b.set_prefix(name.to_owned());
            b
        });
        Progress {
            bar,
            name: name.to_owned(),
            len,
            start: Instant::now(),
        }
    }

    /// Marks `done` steps finished, with a short status message.
    pub fn set(&mut self, done: u64, msg: &str) {
        match &self.bar {
            Some(b) => {
                b.set_position(done);
                b.set_message(msg.to_owned());
            }
            None => eprintln!(
                "{} {done}/{} {msg} ({:.1}s)",
                self.name,
                self.len,
                self.start.elapsed().as_secs_f64()
            ),
        }
    }

    /// Clears the bar.
    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}

/// Peak resident memory of this process (Linux `VmHWM`), mapped weight pages included.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
