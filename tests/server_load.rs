//! The server under concurrency and shutdown: batching never changes a score, and SIGTERM
//! under load loses no accepted request.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::server::{fixture, Server};
use common::sparse_member;
use reqwest::blocking::{Client, RequestBuilder};
use serde_json::{json, Value};

/// Inputs of very different lengths.
fn inputs() -> Vec<Value> {
    let words = [
        "the", "reward", "model", "scores", "this", "answer", "well", "2+2", "café", "naïve",
    ];
    (0..40)
        .map(|i| {
            let n = 1 + (i * 7) % 60;
            let text: Vec<&str> = (0..n).map(|k| words[(i + k) % words.len()]).collect();
            if i % 3 == 0 {
                json!({"prompt": format!("question {i}?"), "response": text.join(" ")})
            } else {
                json!(text.join(" "))
            }
        })
        .collect()
}

#[test]
fn two_hundred_concurrent_clients_get_the_scores_of_inputs_scored_alone() {
    let server = Server::started(&[
        "--model",
        &fixture("llama").display().to_string(),
        "--max-batch-tokens",
        "2048",
    ]);
    let inputs = inputs();
    let alone: Vec<f64> = inputs
        .iter()
        .map(|input| {
            let (s, b) = server.post("/v1/score", &json!({"inputs": [input]}));
            assert_eq!(s, 200, "{b}");
            b["scores"][0].as_f64().unwrap()
        })
        .collect();
    let worst = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..200)
            .map(|t| {
                let (inputs, alone, server) = (&inputs, &alone, &server);
                scope.spawn(move || {
                    let picks: Vec<usize> = (0..1 + t % 3).map(|k| (t * 7 + k * 13) % inputs.len()).collect();
                    let body = json!({"inputs": picks.iter().map(|&i| inputs[i].clone()).collect::<Vec<_>>()});
                    let (s, b) = server.post("/v1/score", &body);
                    assert_eq!(s, 200, "{b}");
                    picks
                        .iter()
                        .zip(b["scores"].as_array().unwrap())
                        .map(|(&i, got)| (got.as_f64().unwrap() - alone[i]).abs())
                        .fold(0f64, f64::max)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .fold(0f64, f64::max)
    });
    eprintln!("max |batched - alone| over 200 concurrent clients: {worst:.2e}");
    assert!(worst < 1e-5, "{worst}");
    // The batcher did batch: some forward passes held more than one sequence.
    let (_, metrics) = server.get("/metrics");
    let single = metrics
        .lines()
        .find(|l| l.starts_with("warm_batch_size_bucket{le=\"1\"}"))
        .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .unwrap();
    let total = metrics
        .lines()
        .find(|l| l.starts_with("warm_batch_size_count"))
        .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .unwrap();
    assert!(
        single < total,
        "every batch held one sequence ({single} of {total})"
    );
}

/// How one client's requests ended.
#[derive(Default)]
struct Outcomes {
    answered: usize,
    /// Answered requests sent before SIGTERM and answered after it.
    in_flight_at_signal: usize,
    refused: usize,
    reset: usize,
    lost: Vec<String>,
}

impl Outcomes {
    fn add(mut self, other: Outcomes) -> Outcomes {
        self.answered += other.answered;
        self.in_flight_at_signal += other.in_flight_at_signal;
        self.refused += other.refused;
        self.reset += other.reset;
        self.lost.extend(other.lost);
        self
    }
}

/// Sends `request` on fresh connections until `stop`, or until the server refuses or resets
/// a connection. A refused connection is a request the server never accepted, which a
/// load balancer retries elsewhere; so is a reset one (completed by the kernel in the
/// instant between the server's last accept and its listener's close, never read).
/// Anything else that is not a 200 with JSON is a lost request.
fn client_until_stopped(
    request: &(dyn Fn(&Client) -> RequestBuilder + Sync),
    stop: &AtomicBool,
    signalled: &AtomicBool,
) -> Outcomes {
    let client = Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let mut outcomes = Outcomes::default();
    while !stop.load(Ordering::Relaxed) {
        let sent_before_signal = !signalled.load(Ordering::SeqCst);
        match request(&client).send() {
            Ok(r) => {
                let status = r.status();
                match r.json::<Value>() {
                    Ok(_) if status == 200 => {
                        outcomes.answered += 1;
                        if sent_before_signal && signalled.load(Ordering::SeqCst) {
                            outcomes.in_flight_at_signal += 1;
                        }
                    }
                    other => outcomes.lost.push(format!("status {status}: {other:?}")),
                }
            }
            Err(e) if e.is_connect() => {
                outcomes.refused += 1;
                break;
            }
            Err(e) if is_reset(&e) => {
                outcomes.reset += 1;
                break;
            }
            Err(e) => outcomes.lost.push(format!("{e:?}")),
        }
    }
    outcomes
}

#[test]
fn sigterm_under_load_loses_no_accepted_request() {
    let mut server = Server::started(&["--model", &fixture("llama").display().to_string()]);
    // Scoring requests, in flight when SIGTERM comes, and quick ones (/live), so that
    // connections are being opened at that moment: some wait in the listener's backlog,
    // some are accepted with their request not read yet.
    let (score_url, live_url) = (server.url("/v1/score"), server.url("/live"));
    let body = json!({"inputs": inputs()});
    let score = |client: &Client| client.post(&score_url).json(&body);
    let live = |client: &Client| client.get(&live_url);
    let stop = AtomicBool::new(false);
    let signalled = AtomicBool::new(false);
    let outcomes = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..24)
            .map(|i| {
                let request: &(dyn Fn(&Client) -> RequestBuilder + Sync) =
                    if i < 16 { &score } else { &live };
                let (stop, signalled) = (&stop, &signalled);
                scope.spawn(move || client_until_stopped(request, stop, signalled))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(800));
        signalled.store(true, Ordering::SeqCst);
        let status = server.terminate();
        assert!(status.success(), "exit status {status:?}");
        stop.store(true, Ordering::Relaxed);
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .fold(Outcomes::default(), Outcomes::add)
    });
    eprintln!(
        "shutdown under load: {} answered ({} of them in flight when SIGTERM came), {} refused \
         after shutdown, {} reset at the close, {} lost",
        outcomes.answered,
        outcomes.in_flight_at_signal,
        outcomes.refused,
        outcomes.reset,
        outcomes.lost.len()
    );
    assert!(
        outcomes.in_flight_at_signal > 0,
        "no request was in flight at SIGTERM: the test proved nothing"
    );
    assert!(outcomes.lost.is_empty(), "{:?}", outcomes.lost);
}

