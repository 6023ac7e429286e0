//! A load harness for a running warm server: a fixed, seeded workload of prompt/response
//! pairs sent over HTTP at set concurrency levels; prints requests/s, inputs/s, tokens/s
//! and latency percentiles per level, and the p50 of each request's latency outside the
//! forward pass (the client's latency less the server's `x-inference-time` for the same
//! request: HTTP, JSON, tokenization and queueing, free of the forward pass's own noise).
//!
//!   cargo run --release --example load -- URL [CONCURRENCY,...] [REQUESTS] [PAIRS_PER_REQUEST] [SEED] [PROMPT_WORDS]
//!
//! e.g. `http://127.0.0.1:8080 1,4,16 400 1 7`. Tokens/s uses the server's
//! `usage.prompt_tokens`. With PROMPT_WORDS > 0 each request is best-of-N instead: one
//! `/v1/rerank` of a prompt of that many words (and a short question) with PAIRS
//! responses.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const SUBJECTS: &[&str] = &[
    "France", "Japan", "Kenya", "Peru", "Canada", "Italy", "Egypt", "Norway",
];
const WORDS: &[&str] = &[
    "the",
    "answer",
    "is",
    "because",
    "first",
    "we",
    "compute",
    "then",
    "check",
    "result",
    "carefully",
    "so",
    "it",
    "follows",
    "that",
    "value",
    "equals",
    "clearly",
    "and",
    "therefore",
];

/// `count` seeded words.
fn words(rng: &mut Rng, count: usize) -> String {
    let body: Vec<&str> = (0..count)
        .map(|_| WORDS[rng.below(WORDS.len() as u64) as usize])
        .collect();
    body.join(" ")
}

/// The seeded best-of-N workload: per request, a context of `prompt_words` words and a
/// question, and `responses` answers of varied lengths.
fn best_of_n(requests: usize, responses: usize, prompt_words: usize, seed: u64) -> Vec<Value> {
    let mut rng = Rng(seed.max(1));
    (0..requests)
        .map(|_| {
            let subject = SUBJECTS[rng.below(SUBJECTS.len() as u64) as usize];
            let context = words(&mut rng, prompt_words);
            let prompt = format!("{context}\n\nGiven the above, what is the capital of {subject}?");
            let answers: Vec<String> = (0..responses)
                .map(|_| {
                    let count = 5 + rng.below(40) as usize;
                    words(&mut rng, count)
                })
                .collect();
            json!({"prompt": prompt, "responses": answers})
        })
        .collect()
}

/// The seeded workload: one request body per index, a few pairs of varied lengths each.
fn workload(requests: usize, pairs: usize, seed: u64) -> Vec<Value> {
    let mut rng = Rng(seed.max(1));
    (0..requests)
        .map(|_| {
            let inputs: Vec<Value> = (0..pairs)
                .map(|_| {
                    let a = rng.below(100);
                    let b = rng.below(100);
                    let subject = SUBJECTS[rng.below(SUBJECTS.len() as u64) as usize];
                    let prompt =
                        format!("What is {a} + {b}, and what is the capital of {subject}?");
                    let count = 5 + rng.below(60) as usize;
                    let body = words(&mut rng, count);
                    json!({"prompt": prompt, "response": format!("{} {body}", a + b)})
                })
                .collect();
            json!({"inputs": inputs})
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let url = args
        .first()
        .ok_or("usage: load URL [CONCURRENCY,...] [REQUESTS] [PAIRS] [SEED] [PROMPT_WORDS]")?;
    let levels: Vec<usize> = args
        .get(1)
        .map_or("1,4,16", String::as_str)
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let requests: usize = args.get(2).map_or(Ok(200), |s| s.parse())?;
    let pairs: usize = args.get(3).map_or(Ok(1), |s| s.parse())?;
    let seed: u64 = args.get(4).map_or(Ok(7), |s| s.parse())?;
    let prompt_words: usize = args.get(5).map_or(Ok(0), |s| s.parse())?;
    let (bodies, route) = if prompt_words > 0 {
        (best_of_n(requests, pairs, prompt_words, seed), "v1/rerank")
    } else {
        (workload(requests, pairs, seed), "v1/score")
    };
    let endpoint = format!("{}/{route}", url.trim_end_matches('/'));
    println!("| concurrency | requests | requests/s | inputs/s | tokens/s | p50 ms | p95 ms | p99 ms | errors | p50 outside forward ms |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for &c in &levels {
        let next = AtomicUsize::new(0);
        let tokens = AtomicUsize::new(0);
        let errors = AtomicUsize::new(0);
        let latencies = Mutex::new(Vec::with_capacity(requests));
        let outside = Mutex::new(Vec::with_capacity(requests));
        let started = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..c {
                s.spawn(|| {
                    // No client timeout (the blocking client's default is 30 s): slow
                    // configurations are measured, not counted as errors.
                    let client = match reqwest::blocking::Client::builder().timeout(None).build() {
                        Ok(client) => client,
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    };
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(body) = bodies.get(i) else { break };
                        let t = Instant::now();
                        match client
                            .post(&endpoint)
                            .json(body)
                            .send()
                            .and_then(|r| r.error_for_status())
                        {
                            Ok(r) => {
                                let inference = r
                                    .headers()
                                    .get("x-inference-time")
                                    .and_then(|h| h.to_str().ok())
                                    .and_then(|h| h.parse::<f64>().ok());
                                let v: Value = r.json().unwrap_or_default();
                                let elapsed = t.elapsed();
                                if let Some(ms) = inference {
                                    let ms = Duration::from_secs_f64(ms.max(0.0) / 1000.0);
                                    outside
                                        .lock()
                                        .map(|mut o| o.push(elapsed.saturating_sub(ms)))
                                        .ok();
                                }
                                tokens.fetch_add(
                                    v["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as usize,
                                    Ordering::Relaxed,
                                );
                                latencies.lock().map(|mut l| l.push(elapsed)).ok();
                            }
                            Err(_) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
        });
        let secs = started.elapsed().as_secs_f64();
        let mut lat = latencies.into_inner().unwrap_or_default();
        lat.sort();
        let mut outside = outside.into_inner().unwrap_or_default();
        outside.sort();
        let done = lat.len();
        println!(
            "| {c} | {done} | {:.1} | {:.1} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {:.2} |",
            done as f64 / secs,
            (done * pairs) as f64 / secs,
            tokens.load(Ordering::Relaxed) as f64 / secs,
            percentile(&lat, 50.0),
            percentile(&lat, 95.0),
            percentile(&lat, 99.0),
            errors.load(Ordering::Relaxed),
            percentile(&outside, 50.0)
        );
    }
    Ok(())
}
