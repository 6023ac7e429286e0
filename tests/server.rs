//! The real `warm serve` binary on an ephemeral port, spoken to over HTTP: every route and
//! every error status of design.md section 4.

mod common;

use common::server::{fixture, Server};
use serde_json::{json, Value};

fn expected(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/expected/{name}.json"));
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The native form of a fixture case.
fn native_input(case: &Value) -> Value {
    match case["kind"].as_str().unwrap() {
        "text" => case["text"].clone(),
        "pair" => json!({"prompt": case["prompt"], "response": case["response"]}),
        _ => json!({"messages": case["messages"]}),
    }
}

fn model_arg(name: &str) -> String {
    fixture(name).display().to_string()
}

#[test]
fn score_rerank_and_the_informational_routes() {
    let llama = model_arg("llama");
    let server = Server::started(&["--model", &llama]);
    let exp = expected("llama");
    let cases = exp["cases"].as_array().unwrap();
    let inputs: Vec<Value> = cases.iter().map(native_input).collect();
    let (status, body) = server.post("/v1/score", &json!({"inputs": inputs}));
    assert_eq!(status, 200, "{body}");
    let scores = body["scores"].as_array().unwrap();
    for (case, got) in cases.iter().zip(scores) {
        let (got, want) = (got.as_f64().unwrap(), case["score"].as_f64().unwrap());
        assert!((got - want).abs() < 1e-4, "{got} vs {want}");
    }
    assert!(body.get("uncertainty").is_none());
    assert_eq!(body["model"], "llama");
    let tokens: usize = cases
        .iter()
        .map(|c| c["ids"].as_array().unwrap().len())
        .sum();
    assert_eq!(body["usage"]["prompt_tokens"], tokens);

    // Best-of-N: the same pairs through /v1/rerank, sorted best first.
    let pair = cases.iter().find(|c| c["kind"] == "pair").unwrap();
    let responses = vec![
        pair["response"].as_str().unwrap(),
        "no",
        "Sure! Here is a long and careful answer.",
    ];
    let (status, body) = server.post(
        "/v1/rerank",
        &json!({"prompt": pair["prompt"], "responses": responses, "top_n": 2}),
    );
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert!(results[0]["score"].as_f64() >= results[1]["score"].as_f64());
    assert_eq!(body["best_index"], results[0]["index"]);
    let first = results
        .iter()
        .find(|r| r["index"] == 0)
        .map(|r| r["score"].as_f64().unwrap());
    if let Some(s) = first {
        assert!((s - pair["score"].as_f64().unwrap()).abs() < 1e-4);
    }

    let (status, text) = server.get("/live");
    assert_eq!(status, 200, "{text}");
    let (status, text) = server.get("/info");
    assert_eq!(status, 200);
    let info: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(info["architecture"], "LlamaForSequenceClassification");
    assert_eq!(info["combine"], "weights");
    assert_eq!(info["members"].as_array().unwrap().len(), 1);
    assert_eq!(info["limits"]["max_input_length"], exp["max_length"]);
    let (status, text) = server.get("/metrics");
    assert_eq!(status, 200);
    for name in [
        "warm_requests_total{outcome=\"success\",route=\"score\"} 1",
        "warm_inputs_total{route=\"score\"} 7",
        "warm_batch_size_bucket",
        "warm_queue_duration_seconds_bucket",
        "warm_inference_duration_seconds_bucket",
        "warm_tokenization_duration_seconds_bucket",
        "warm_fusion_seconds",
        "warm_model_info{",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
    // The process's memory, read at each scrape (glibc's heap figures on Linux/glibc).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for name in [
        "warm_resident_memory_bytes",
        "warm_heap_in_use_bytes",
        "warm_heap_free_bytes",
    ] {
        let value: f64 = text
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("missing {name} in\n{text}"))
            .parse()
            .unwrap();
        assert!(value >= 0.0, "{name} {value}");
        if name != "warm_heap_free_bytes" {
            assert!(
                value > 1e6,
                "{name} {value}: a loaded model holds more than 1 MB"
            );
        }
    }
    let (status, text) = server.get("/openapi.json");
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&text).unwrap();
    assert!(doc["paths"]["/v1/score"]["post"].is_object());
    assert!(doc["paths"]["/v1/rerank"]["post"].is_object());
}

