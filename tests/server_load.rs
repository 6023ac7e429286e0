//! The server under concurrency and shutdown: batching never changes a score, and SIGTERM
//! under load loses no accepted request.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::server::{fixture, Server};
use common::sparse_member;
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

#[test]
fn sigterm_under_load_loses_no_accepted_request() {
    let mut server = Server::started(&["--model", &fixture("llama").display().to_string()]);
    let body = json!({"inputs": inputs()});
    let stop = AtomicBool::new(false);
    let signalled = AtomicBool::new(false);
    let answered_during_shutdown = std::sync::atomic::AtomicUsize::new(0);
    let (ok, refused, lost) = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..16)
            .map(|_| {
                let (body, stop, url) = (&body, &stop, server.url("/v1/score"));
                let (signalled, during) = (&signalled, &answered_during_shutdown);
                scope.spawn(move || {
                    // A fresh connection per request: a refused connection is a request the
                    // server never accepted, which a load balancer retries elsewhere.
                    let client = reqwest::blocking::Client::builder()
                        .pool_max_idle_per_host(0)
                        .build()
                        .unwrap();
                    let (mut ok, mut refused, mut lost) = (0, 0, Vec::new());
                    while !stop.load(Ordering::Relaxed) {
                        let sent_before_signal = !signalled.load(Ordering::SeqCst);
                        match client.post(&url).json(body).send() {
                            Ok(r) => {
                                let status = r.status();
                                match r.json::<Value>() {
                                    Ok(_) if status == 200 => {
                                        ok += 1;
                                        if sent_before_signal && signalled.load(Ordering::SeqCst) {
                                            during.fetch_add(1, Ordering::Relaxed);
                                        }
                                    }
                                    other => lost.push(format!("status {status}: {other:?}")),
                                }
                            }
                            Err(e) if e.is_connect() => {
                                refused += 1;
                                break;
                            }
                            Err(e)
                                if e.is_request()
                                    && e.to_string()
                                        .contains("connection closed before message completed") =>
                            {
                                refused += 1;
                                break;
                            }
                            Err(e) => lost.push(format!("{e:?}")),
                        }
                    }
                    (ok, refused, lost)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(800));
        signalled.store(true, Ordering::SeqCst);
        let status = server.terminate();
        assert!(status.success(), "exit status {status:?}");
        stop.store(true, Ordering::Relaxed);
        handles.into_iter().map(|h| h.join().unwrap()).fold(
            (0, 0, Vec::new()),
            |(a, b, mut c), (x, y, z)| {
                c.extend(z);
                (a + x, b + y, c)
            },
        )
    });
    let during = answered_during_shutdown.load(Ordering::Relaxed);
    eprintln!(
        "shutdown under load: {ok} answered ({during} of them in flight when SIGTERM came), {refused} refused after shutdown, {} lost",
        lost.len()
    );
    assert!(
        during > 0,
        "no request was in flight at SIGTERM: the test proved nothing"
    );
    assert!(lost.is_empty(), "{lost:?}");
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