/// Whether the connection was reset (by the listener's close) rather than answered.
fn is_reset(e: &reqwest::Error) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(error) = source {
        if error
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionReset)
        {
            return true;
        }
        source = error.source();
    }
    false
}

#[test]
fn sigterm_during_a_long_fusion_exits_without_finishing_it() {
    // 4 x 4 GiB: many seconds of fusion even in a release build.
    let root = tempfile::tempdir().unwrap();
    let mut args = Vec::new();
    for i in 0..4 {
        let dir = root.path().join(format!("member{i}"));
        sparse_member(&dir, 4);
        args.extend(["--model".to_string(), dir.display().to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut server = Server::start(&args);
    let (status, _) = server.get("/health");
    assert_eq!(status, 503, "the set should still be loading");
    std::thread::sleep(Duration::from_millis(500));
    let signalled = std::time::Instant::now();
    let exit = server.terminate();
    let waited = signalled.elapsed();
    assert!(exit.success(), "{exit:?}");
    let log: Vec<String> = server.log.lock().unwrap().try_iter().collect();
    assert!(
        log.iter().any(|l| l.contains("loading abandoned")),
        "the load had finished: the test proved nothing\n{}",
        log.join("\n")
    );
    assert!(
        waited < Duration::from_secs(5),
        "exit took {waited:?} after SIGTERM: it waited for the fusion"
    );
}