#[test]
fn a_prompt_shared_by_best_of_n_responses_is_computed_once_and_changes_no_score() {
    let llama = model_arg("llama");
    let server = Server::started(&["--model", &llama, "--min-shared-prefix", "8"]);
    let prompt = format!(
        "Read this and answer. {}Which animal jumps?",
        "The quick brown fox jumps over the lazy dog. ".repeat(4)
    );
    let responses = [
        "The fox.",
        "The quick brown fox jumps; the dog does not.",
        "no",
        "The fox",
    ];
    let (status, body) = server.post(
        "/v1/rerank",
        &json!({"prompt": prompt, "responses": responses}),
    );
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), responses.len());
    let (_, text) = server.get("/metrics");
    let saved: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("warm_shared_prefix_tokens_total "))
        .unwrap_or_else(|| panic!("no shared-prefix counter in\n{text}"))
        .parse()
        .unwrap();
    // Each response after the first reuses the rendered prompt (well over 40 tokens).
    assert!(saved >= 3.0 * 40.0, "{saved} tokens shared");
    // Each pair alone (a batch of one shares nothing) scores the same.
    for (i, response) in responses.iter().enumerate() {
        let (status, alone) = server.post(
            "/v1/score",
            &json!({"inputs": [{"prompt": prompt, "response": response}]}),
        );
        assert_eq!(status, 200, "{alone}");
        let alone = alone["scores"][0].as_f64().unwrap();
        let together = results
            .iter()
            .find(|r| r["index"] == i)
            .and_then(|r| r["score"].as_f64())
            .unwrap();
        assert!(
            (alone - together).abs() < 1e-5,
            "response {i}: {together} with the others, {alone} alone"
        );
    }
    let (_, text) = server.get("/metrics");
    assert!(
        text.contains(&format!("warm_shared_prefix_tokens_total {saved}")),
        "single inputs shared nothing more"
    );

    // The batch budget counts the prompt once: under a budget of exactly the rows computed,
    // which the inputs whole exceed, the request is still one batch.
    let tokens = body["usage"]["prompt_tokens"].as_f64().unwrap();
    let computed = tokens - saved;
    assert!(computed < tokens);
    let budget = computed.to_string();
    let tight = Server::started(&[
        "--model",
        &llama,
        "--min-shared-prefix",
        "8",
        "--max-batch-tokens",
        &budget,
    ]);
    let batches = |server: &Server| -> f64 {
        let (_, text) = server.get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix("warm_batch_size_count "))
            .map_or(0.0, |n| n.parse().unwrap())
    };
    let before = batches(&tight);
    let (status, again) = tight.post(
        "/v1/rerank",
        &json!({"prompt": prompt, "responses": responses}),
    );
    assert_eq!(status, 200, "{again}");
    assert_eq!(batches(&tight) - before, 1.0, "batches for one request");
    assert_eq!(again["results"], body["results"]);
}

#[test]
fn timing_headers_are_sent() {
    let server = Server::started(&["--model", &model_arg("bert")]);
    let r = reqwest::blocking::Client::new()
        .post(server.url("/v1/score"))
        .json(&json!({"inputs": ["hello there"]}))
        .send()
        .unwrap();
    for h in [
        "x-tokenization-time",
        "x-queue-time",
        "x-inference-time",
        "x-total-time",
        "x-prompt-tokens",
    ] {
        assert!(r.headers().contains_key(h), "{h}");
    }
}

#[test]
fn error_statuses() {
    let bert = model_arg("bert");
    let server = Server::started(&[
        "--model",
        &bert,
        "--max-client-batch-size",
        "4",
        "--max-input-length",
        "16",
        "--payload-limit",
        "2KB",
    ]);
    let client = reqwest::blocking::Client::new();
    let check = |status: u16, body: &Value, want_status: u16, want_text: &str| {
        assert_eq!(status, want_status, "{body}");
        let msg = body["error"].as_str().unwrap_or_default();
        assert!(msg.contains(want_text), "{want_text:?} not in {msg:?}");
        assert!(body["error_type"].is_string(), "{body}");
    };
    // 400: malformed JSON, empty list, wrong shapes.
    let r = client
        .post(server.url("/v1/score"))
        .body("{\"inputs\": [")
        .send()
        .unwrap();
    let status = r.status().as_u16();
    check(status, &r.json().unwrap(), 400, "malformed JSON");
    let (s, b) = server.post("/v1/score", &json!({"inputs": []}));
    check(s, &b, 400, "empty");
    let (s, b) = server.post("/v1/score", &json!({"inputs": [{"prompt": "x"}]}));
    check(s, &b, 400, "inputs[0]");
    let (s, b) = server.post(
        "/v1/score",
        &json!({"inputs": ["a"], "truncation_direction": "up"}),
    );
    check(s, &b, 400, "truncation_direction");
    // 413: too many inputs, body over the payload limit.
    let (s, b) = server.post("/v1/score", &json!({"inputs": ["a", "b", "c", "d", "e"]}));
    check(s, &b, 413, "--max-client-batch-size");
    let (s, b) = server.post("/v1/score", &json!({"inputs": ["x".repeat(3000)]}));
    check(s, &b, 413, "payload limit");
    // 422: too long without truncation, fine with it; messages without a chat template.
    let long = "the cat sat on the mat and then it went away again and again ".repeat(2);
    let (s, b) = server.post("/v1/score", &json!({"inputs": ["ok", long]}));
    check(s, &b, 422, "inputs[1]");
    assert!(
        b["error"]
            .as_str()
            .unwrap()
            .contains("more than the maximum of 16"),
        "{b}"
    );
    let (s, b) = server.post(
        "/v1/score",
        &json!({"inputs": ["ok", long], "truncate": true}),
    );
    assert_eq!(s, 200, "{b}");
    let (s, b) = server.post(
        "/v1/score",
        &json!({"inputs": [{"messages": [{"role": "user", "content": "hi"}]}]}),
    );
    check(s, &b, 422, "no chat template");
    // A body that is neither warm's nor vLLM's is answered in warm's shape.
    let (s, b) = server.post("/v1/score", &json!({"input": ["a"]}));
    check(s, &b, 400, "missing field `inputs`");
    // 404 and 405 with the JSON shape (405 keeps its Allow header).
    let (s, b) = server.post("/v1/nothing", &json!({}));
    check(s, &b, 404, "no such route");
    assert_eq!(b["error_type"], "not_found", "{b}");
    let r = client.get(server.url("/v1/score")).send().unwrap();
    assert_eq!(r.headers()["allow"], "POST");
    let status = r.status().as_u16();
    let b: serde_json::Value = r.json().unwrap();
    check(status, &b, 405, "GET is not served on this route");
    assert_eq!(b["error_type"], "method_not_allowed", "{b}");
    // The server is unharmed.
    let (s, b) = server.post("/v1/score", &json!({"inputs": ["still fine"]}));
    assert_eq!(s, 200, "{b}");
}

