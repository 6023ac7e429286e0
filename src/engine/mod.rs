//! The scoring engine: one worker thread owns the model; requests queue their token
//! sequences; the worker drains the queue, groups sequences of similar length into batches
//! under a token budget, runs the forward passes and answers each request as soon as all
//! of its sequences are scored. Requests whose client has gone are dropped before compute.

mod batcher;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

pub use batcher::{plan_batches, BatchLimits, Item};

use crate::model::{Sequence, Work};
use crate::scorer::{Score, Scorer};

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("the model failed on this batch: {0}")]
    Model(String),
    #[error("the engine has stopped")]
    Stopped,
}

/// What a request gets back.
#[derive(Debug, Clone)]
pub struct Scored {
    pub scores: Vec<Score>,
    /// From queueing to the first batch that held one of its sequences.
    pub queue_time: Duration,
    /// Time of the forward passes its sequences took part in.
    pub inference_time: Duration,
}

/// Per-batch observations for the metrics.
pub trait EngineObserver: Send + Sync {
    /// A forward pass of `inputs` sequences that computed `tokens` (padding included,
    /// shared prompts once), `shared` fewer than its inputs hold thanks to shared prompts.
    fn batch(&self, inputs: usize, tokens: usize, shared: usize, seconds: f64);
    fn queue_depth(&self, inputs: usize);
}

struct Job {
    sequences: Vec<Sequence>,
    reply: oneshot::Sender<Result<Scored, EngineError>>,
    enqueued: Instant,
}

/// A handle to the worker; cheap to clone. The worker stops when every handle is gone.
#[derive(Clone)]
pub struct Engine {
    sender: Sender<Job>,
    queued_inputs: Arc<AtomicUsize>,
}

impl Engine {
    pub fn start(
        scorer: Arc<Scorer>,
        limits: BatchLimits,
        observer: Arc<dyn EngineObserver>,
    ) -> Self {
        let (sender, receiver) = channel();
        let queued_inputs = Arc::new(AtomicUsize::new(0));
        let worker = Worker {
            scorer,
            limits,
            observer,
            queued_inputs: queued_inputs.clone(),
        };
        std::thread::Builder::new()
            .name("warm-engine".into())
            .spawn(move || worker.run(&receiver))
            .expect("spawn the engine thread");
        Self {
            sender,
            queued_inputs,
        }
    }

    /// Queues the sequences of one request and waits for their scores.
    pub async fn score(&self, sequences: Vec<Sequence>) -> Result<Scored, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.queued_inputs
            .fetch_add(sequences.len(), Ordering::Relaxed);
        let job = Job {
            sequences,
            reply,
            enqueued: Instant::now(),
        };
        self.sender.send(job).map_err(|_| EngineError::Stopped)?;
        answer.await.map_err(|_| EngineError::Stopped)?
    }

    pub fn queued_inputs(&self) -> usize {
        self.queued_inputs.load(Ordering::Relaxed)
    }
}

struct Worker {
    scorer: Arc<Scorer>,
    limits: BatchLimits,
    observer: Arc<dyn EngineObserver>,
    queued_inputs: Arc<AtomicUsize>,
}

/// A job being worked on: its scores so far.
struct Pending {
    job: Job,
    scores: Vec<Option<Score>>,
    /// Sequences that went through a forward pass (their queue count is released then).
    run: usize,
    started: Option<Instant>,
    inference: Duration,
    /// Answered already (scored, or failed).
    done: bool,
}

impl Worker {
    fn run(self, receiver: &Receiver<Job>) {
        while let Ok(first) = receiver.recv() {
            let mut jobs = vec![first];
            jobs.extend(receiver.try_iter());
            self.process(jobs);
        }
        tracing::debug!("engine stopped");
    }

