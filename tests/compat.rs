//! The compat routes, fed the request bodies existing clients send (tests/compat/requests,
//! each naming its source file and function upstream; docs/compat-sources.md), checked for
//! the response shape the client parses and for numbers equal to the native /v1/score of
//! the same inputs, activations included.

mod common;

use common::server::{fixture, Server};
use serde_json::{json, Value};

fn sample(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/compat/requests/{name}.json"));
    let v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    assert!(
        v["source"].as_str().is_some_and(|s| !s.is_empty()),
        "{name}: no source"
    );
    v
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn close(a: &Value, b: f64, what: &str) {
    let a = a
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: not a number: {a}"));
    assert!((a - b).abs() < 1e-5, "{what}: {a} vs {b}");
}

/// Raw native scores of `inputs` (native input shapes).
fn native(server: &Server, inputs: Vec<Value>) -> Vec<f64> {
    let (s, b) = server.post("/v1/score", &json!({"inputs": inputs, "truncate": true}));
    assert_eq!(s, 200, "{b}");
    b["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn pair(q: &Value, d: &Value) -> Value {
    json!({"prompt": q, "response": d})
}

fn start() -> Server {
    Server::started(&["--model", &fixture("llama").display().to_string()])
}

/// Posts a sample to its route (or `route` when given).
fn replay(server: &Server, s: &Value) -> Value {
    let (status, body) = server.post(s["route"].as_str().unwrap(), &s["body"]);
    assert_eq!(status, 200, "{}: {body}", s["source"]);
    body
}

#[test]
fn tei_predict_single_pair_and_batch() {
    let server = start();
    // Single text, default raw_scores false: sigmoid of the reward, label from id2label.
    let s = sample("tei_predict_single");
    let body = replay(&server, &s);
    let want = native(&server, vec![s["body"]["inputs"].clone()]);
    assert_eq!(body.as_array().unwrap().len(), 1);
    close(&body[0]["score"], sigmoid(want[0]), "tei single");
    assert_eq!(body[0]["label"], "LABEL_0");
    // A [text, text_pair] pair with raw_scores: the raw reward of the prompt/response pair.
    let s = sample("tei_predict_pair");
    let body = replay(&server, &s);
    let inputs = s["body"]["inputs"].as_array().unwrap();
    let want = native(&server, vec![pair(&inputs[0], &inputs[1])]);
    close(&body[0]["score"], want[0], "tei pair");
    // A batch: a list of lists, in input order.
    let s = sample("tei_predict_batch");
    let body = replay(&server, &s);
    let items: Vec<Value> = s["body"]["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| match i.as_array().unwrap().as_slice() {
            [a] => a.clone(),
            [a, b] => pair(a, b),
            _ => unreachable!(),
        })
        .collect();
    let want = native(&server, items);
    assert_eq!(body.as_array().unwrap().len(), want.len());
    for (row, w) in body.as_array().unwrap().iter().zip(&want) {
        close(&row[0]["score"], sigmoid(*w), "tei batch");
    }
}

#[test]
fn tei_rerank_and_its_twin_on_post_root() {
    let server = start();
    let s = sample("tei_rerank");
    let body = replay(&server, &s);
    let query = &s["body"]["query"];
    let texts = s["body"]["texts"].as_array().unwrap();
    let want = native(&server, texts.iter().map(|t| pair(query, t)).collect());
    let ranked = body.as_array().unwrap();
    assert_eq!(ranked.len(), texts.len());
    for w in ranked.windows(2) {
        assert!(w[0]["score"].as_f64() >= w[1]["score"].as_f64());
    }
    for r in ranked {
        let i = r["index"].as_u64().unwrap() as usize;
        close(&r["score"], sigmoid(want[i]), "tei rerank");
        assert_eq!(r["text"], texts[i], "return_text");
    }
    // TEI answers POST / as /rerank for a one-label model.
    let (status, root) = server.post("/", &s["body"]);
    assert_eq!(status, 200);
    assert_eq!(root, body);
}

#[test]
fn huggingface_inference_client_text_classification() {
    let server = start();
    let s = sample("hf_inference_client_text_classification");
    let body = replay(&server, &s);
    let want = native(&server, vec![s["body"]["inputs"].clone()]);
    // The client reads element 0 of a nested list.
    close(
        &body[0][0]["score"],
        sigmoid(want[0]),
        "text_classification default",
    );
    assert_eq!(body[0][0]["label"], "LABEL_0");
    let s = sample("hf_inference_client_text_classification_params");
    let body = replay(&server, &s);
    assert_eq!(body[0].as_array().unwrap().len(), 1, "top_k");
    close(&body[0][0]["score"], want[0], "function_to_apply none");
}

#[test]
fn vllm_classify_as_verl_and_pooling_clients_send_it() {
    let server = start();
    let s = sample("vllm_classify_string");
    let body = replay(&server, &s);
    let want = native(&server, vec![s["body"]["input"].clone()]);
    assert_eq!(body["object"], "list");
    assert!(body["id"].as_str().unwrap().starts_with("classify-"));
    assert!(body["created"].is_u64());
    assert_eq!(body["data"][0]["index"], 0);
    assert_eq!(body["data"][0]["num_classes"], 1);
    assert_eq!(body["data"][0]["label"], "LABEL_0");
    close(
        &body["data"][0]["probs"][0],
        sigmoid(want[0]),
        "classify default sigmoid",
    );
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() > 0);

    let s = sample("vllm_classify_list");
    let body = replay(&server, &s);
    let want = native(&server, s["body"]["input"].as_array().unwrap().clone());
    for (i, w) in want.iter().enumerate() {
        assert_eq!(body["data"][i]["index"], i);
        close(&body["data"][i]["probs"][0], *w, "classify list raw");
    }

    let s = sample("vllm_classify_messages");
    let body = replay(&server, &s);
    let want = native(&server, vec![json!({"messages": s["body"]["messages"]})]);
    close(
        &body["data"][0]["probs"][0],
        want[0],
        "classify messages raw",
    );

    // verl reads data[-1].probs[-1] and expects the raw reward.
    for name in ["verl_reward", "verl_reward_legacy_activation"] {
        let s = sample(name);
        let body = replay(&server, &s);
        let want = native(&server, vec![s["body"]["input"].clone()]);
        let last = body["data"].as_array().unwrap().last().unwrap();
        close(
            last["probs"].as_array().unwrap().last().unwrap(),
            want[0],
            name,
        );
    }
}