#[test]
fn template_rejections_are_422() {
    let server = Server::started(&["--model", &model_arg("gemma2")]);
    let (s, b) = server.post(
        "/v1/score",
        &json!({"inputs": [{"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]}]}),
    );
    assert_eq!(s, 422, "{b}");
    assert!(
        b["error"]
            .as_str()
            .unwrap()
            .contains("System role not supported"),
        "{b}"
    );
}

#[test]
fn api_key_guards_all_but_health_live_and_metrics() {
    let server = Server::started(&["--model", &model_arg("bert"), "--api-key", "s3cret"]);
    let client = reqwest::blocking::Client::new();
    let post = |key: Option<&str>| {
        let mut r = client
            .post(server.url("/v1/score"))
            .json(&json!({"inputs": ["hi"]}));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send().unwrap()
    };
    assert_eq!(post(None).status(), 401);
    let wrong = post(Some("nope"));
    assert_eq!(wrong.status(), 401);
    assert_eq!(wrong.json::<Value>().unwrap()["error_type"], "unauthorized");
    assert_eq!(post(Some("s3cret")).status(), 200);
    assert_eq!(
        client.get(server.url("/info")).send().unwrap().status(),
        401
    );
    for open in ["/health", "/live", "/metrics"] {
        assert_eq!(
            client.get(server.url(open)).send().unwrap().status(),
            200,
            "{open}"
        );
    }
}

#[test]
fn overload_answers_429_and_spares_the_others() {
    let server = Server::started(&[
        "--model",
        &model_arg("llama"),
        "--max-concurrent-requests",
        "2",
    ]);
    let long = "a fairly long input that takes some time to score ".repeat(2);
    let body = json!({"inputs": vec![long; 64]});
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..12)
            .map(|_| s.spawn(|| server.post("/v1/score", &body).0))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 429),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&429),
        "no request was refused: {statuses:?}"
    );
    assert!(statuses.contains(&200), "{statuses:?}");
}

#[test]
fn ensemble_mode_reports_uncertainty() {
    let llama = model_arg("llama");
    // Two copies of one member: the ensemble equals the member and the spread is zero.
    let server = Server::started(&[
        "--model",
        &llama,
        "--model",
        &llama,
        "--combine",
        "predictions",
    ]);
    let exp = expected("llama");
    let case = &exp["cases"][0];
    let (s, b) = server.post("/v1/score", &json!({"inputs": [native_input(case)]}));
    assert_eq!(s, 200, "{b}");
    assert!((b["scores"][0].as_f64().unwrap() - case["score"].as_f64().unwrap()).abs() < 1e-4);
    assert!(b["uncertainty"][0].as_f64().unwrap().abs() < 1e-6, "{b}");
    let (_, info) = server.get("/info");
    assert!(info.contains("\"combine\":\"predictions\""), "{info}");
}

#[test]
fn startup_failure_is_one_message_and_a_failing_exit() {
    let stderr =
        common::server::start_failure(&["--model".as_ref(), "/nonexistent/model".as_ref()]);
    assert!(
        stderr.contains("/nonexistent/model: not a directory"),
        "{stderr}"
    );
}

