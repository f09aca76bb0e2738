//! The live view of a run: a progress bar with sent and answered requests, the recent answer
//! rate and errors, redrawn a few times a second when stderr is a terminal; a plain status line
//! every few seconds when it is not (CI logs keep every line, so a redrawn bar would flood them).
//!
//! A thread of its own reads the tracker's counters, so the display needs no async runtime and
//! never slows the tasks that send requests.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::track::Tracker;

/// When a load run stops sending (what its progress bar counts toward).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    /// Stop after sending this many requests.
    Requests(usize),
    /// Stop sending once this long has passed since the start.
    Duration(Duration),
}

/// How often the bar is redrawn on a terminal.
const BAR_EVERY: Duration = Duration::from_millis(250);
/// How often a status line is written when stderr is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(10);
/// The window over which the displayed answer rate is measured.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// The live display of a run. Cheap to clone; the display stops when [`Progress::finish`] is
/// called or the last clone is dropped.
#[derive(Clone)]
pub struct Progress {
    inner: Arc<Inner>,
}

struct Inner {
    view: Arc<View>,
    /// Dropping the sender wakes the display thread and stops it.
    stop: Mutex<Option<mpsc::Sender<()>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// What the display thread reads.
struct View {
    tracker: Tracker,
    limit: Limit,
    /// `None` when stderr is not a terminal.
    bar: Option<ProgressBar>,
    phase: Mutex<String>,
}

impl Progress {
    /// Starts displaying the progress of a run against `limit`: answered of the requests to
    /// send, or time passed of the duration.
    pub fn start(tracker: &Tracker, limit: &Limit) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let len = match *limit {
                Limit::Requests(n) => n as u64,
                Limit::Duration(d) => d.as_secs().max(1),
            };
            let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        let view = Arc::new(View {
            tracker: tracker.clone(),
            limit: *limit,
            bar,
            phase: Mutex::new(String::new()),
        });
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = {
            let view = view.clone();
            std::thread::Builder::new()
                .name("ferry-loadtest-progress".into())
                .spawn(move || view.run(&stopped))
                .ok()
        };
        Progress {
            inner: Arc::new(Inner {
                view,
                stop: Mutex::new(Some(stop)),
                thread: Mutex::new(thread),
            }),
        }
    }

    /// Names what the run is doing now ("sending", "waiting for 3 stragglers", ...).
    pub fn set_phase(&self, phase: impl Into<String>) {
        if let Ok(mut p) = self.inner.view.phase.lock() {
            *p = phase.into();
        }
    }

    /// Writes a line without breaking the bar.
    pub fn println(&self, line: impl AsRef<str>) {
        match &self.inner.view.bar {
            Some(bar) => bar.println(line.as_ref()),
            None => eprintln!("{}", line.as_ref()),
        }
    }

    /// Stops the display, leaving a last status line behind. Idempotent.
    pub fn finish(&self) {
        self.inner.finish();
    }
}

impl Inner {
    fn finish(&self) {
        drop(self.stop.lock().ok().and_then(|mut s| s.take()));
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The counters a status line shows.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Status {
    elapsed: Duration,
    sent: usize,
    answered: usize,
    errors: usize,
    publish_failures: usize,
    answers_per_s: f64,
}

impl View {
    fn run(&self, stopped: &mpsc::Receiver<()>) {
        let every = if self.bar.is_some() { BAR_EVERY } else { LINE_EVERY };
        // Seeded with the start, so the first status line already has a rate.
        let mut recent: VecDeque<(Instant, usize)> = VecDeque::from([(Instant::now(), self.tracker.answered_count())]);
        loop {
            let stopping = !matches!(stopped.recv_timeout(every), Err(RecvTimeoutError::Timeout));
            let now = Instant::now();
            let answered = self.tracker.answered_count();
            recent.push_back((now, answered));
            while recent.len() > 2 && recent.front().is_some_and(|(t, _)| now - *t > RATE_WINDOW) {
                recent.pop_front();
            }
            let answers_per_s = match recent.front() {
                Some(&(t, a)) if now > t => (answered - a.min(answered)) as f64 / (now - t).as_secs_f64(),
                _ => 0.0,
            };
            let status = Status {
                elapsed: self.tracker.t0().elapsed(),
                sent: self.tracker.sent_count(),
                answered,
                errors: self.tracker.errors_count(),
                publish_failures: self.tracker.publish_failures(),
                answers_per_s,
            };
            let phase = self.phase.lock().map(|p| p.clone()).unwrap_or_default();
            match &self.bar {
                Some(bar) => {
                    bar.set_position(match self.limit {
                        Limit::Requests(_) => answered as u64,
                        Limit::Duration(_) => status.elapsed.as_secs(),
                    });
                    bar.set_message(status.line(&phase));
                    bar.tick();
                    if stopping {
                        bar.abandon();
                    }
                }
                None => eprintln!("[{:>7.1} s] {}", status.elapsed.as_secs_f64(), status.line(&phase)),
            }
            if stopping {
                return;
            }
        }
    }
}

impl Status {
    fn line(&self, phase: &str) -> String {
        let mut line = format!(
            "sent {}, answered {} ({:.1}/s), errors {}, unanswered {}",
            self.sent,
            self.answered,
            self.answers_per_s,
            self.errors,
            self.sent.saturating_sub(self.answered)
        );
        if self.publish_failures > 0 {
            line.push_str(&format!(", publish failures {}", self.publish_failures));
        }
        if !phase.is_empty() {
            line.push_str(" | ");
            line.push_str(phase);
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_shows_counts_rate_and_phase() {
        let mut s = Status {
            elapsed: Duration::from_secs(3),
            sent: 40,
            answered: 37,
            errors: 1,
            publish_failures: 0,
            answers_per_s: 2.31,
        };
        assert_eq!(
            s.line("sending"),
            "sent 40, answered 37 (2.3/s), errors 1, unanswered 3 | sending"
        );
        s.publish_failures = 2;
        assert_eq!(
            s.line(""),
            "sent 40, answered 37 (2.3/s), errors 1, unanswered 3, publish failures 2"
        );
    }
}