#[test]
fn vllm_score_and_rerank() {
    let server = start();
    let s = sample("vllm_score_text");
    let body = replay(&server, &s);
    let docs = s["body"]["text_2"].as_array().unwrap();
    let want = native(
        &server,
        docs.iter().map(|d| pair(&s["body"]["text_1"], d)).collect(),
    );
    for (i, w) in want.iter().enumerate() {
        assert_eq!(body["data"][i]["object"], "score");
        close(
            &body["data"][i]["score"],
            sigmoid(*w),
            "score text_1/text_2",
        );
    }

    // On /v1/score, told apart from warm's own body by its fields.
    let s = sample("vllm_score_queries_documents");
    let body = replay(&server, &s);
    let (q, d) = (
        s["body"]["queries"].as_array().unwrap(),
        s["body"]["documents"].as_array().unwrap(),
    );
    let want = native(&server, q.iter().zip(d).map(|(q, d)| pair(q, d)).collect());
    for (i, w) in want.iter().enumerate() {
        close(&body["data"][i]["score"], *w, "score queries/documents raw");
    }

    // On /v1/rerank, told apart from warm's best-of-N body by `documents`.
    let s = sample("vllm_rerank");
    let body = replay(&server, &s);
    let docs = s["body"]["documents"].as_array().unwrap();
    let want = native(
        &server,
        docs.iter().map(|d| pair(&s["body"]["query"], d)).collect(),
    );
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "top_n");
    for r in results {
        let i = r["index"].as_u64().unwrap() as usize;
        close(&r["relevance_score"], sigmoid(want[i]), "rerank");
        assert_eq!(r["document"]["text"], docs[i]);
    }
    assert!(results[0]["relevance_score"].as_f64() >= results[1]["relevance_score"].as_f64());
    // The same body on /rerank (vLLM's other name for it).
    let (status, again) = server.post("/rerank", &s["body"]);
    assert_eq!(status, 200);
    assert_eq!(again["results"], body["results"]);

    // Cohere's v2 client on /v2/rerank (vLLM serves it there too): the same ranking.
    let s = sample("cohere_v2_rerank");
    let cohere = replay(&server, &s);
    let docs = s["body"]["documents"].as_array().unwrap();
    let want = native(
        &server,
        docs.iter().map(|d| pair(&s["body"]["query"], d)).collect(),
    );
    let results = cohere["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "top_n");
    let mut best = (0..want.len()).collect::<Vec<_>>();
    best.sort_by(|&a, &b| want[b].total_cmp(&want[a]));
    for (r, &i) in results.iter().zip(&best) {
        assert_eq!(r["index"], i);
        close(&r["relevance_score"], sigmoid(want[i]), "cohere v2 rerank");
    }
    // vLLM's error shape.
    let (status, err) = server.post("/classify", &json!({"model": "x"}));
    assert_eq!(status, 400);
    assert!(
        err["error"]["message"].is_string() && err["error"]["code"] == 400,
        "{err}"
    );
}