/// Two members with a large embedding, so that loading takes a while.
fn slow_members(root: &std::path::Path) -> Vec<String> {
    let src = fixture("llama");
    let mut tensors = common::read_safetensors(&src.join("model.safetensors"));
    let hidden = tensors["model.embed_tokens.weight"].shape[1];
    let rows = 400_000;
    let mut rng = common::Rng(7);
    tensors.insert(
        "model.embed_tokens.weight".into(),
        common::float("F32", &[rows, hidden], &rng.vec(rows * hidden, 0.02)),
    );
    let list: Vec<(String, common::Stored)> = tensors.into_iter().collect();
    (0..2)
        .map(|i| {
            let dir = root.join(format!("m{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            for f in [
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
            ] {
                std::fs::copy(src.join(f), dir.join(f)).unwrap();
            }
            let mut config: Value =
                serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
            config["vocab_size"] = rows.into();
            std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
            common::write_safetensors(&dir.join("model.safetensors"), &list);
            dir.display().to_string()
        })
        .collect()
}

#[test]
fn not_ready_is_503_while_loading_then_200() {
    let tmp = tempfile::tempdir().unwrap();
    let members = slow_members(tmp.path());
    let server = Server::start(&["--model", &members[0], "--model", &members[1]]);
    // The listener is up before the members are read.
    let (status, body) = server.get("/health");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("still loading"), "{body}");
    let (status, body) = server.post("/v1/score", &json!({"inputs": ["hi"]}));
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error_type"], "unhealthy");
    assert_eq!(server.get("/live").0, 200);
    server.wait_ready();
    let (status, body) = server.post("/v1/score", &json!({"inputs": ["hi"]}));
    assert_eq!(status, 200, "{body}");
}

#[test]
fn cors_only_when_configured_and_request_timeout_is_504() {
    let bert = model_arg("bert");
    let client = reqwest::blocking::Client::new();
    let preflight = |server: &Server| {
        client
            .request(reqwest::Method::OPTIONS, server.url("/v1/score"))
            .header("Origin", "https://app.example")
            .header("Access-Control-Request-Method", "POST")
            .send()
            .unwrap()
    };
    let plain = Server::started(&["--model", &bert]);
    assert!(preflight(&plain)
        .headers()
        .get("access-control-allow-origin")
        .is_none());
    drop(plain);
    let cors = Server::started(&[
        "--model",
        &bert,
        "--cors-allow-origin",
        "https://app.example",
        "--request-timeout",
        "0",
    ]);
    let r = preflight(&cors);
    assert_eq!(
        r.headers().get("access-control-allow-origin").unwrap(),
        "https://app.example"
    );
    // A zero timeout cannot be met by a request that takes some milliseconds (the timer's
    // resolution is one): it is answered 504, and the server lives on.
    let long = "the cat sat on the mat and looked at the dog for a while ".repeat(6);
    let (s, b) = cors.post(
        "/v1/score",
        &json!({"inputs": vec![long; 200], "truncate": true}),
    );
    assert_eq!(s, 504, "{b}");
    assert_eq!(b["error_type"], "timeout");
    assert_eq!(cors.get("/health").0, 200);
}

/// Sends `raw` on a fresh connection and returns what the server answers before it closes
/// the connection (empty: closed without a response), or None if it still holds the
/// connection open after 20 s.
fn raw_exchange(server: &Server, raw: &[u8]) -> Option<String> {
    use std::io::{Read, Write};
    let address = server.base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.write_all(raw).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer) {
        Ok(_) => Some(String::from_utf8_lossy(&answer).into_owned()),
        Err(_) => None,
    }
}

#[test]
fn slow_or_stalled_clients_are_cut_off_after_the_read_timeout() {
    let server = Server::started(&["--model", &model_arg("bert"), "--read-timeout", "1"]);
    // Half a request head (slowloris): the connection is closed, with nothing to answer.
    let head = raw_exchange(&server, b"POST /v1/score HTTP/1.1\r\nHost: warm\r\n");
    assert_eq!(head.as_deref(), Some(""), "the connection was held open");
    // A body that stops short of its Content-Length: 408 in warm's JSON shape.
    let body = raw_exchange(
        &server,
        b"POST /v1/score HTTP/1.1\r\nHost: warm\r\nContent-Length: 100\r\n\r\n{\"inputs\"",
    )
    .expect("the connection was held open");
    assert!(body.starts_with("HTTP/1.1 408"), "{body}");
    assert!(
        body.contains("\"error_type\":\"request_timeout\""),
        "{body}"
    );
    assert!(body.contains("--read-timeout"), "{body}");
    // Other clients were served all along.
    let (s, b) = server.post("/v1/score", &json!({"inputs": ["still fine"]}));
    assert_eq!(s, 200, "{b}");
}
