//! Progress of a long fusion: a bar on a terminal, log lines every 10% otherwise (so that
//! container logs show that start-up is moving).

use indicatif::{ProgressBar, ProgressStyle};

pub struct FuseProgress {
    bar: Option<ProgressBar>,
    total: u64,
    done: u64,
    next_log_tenth: u64,
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
            next_log_tenth: 1,
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
        if self.total == 0 {
            return;
        }
        while self.next_log_tenth <= 10 && self.done * 10 >= self.total * self.next_log_tenth {
            tracing::info!(
                percent = self.next_log_tenth * 10,
                bytes_read = self.done,
                "fusion progress"
            );
            self.next_log_tenth += 1;
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