#[test]
fn openrlhf_get_reward() {
    let server = start();
    let s = sample("openrlhf_get_reward");
    let body = replay(&server, &s);
    assert_eq!(body["rewards"].as_array().unwrap().len(), 1);
    assert_eq!(body["rewards"], body["scores"]);
    assert!(body["extra_logs"].is_object());
    // OpenRLHF sends text already templated by the actor, tokenized without special tokens:
    // the rendered chat template of a pair scores as transformers scored that pair.
    let exp: Value = serde_json::from_slice(
        &std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/expected/llama.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let cases: Vec<&Value> = exp["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["rendered"].is_string())
        .collect();
    assert!(!cases.is_empty());
    let queries: Vec<&Value> = cases.iter().map(|c| &c["rendered"]).collect();
    let (status, body) = server.post(
        "/get_reward",
        &json!({"query": queries, "prompts": queries, "labels": vec![""; cases.len()]}),
    );
    assert_eq!(status, 200, "{body}");
    for (got, case) in body["rewards"].as_array().unwrap().iter().zip(&cases) {
        close(
            got,
            case["score"].as_f64().unwrap(),
            "get_reward vs transformers",
        );
    }
}

/// Over-long queries are cut from the start for a decoder: two queries that differ only
/// before their last 16 tokens get one reward (the end, where the reward is read, is
/// kept), and it differs from the untruncated reward.
#[test]
fn get_reward_keeps_the_end_of_over_long_queries() {
    let llama = fixture("llama").display().to_string();
    let server = Server::started(&["--model", &llama, "--max-input-length", "16"]);
    let ending = "and so the answer to the question is four, as two and two make four in every base above four.";
    let queries = [
        format!("Alpha beta gamma delta epsilon zeta eta theta iota kappa. {ending}"),
        format!("Once upon a time a very different story began right here. {ending}"),
    ];
    let (status, cut) = server.post("/get_reward", &json!({ "query": queries }));
    assert_eq!(status, 200, "{cut}");
    let cut = cut["rewards"].as_array().unwrap();
    close(&cut[0], cut[1].as_f64().unwrap(), "same last 16 tokens");
    let whole = start();
    let (status, full) = whole.post("/get_reward", &json!({ "query": queries }));
    assert_eq!(status, 200, "{full}");
    let full = full["rewards"].as_array().unwrap();
    assert!(
        (full[0].as_f64().unwrap() - full[1].as_f64().unwrap()).abs() > 1e-3,
        "the beginnings matter untruncated: {full:?}"
    );
}

#[test]
fn get_reward_takes_batches_of_thousands() {
    let server = start();
    let queries: Vec<String> = (0..3000)
        .map(|i| format!("<s>[INST] What is {i} + 1? [/INST] {}", i + 1))
        .collect();
    let started = std::time::Instant::now();
    let (status, body) = server.post("/get_reward", &json!({"query": queries}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["rewards"].as_array().unwrap().len(), 3000);
    eprintln!(
        "3000 queries scored in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// POLAR's reward client (server_type "sglang", its default) posts its texts to SGLang's
/// native /classify and reads `embedding[0]` of each item: transformers' scores, with the
/// reward token the client wrote and no second one. Its lmdeploy mode (/pooling) too.
#[test]
fn sglang_classify_as_polar_sends_it() {
    let server = Server::started(&["--model", &fixture("polar-rm").display().to_string()]);
    let expected = common::cases::expected("polar-rm");
    let cases = expected["cases"].as_array().unwrap();
    let s = sample("sglang_classify_polar");
    let body = replay(&server, &s);
    let items = body
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {body}"));
    assert_eq!(items.len(), cases.len());
    let texts: Vec<Value> = cases.iter().map(|c| c["text"].clone()).collect();
    assert_eq!(s["body"]["text"].as_array().unwrap(), &texts);
    let want = native(&server, texts.clone());
    for (i, (item, case)) in items.iter().zip(cases).enumerate() {
        let score = case["score"].as_f64().unwrap();
        let got = item["embedding"][0].as_f64().unwrap();
        assert!(
            (got - score).abs() < 1e-4,
            "case {i}: {got} vs transformers {score}"
        );
        close(&item["embedding"][0], want[i], "native /v1/score");
        assert_eq!(item["embedding"].as_array().unwrap().len(), 1);
        let tokens = case["ids"].as_array().unwrap().len();
        assert_eq!(item["meta_info"]["prompt_tokens"], tokens, "case {i}");
        assert!(item["meta_info"]["id"].is_string());
        assert!(item["meta_info"]["e2e_latency"].is_f64());
    }

    // POLAR's lmdeploy mode posts the same texts to /pooling and reads `data[i].data`, a
    // number per input, as lmdeploy answers for its reward models.
    let s = sample("lmdeploy_pooling_polar");
    let pooled = replay(&server, &s);
    assert_eq!(pooled["object"], "list");
    for (i, case) in cases.iter().enumerate() {
        let item = &pooled["data"][i];
        assert_eq!(item["index"], i);
        assert_eq!(item["object"], "pooling");
        let got = item["data"]
            .as_f64()
            .unwrap_or_else(|| panic!("not a number: {item}"));
        let score = case["score"].as_f64().unwrap();
        assert!((got - score).abs() < 1e-4, "pooling {i}: {got} vs {score}");
    }
    let (status, e) = server.post(
        "/pooling",
        &json!({"input": texts[0], "use_activation": true}),
    );
    assert_eq!(status, 422, "{e}");

    // One string: one object, `rid` as its id.
    let (status, one) = server.post("/classify", &json!({"text": texts[0], "rid": "r-1"}));
    assert_eq!(status, 200, "{one}");
    close(&one["embedding"][0], want[0], "one string");
    assert_eq!(one["meta_info"]["id"], "r-1");

    // A training batch in one request, beyond --max-client-batch-size (256).
    let batch: Vec<Value> = (0..300).map(|i| texts[i % texts.len()].clone()).collect();
    let (status, all) = server.post("/classify", &json!({"model": "m", "text": batch}));
    assert_eq!(status, 200, "{all}");
    assert_eq!(all.as_array().map(Vec::len), Some(300));
    close(
        &all[299]["embedding"][0],
        want[299 % texts.len()],
        "item 299",
    );

    // vLLM's body on the same route is still vLLM's.
    let (status, v) = server.post(
        "/classify",
        &json!({"model": "m", "input": texts[0], "use_activation": false}),
    );
    assert_eq!(status, 200, "{v}");
    close(&v["data"][0]["probs"][0], want[0], "vLLM /classify");

    // SGLang's error shape.
    for (bad, says) in [
        (
            json!({"text": "a", "input_ids": [1, 2]}),
            "at the same time",
        ),
        (json!({"input_ids": [[1, -2]]}), "integers from 0"),
        (json!({"input_ids": "1 2"}), "list of token ids"),
        (json!({"text": []}), "non-empty"),
        (json!({"text": ["a", "b"], "rid": "one"}), "rid"),
    ] {
        let (status, e) = server.post("/classify", &bad);
        assert_eq!(status, 400, "{bad}: {e}");
        let message = e["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{bad}: {e}");
    }
}

/// verl's reward loop with the sglang engine posts one templated sample to SGLang's
/// OpenAI-compatible /v1/embeddings and reads `data[-1].embedding[-1]`: the raw reward.
#[test]
fn sglang_embeddings_as_verl_sends_it() {
    let server = start();
    let s = sample("verl_reward_sglang");
    let body = replay(&server, &s);
    let want = native(&server, vec![s["body"]["input"].clone()]);
    assert_eq!(body["object"], "list");
    let last = body["data"].as_array().unwrap().last().unwrap();
    assert_eq!(last["object"], "embedding");
    close(
        last["embedding"].as_array().unwrap().last().unwrap(),
        want[0],
        "verl sglang",
    );
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() > 0);

    // A list keeps its order; base64 (what OpenAI's Python client asks for) holds the same
    // floats, little-endian f32.
    let texts = vec![json!("2+2 is 4"), json!("2+2 is 5"), json!("Paris.")];
    let want = native(&server, texts.clone());
    for format in ["float", "base64"] {
        let (status, b) = server.post(
            "/v1/embeddings",
            &json!({"model": "rm", "input": texts, "encoding_format": format}),
        );
        assert_eq!(status, 200, "{b}");
        for (i, w) in want.iter().enumerate() {
            assert_eq!(b["data"][i]["index"], i);
            let got = match format {
                "float" => b["data"][i]["embedding"][0].as_f64().unwrap(),
                _ => {
                    use base64::Engine;
                    let text = b["data"][i]["embedding"].as_str().unwrap();
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(text)
                        .unwrap();
                    f64::from(f32::from_le_bytes(bytes[..4].try_into().unwrap()))
                }
            };
            close(&json!(got), *w, format);
        }
    }

    for (bad, says) in [
        (json!({"input": [[1, 2, 3], []]}), "empty list of token ids"),
        (json!({"input": [1, "a"]}), "list of token ids"),
        (json!({"input": "a", "dimensions": 8}), "dimensions"),
        (
            json!({"input": "a", "encoding_format": "int8"}),
            "encoding_format",
        ),
        (json!({"model": "rm"}), "input"),
    ] {
        let (status, e) = server.post("/v1/embeddings", &bad);
        assert_eq!(status, 400, "{bad}: {e}");
        assert_eq!(e["object"], "error", "{e}");
        assert_eq!(e["code"], 400, "{e}");
        assert!(
            e["message"].as_str().unwrap_or_default().contains(says),
            "{e}"
        );
    }
}

/// LLaMA-Factory's PPO with `reward_model_type: api` posts the decoded query and response
/// texts (template tokens as text) and reads `scores`: transformers' scores of its
/// value-head reward model, in order.
#[test]
fn llamafactory_score_evaluation() {
    let server = Server::started(&[
        "--model",
        &fixture("llamafactory-qwen2").display().to_string(),
    ]);
    let expected = common::cases::expected("llamafactory-qwen2");
    let want: Vec<f64> = expected["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c.get("rendered").is_some())
        .map(|c| c["score"].as_f64().unwrap())
        .collect();
    let s = sample("llamafactory_score_evaluation");
    let body = replay(&server, &s);
    assert_eq!(body["object"], "score.evaluation");
    assert!(body["id"].as_str().unwrap().starts_with("scoreval-"));
    assert_eq!(body["model"], "model");
    let scores = body["scores"].as_array().unwrap();
    assert_eq!(scores.len(), want.len());
    for (i, (got, want)) in scores.iter().zip(&want).enumerate() {
        let got = got.as_f64().unwrap();
        assert!(
            (got - want).abs() < 1e-4,
            "{i}: {got} vs transformers {want}"
        );
    }

    // `max_length` truncates (keeping the end, where the value head reads) instead of
    // refusing; the score then differs from the whole text's.
    let first = &s["body"]["messages"][0];
    let (status, cut) = server.post(
        "/v1/score/evaluation",
        &json!({"model": "model", "messages": [first], "max_length": 8}),
    );
    assert_eq!(status, 200, "{cut}");
    assert!((cut["scores"][0].as_f64().unwrap() - want[0]).abs() > 1e-4);

    for bad in [
        json!({"model": "model", "messages": []}),
        json!({"model": "model"}),
        json!({"model": "model", "messages": ["a"], "max_length": 0}),
    ] {
        let (status, e) = server.post("/v1/score/evaluation", &bad);
        assert_eq!(status, 400, "{bad}: {e}");
        assert!(e["detail"].is_string(), "{e}");
    }
}

/// slime's `remote_rm` posts one sample at a time, `{"prompt", "response", "label"}`, and
/// takes the JSON answer as the reward: a number. The prompt as the dataset holds it is
/// the user's turn (transformers' score of the pair through the chat template); the
/// policy's templated prompt (`?prompt=templated`) is text that the response continues,
/// scored as `/get_reward` scores that text.
#[test]
fn slime_remote_rm() {
    let server = start();
    let expected = common::cases::expected("llama");
    let pairs: Vec<&Value> = expected["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "pair")
        .collect();

    let s = sample("slime_remote_rm");
    let reward = replay(&server, &s);
    assert_eq!(s["body"]["prompt"], pairs[0]["prompt"]);
    close(
        &reward,
        pairs[0]["score"].as_f64().unwrap(),
        "raw prompt vs transformers",
    );

    let s = sample("slime_remote_rm_templated");
    let reward = replay(&server, &s);
    let text = format!(
        "{}{}",
        s["body"]["prompt"].as_str().unwrap(),
        s["body"]["response"].as_str().unwrap()
    );
    let (status, got) = server.post("/get_reward", &json!({ "query": [text] }));
    assert_eq!(status, 200, "{got}");
    close(
        &reward,
        got["rewards"][0].as_f64().unwrap(),
        "templated vs /get_reward",
    );
    // Not the pair's score: the template's end of turn after the response is not there.
    assert!((reward.as_f64().unwrap() - pairs[1]["score"].as_f64().unwrap()).abs() > 1e-4);

    // A message list is the conversation the response answers.
    let chat = expected["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["kind"] == "chat")
        .unwrap();
    let messages = chat["messages"].as_array().unwrap();
    let (last, before) = messages.split_last().unwrap();
    let (status, reward) = server.post(
        "/remote_rm",
        &json!({"prompt": before, "response": last["content"], "label": "x"}),
    );
    assert_eq!(status, 200, "{reward}");
    close(
        &reward,
        chat["score"].as_f64().unwrap(),
        "messages vs transformers",
    );

    for (route, bad) in [
        (
            "/remote_rm?prompt=chat",
            json!({"prompt": "a", "response": "b"}),
        ),
        ("/remote_rm", json!({"prompt": "a"})),
        ("/remote_rm", json!({"response": "b"})),
        ("/remote_rm", json!({"prompt": 3, "response": "b"})),
        (
            "/remote_rm",
            json!({"prompt": [{"role": "user"}], "response": "b"}),
        ),
        (
            "/remote_rm?prompt=templated",
            json!({"prompt": [], "response": "b"}),
        ),
    ] {
        let (status, e) = server.post(route, &bad);
        assert_eq!(status, 400, "{route} {bad}: {e}");
        assert!(e["error"].is_string(), "{e}");
    }
}

/// Token-id inputs (vLLM's `input` as ids or lists of ids, SGLang's `input_ids`, OpenAI's
/// embeddings input) are scored as given: the fixture's ids as transformers encoded them
/// get transformers' scores on every route that takes them.
#[test]
fn token_id_inputs_score_as_given() {
    let server = start();
    let expected = common::cases::expected("llama");
    let cases = expected["cases"].as_array().unwrap();
    let ids: Vec<Value> = cases.iter().map(|c| c["ids"].clone()).collect();
    let want: Vec<f64> = cases.iter().map(|c| c["score"].as_f64().unwrap()).collect();

    let (status, b) = server.post(
        "/classify",
        &json!({"model": "m", "input": ids, "use_activation": false}),
    );
    assert_eq!(status, 200, "{b}");
    for (i, w) in want.iter().enumerate() {
        close(
            &b["data"][i]["probs"][0],
            *w,
            &format!("vLLM /classify ids {i}"),
        );
    }
    assert_eq!(
        b["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        ids.iter()
            .map(|i| i.as_array().unwrap().len())
            .sum::<usize>()
    );
    // One flat list of ids is one input.
    let (status, b) = server.post("/pooling", &json!({"input": ids[1]}));
    assert_eq!(status, 200, "{b}");
    close(&b["data"][0]["data"], want[1], "/pooling one id list");
    let (status, b) = server.post("/classify", &json!({"input_ids": ids}));
    assert_eq!(status, 200, "{b}");
    for (i, w) in want.iter().enumerate() {
        close(&b[i]["embedding"][0], *w, &format!("SGLang input_ids {i}"));
    }
    let (status, b) = server.post("/classify", &json!({"input_ids": ids[2]}));
    assert_eq!(status, 200, "{b}");
    close(&b["embedding"][0], want[2], "SGLang one id list");
    let (status, b) = server.post("/v1/embeddings", &json!({"input": [ids[0], ids[3]]}));
    assert_eq!(status, 200, "{b}");
    close(&b["data"][1]["embedding"][0], want[3], "/v1/embeddings ids");

    // The native route takes them as `{"input_ids"}` inputs, beside texts.
    let inputs: Vec<Value> = ids.iter().map(|i| json!({ "input_ids": i })).collect();
    let (status, b) = server.post("/v1/score", &json!({ "inputs": inputs }));
    assert_eq!(status, 200, "{b}");
    for (i, w) in want.iter().enumerate() {
        close(&b["scores"][i], *w, &format!("native input_ids {i}"));
    }
    for bad in [
        json!({"input_ids": [1, -2]}),
        json!({"input_ids": [1, 2], "prompt": "a"}),
        json!({"input_ids": "1 2"}),
    ] {
        let (status, e) = server.post("/v1/score", &json!({ "inputs": [bad] }));
        assert_eq!(status, 400, "{bad}: {e}");
        assert!(e["error"].as_str().unwrap().contains("input_ids"), "{e}");
    }
    let (status, e) = server.post("/v1/score", &json!({"inputs": [{"input_ids": []}]}));
    assert_eq!(status, 422, "{e}");

    // truncate_prompt_tokens keeps the last tokens of ids too: those ids' score alone.
    let long = ids[2].as_array().unwrap();
    let tail: Vec<Value> = long[long.len() - 10..].to_vec();
    let (status, cut) = server.post(
        "/classify",
        &json!({"input": [long], "truncate_prompt_tokens": 10, "use_activation": false}),
    );
    assert_eq!(status, 200, "{cut}");
    let (status, alone) = server.post(
        "/classify",
        &json!({"input": [tail], "use_activation": false}),
    );
    assert_eq!(status, 200, "{alone}");
    assert_eq!(cut["data"][0]["probs"], alone["data"][0]["probs"]);

    // An id the model has no embedding for: the model cannot serve it (422), by name.
    let vocab = common::read_config(&fixture("llama"))["vocab_size"]
        .as_u64()
        .unwrap();
    let (status, e) = server.post("/classify", &json!({"input": [[1, vocab]]}));
    assert_eq!(status, 422, "{e}");
    let message = e["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(&format!("token id {vocab}")), "{e}");
}

/// What the OpenAPI document allows and Python servers take (scripts/fuzz-api.sh found
/// each of these refused): integers written as floats (`7.0`), counts beyond any list
/// (`top_n` 1e30), optional fields set to null, and errors in JSON even for a bad query
/// string.
#[test]
fn numbers_nulls_and_query_strings_as_clients_may_write_them() {
    let server = start();
    let ids = [600.0, 39.0, 72.0, 0.0];
    let as_ints: Vec<u64> = ids.iter().map(|&f| f as u64).collect();
    let want = native(&server, vec![json!({"input_ids": as_ints})]);
    let (s, b) = server.post("/v1/score", &json!({"inputs": [{"input_ids": ids}]}));
    assert_eq!(s, 200, "{b}");
    close(&b["scores"][0], want[0], "ids written as floats");
    let (s, b) = server.post(
        "/classify",
        &json!({"input": [ids], "use_activation": false}),
    );
    assert_eq!(s, 200, "{b}");
    close(
        &b["data"][0]["probs"][0],
        want[0],
        "/classify ids written as floats",
    );
    let (s, b) = server.post("/v1/score", &json!({"inputs": [{"input_ids": [1.5]}]}));
    assert_eq!(s, 400, "{b}");

    let (s, b) = server.post(
        "/v1/rerank",
        &json!({"prompt": "2+2?", "responses": ["4", "5"], "top_n": 1e30}),
    );
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["results"].as_array().unwrap().len(), 2, "{b}");
    let (s, b) = server.post(
        "/rerank",
        &json!({"query": "2+2?", "documents": ["4", "5"], "top_n": 1.0,
                "truncate_prompt_tokens": 64.0}),
    );
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["results"].as_array().unwrap().len(), 1, "{b}");

    let (s, b) = server.post(
        "/v1/score",
        &json!({"inputs": [{"prompt": "2+2?", "response": "4", "steps": null, "messages": null}]}),
    );
    assert_eq!(s, 200, "{b}");
    let (s, b) = server.post("/", &json!({"inputs": "fine", "parameters": null}));
    assert_eq!(s, 200, "{b}");
    let (s, b) = server.post("/", &json!({"inputs": "fine", "parameters": []}));
    assert_eq!(s, 422, "{b}");

    let client = reqwest::blocking::Client::new();
    let r = client
        .post(format!("{}/remote_rm?prompt=raw&prompt=raw", server.base))
        .json(&json!({"prompt": "2+2?", "response": "4"}))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let body: Value = r.json().expect("a JSON error");
    assert!(
        body["error"].as_str().unwrap().contains("query string"),
        "{body}"
    );
}
