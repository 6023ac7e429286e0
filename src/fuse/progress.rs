//! Progress of a long fusion: a bar on a terminal, otherwise a log line every few seconds
//! (so that container logs show that start-up is moving; short fusions log nothing).

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

const LOG_EVERY: Duration = Duration::from_secs(3);

pub struct FuseProgress {
    bar: Option<ProgressBar>,
    total: u64,
    done: u64,
    last_log: Instant,
}

impl FuseProgress {
    /// `total` is the number of input bytes that will be read.
    pub fn new(total: u64, interactive: bool) -> Self {
        let bar = interactive.then(|| {
            let bar = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template(
                "fusing {bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            ) {
                bar.set_style(style);
            }
            bar
        });
        Self {
            bar,
            total,
            done: 0,
            last_log: Instant::now(),
        }
    }

    /// A progress reporter that draws a bar only when stderr is a terminal.
    pub fn for_stderr(total: u64) -> Self {
        use std::io::IsTerminal;
        Self::new(total, std::io::stderr().is_terminal())
    }

    pub fn advance(&mut self, bytes: u64) {
        self.done += bytes;
        if let Some(bar) = &self.bar {
            bar.set_position(self.done);
            return;
        }
        if self.last_log.elapsed() >= LOG_EVERY && self.total > 0 {
            self.last_log = Instant::now();
            tracing::info!(
                percent = self.done * 100 / self.total,
                bytes_read = self.done,
                bytes_total = self.total,
                "fusion progress"
            );
        }
    }

    /// Input bytes counted so far.
    pub fn done(&self) -> u64 {
        self.done
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