    fn process(&self, jobs: Vec<Job>) {
        let mut pending: Vec<Pending> = jobs
            .into_iter()
            .map(|job| Pending {
                scores: vec![None; job.sequences.len()],
                run: 0,
                started: None,
                inference: Duration::ZERO,
                done: false,
                job,
            })
            .collect();
        let items: Vec<Item> = pending
            .iter()
            .enumerate()
            .flat_map(|(job, p)| {
                p.job
                    .sequences
                    .iter()
                    .enumerate()
                    .map(move |(index, s)| Item {
                        job,
                        index,
                        ids: &s.ids,
                    })
            })
            .collect();
        let batches = plan_batches(&items, &self.limits);
        self.observer
            .queue_depth(self.queued_inputs.load(Ordering::Relaxed));
        for batch in batches {
            // Requests whose client has gone (or that failed) are not computed.
            let batch: Vec<(usize, usize, usize)> = batch
                .into_iter()
                .filter(|&(j, _, _)| !pending[j].done && !pending[j].job.reply.is_closed())
                .collect();
            if batch.is_empty() {
                continue;
            }
            let started = Instant::now();
            let sequences: Vec<&Sequence> = batch
                .iter()
                .map(|&(j, i, _)| &pending[j].job.sequences[i])
                .collect();
            let input_tokens: usize = sequences.iter().map(|s| s.ids.len()).sum();
            let result = self.scorer.score_batch(&sequences);
            let elapsed = started.elapsed();
            // A failed pass reports its inputs' tokens: what it computed is unknown.
            let work = result.as_ref().map_or(
                Work {
                    tokens: input_tokens,
                    shared: 0,
                },
                |(_, work)| *work,
            );
            self.observer.batch(
                sequences.len(),
                work.tokens,
                work.shared,
                elapsed.as_secs_f64(),
            );
            self.queued_inputs.fetch_sub(batch.len(), Ordering::Relaxed);
            let mut touched: Vec<usize> = batch.iter().map(|&(j, _, _)| j).collect();
            touched.sort_unstable();
            touched.dedup();
            for &j in &touched {
                let p = &mut pending[j];
                p.started.get_or_insert(started);
                p.inference += elapsed;
            }
            match result {
                Ok((scores, _)) => {
                    for (&(j, i, _), score) in batch.iter().zip(scores) {
                        pending[j].scores[i] = Some(score);
                        pending[j].run += 1;
                    }
                    for &j in &touched {
                        if pending[j].run == pending[j].job.sequences.len() {
                            answer(&mut pending[j], None);
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "forward pass failed");
                    for &(j, _, _) in &batch {
                        pending[j].run += 1;
                    }
                    for &j in &touched {
                        answer(&mut pending[j], Some(EngineError::Model(e.to_string())));
                    }
                }
            }
        }
        // Sequences that never ran (client gone, request failed) leave the queue count.
        let skipped: usize = pending.iter().map(|p| p.job.sequences.len() - p.run).sum();
        self.queued_inputs.fetch_sub(skipped, Ordering::Relaxed);
    }
}

/// Sends the request its scores, or the error, once.
fn answer(p: &mut Pending, error: Option<EngineError>) {
    if p.done {
        return;
    }
    p.done = true;
    let (placeholder, _) = oneshot::channel();
    let sender = std::mem::replace(&mut p.job.reply, placeholder);
    let outcome = match error {
        Some(e) => Err(e),
        None => Ok(Scored {
            // Every sequence is scored when a request is answered without an error.
            scores: std::mem::take(&mut p.scores)
                .into_iter()
                .map(|s| {
                    s.unwrap_or(Score {
                        value: f32::NAN,
                        uncertainty: None,
                        logits: Vec::new(),
                        steps: None,
                        objectives: None,
                    })
                })
                .collect(),
            queue_time: p.started.map_or(Duration::ZERO, |s| {
                s.saturating_duration_since(p.job.enqueued)
            }),
            inference_time: p.inference,
        }),
    };
    let _ = sender.send(outcome);
}
