//! Process reward models (Qwen2.5-Math-PRM's `Qwen2ForProcessRewardModel`; a
//! token-classification PRM as TRL trains one): the fixtures tests/fixtures/models/qwen2-prm
//! and llama-trl-prm are checked for parity, step by step, in tests/parity.rs; these tests
//! serve them over HTTP (every step's reward, the weakest as the score, no
//! activation on the compat routes), combine two members both ways, truncate steps away,
//! and name what is wrong with a checkpoint or a request it cannot take.

mod common;

use std::path::{Path, PathBuf};

use common::cases::{expected, input_of, load_error};
use common::server::{fixture, Server};
use common::{unchanged, Stored};
use serde_json::{json, Value};
use warm::scorer::Scorer;
use warm::text::{Direction, TextError};

const TOLERANCE: f64 = 1e-4;

fn variant(
    edit: impl FnOnce(&mut Value),
    tensor: impl Fn(String, Stored) -> (String, Stored),
) -> (tempfile::TempDir, PathBuf) {
    common::fixture_variant("qwen2-prm", edit, tensor)
}

/// The fixture's cases as native inputs.
fn native_inputs(cases: &[Value]) -> Vec<Value> {
    cases
        .iter()
        .map(|c| match c["kind"].as_str().unwrap() {
            "pair" => json!({"prompt": c["prompt"], "response": c["response"]}),
            "text" => c["text"].clone(),
            "steps" => json!({"prompt": c["prompt"], "steps": c["steps"]}),
            _ => json!({"messages": c["messages"]}),
        })
        .collect()
}

/// Serves fixture `name` and scores all its cases in one request: each input's step
/// rewards are transformers' (to 1e-4), and its score is the fixture's. Returns the server
/// and the response.
fn serve_and_check_steps(name: &str) -> (Server, Value) {
    let expected = expected(name);
    let cases = expected["cases"].as_array().unwrap();
    let server = Server::started(&["--model", &fixture(name).display().to_string()]);
    let (status, body) = server.post("/v1/score", &json!({ "inputs": native_inputs(cases) }));
    assert_eq!(status, 200, "{body}");
    for (i, case) in cases.iter().enumerate() {
        let steps = floats(&body["step_scores"][i]);
        assert_close(&steps, &floats(&case["step_scores"]), &format!("case {i}"));
        let score = [body["scores"][i].as_f64().unwrap()];
        assert_close(&score, &[case["score"].as_f64().unwrap()], "score");
    }
    (server, body)
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn assert_close(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: {got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < TOLERANCE, "{what}: {got:?} vs {want:?}");
    }
}

/// The step rewards of every case, one at a time, by the library.
fn steps_of(dir: &Path, cases: &[Value]) -> Vec<Vec<f64>> {
    let scorer = Scorer::load_one(dir).unwrap();
    cases
        .iter()
        .map(|case| {
            let sequence = scorer.encode(&input_of(case), false, None, true).unwrap();
            let score = scorer.score(&[&sequence]).unwrap().remove(0);
            score.steps.unwrap().into_iter().map(f64::from).collect()
        })
        .collect()
}

/// One request with every case: each input's step rewards as transformers computes them,
/// its weakest as the score; rerank returns the steps beside each score; an input without
/// a step tag is refused with its index and the tag named, and the server goes on.
#[test]
fn served_steps_score_and_untagged_inputs_are_refused() {
    let expected = expected("qwen2-prm");
    let cases = expected["cases"].as_array().unwrap();
    let (server, body) = serve_and_check_steps("qwen2-prm");
    let inputs = native_inputs(cases);
    for i in 0..cases.len() {
        let steps = floats(&body["step_scores"][i]);
        let weakest = steps.iter().copied().fold(f64::INFINITY, f64::min);
        assert_close(&[body["scores"][i].as_f64().unwrap()], &[weakest], "score");
    }

    // Best-of-N over the responses of the chat cases that share a prompt.
    let shared: Vec<&Value> = cases
        .iter()
        .filter(|c| c["messages"].as_array().is_some_and(|m| m.len() == 3))
        .collect();
    let messages = &shared[0]["messages"].as_array().unwrap()[..2];
    let responses: Vec<&Value> = shared
        .iter()
        .map(|c| &c["messages"][2]["content"])
        .collect();
    let (status, body) = server.post(
        "/v1/rerank",
        &json!({"messages": messages, "responses": responses}),
    );
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), shared.len());
    for result in results {
        let case = shared[result["index"].as_u64().unwrap() as usize];
        assert_close(
            &floats(&result["step_scores"]),
            &floats(&case["step_scores"]),
            "rerank steps",
        );
        assert_close(
            &[result["score"].as_f64().unwrap()],
            &[case["score"].as_f64().unwrap()],
            "rerank score",
        );
    }

    let untagged = expected["unscorable"][0]["text"].as_str().unwrap();
    let (status, body) = server.post(
        "/v1/score",
        &json!({ "inputs": [inputs[0].clone(), untagged] }),
    );
    assert_eq!(status, 422, "{body}");
    let message = body["error"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("inputs[1]:") && message.contains("<extra_0>"),
        "{body}"
    );
    let (status, _) = server.post("/v1/score", &json!({ "inputs": [inputs[0].clone()] }));
    assert_eq!(status, 200);
    let (_, info) = server.get("/info");
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["architecture"], "Qwen2ForProcessRewardModel", "{info}");
    let tag = json!({"ids": [expected["step_tag_id"]], "text": "<extra_0>"});
    assert_eq!(info["step_tag"], tag, "{info}");
}

/// A response may be sent as its steps (`{"prompt"|"messages", "steps"}`, and a list of
/// steps per response in rerank): warm joins and ends them with the tag, and the scores
/// equal those of the tagged text. Steps for a model that is not a process reward model,
/// an empty list, a step holding the tag, and `steps` beside `response` are refused.
#[test]
fn responses_may_be_sent_as_steps() {
    let expected = expected("qwen2-prm");
    let cases = expected["cases"].as_array().unwrap();
    let tag = expected["step_tag"].as_str().unwrap();
    let steps_of_case = |c: &Value, key: &str| -> Vec<String> {
        let text = c[key].as_str().unwrap();
        let steps: Vec<String> = text.split(tag).map(str::to_string).collect();
        assert_eq!(steps.last().map(String::as_str), Some(""), "{text}");
        steps[..steps.len() - 1].to_vec()
    };
    let mut inputs = Vec::new();
    let mut want = Vec::new();
    for c in cases {
        match c["kind"].as_str().unwrap() {
            "pair" => {
                inputs.push(json!({"prompt": c["prompt"], "steps": steps_of_case(c, "response")}))
            }
            "chat" => {
                let messages = c["messages"].as_array().unwrap();
                let (last, before) = messages.split_last().unwrap();
                inputs.push(json!({"messages": before, "steps": steps_of_case(last, "content")}));
            }
            _ => continue,
        }
        want.push(c);
    }
    let server = Server::started(&["--model", &fixture("qwen2-prm").display().to_string()]);
    let (status, body) = server.post("/v1/score", &json!({ "inputs": inputs }));
    assert_eq!(status, 200, "{body}");
    for (i, c) in want.iter().enumerate() {
        assert_close(
            &floats(&body["step_scores"][i]),
            &floats(&c["step_scores"]),
            &format!("steps input {i}"),
        );
    }

    let chats: Vec<&Value> = want
        .iter()
        .copied()
        .filter(|c| c["messages"].as_array().is_some_and(|m| m.len() == 3))
        .collect();
    let messages = &chats[0]["messages"].as_array().unwrap()[..2];
    let responses: Vec<Vec<String>> = chats
        .iter()
        .map(|c| steps_of_case(&c["messages"][2], "content"))
        .collect();
    let (status, body) = server.post(
        "/v1/rerank",
        &json!({"messages": messages, "responses": responses}),
    );
    assert_eq!(status, 200, "{body}");
    for result in body["results"].as_array().unwrap() {
        let case = chats[result["index"].as_u64().unwrap() as usize];
        assert_close(
            &floats(&result["step_scores"]),
            &floats(&case["step_scores"]),
            "rerank by steps",
        );
    }

    for (input, status, words) in [
        (json!({"prompt": "2+2?", "steps": []}), 400, "empty"),
        (
            json!({"prompt": "2+2?", "steps": ["4", "so 4<extra_0>"]}),
            400,
            "step 1 holds the step tag",
        ),
        (
            json!({"prompt": "2+2?", "steps": ["4"], "response": "4"}),
            400,
            "not both",
        ),
        (
            json!({"prompt": "2+2?", "steps": "4"}),
            400,
            "list of strings",
        ),
    ] {
        let (got, body) = server.post("/v1/score", &json!({ "inputs": ["x<extra_0>", input] }));
        assert_eq!(got, status, "{body}");
        let message = body["error"].as_str().unwrap_or_default();
        assert!(
            message.starts_with("inputs[1]:") && message.contains(words),
            "{body}"
        );
    }
    let (got, body) = server.post(
        "/v1/rerank",
        &json!({"prompt": "2+2?", "responses": ["4<extra_0>", []]}),
    );
    assert_eq!(got, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .starts_with("responses[1]:"),
        "{body}"
    );
    let (got, body) = server.post(
        "/v1/rerank",
        &json!({"prompt": "2+2?", "responses": ["4<extra_0>", "5<extra_0>", ["4", 4]]}),
    );
    assert_eq!(got, 400, "{body}");
    let message = body["error"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("responses[2]: expected a string"),
        "{body}"
    );

    let outcome_model = Server::started(&["--model", &fixture("qwen2").display().to_string()]);
    let (got, body) = outcome_model.post(
        "/v1/score",
        &json!({ "inputs": [{"prompt": "2+2?", "steps": ["4"]}] }),
    );
    assert_eq!(got, 422, "{body}");
    let message = body["error"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("inputs[0]:") && message.contains("not a process reward model"),
        "{body}"
    );
}

/// The compat routes answer the weakest step's reward, a probability already, without
/// their default activation (a sigmoid over a probability would squeeze every reward into
/// [0.5, 0.73]); an activation a request asks for by name is still applied.
#[test]
fn compat_routes_return_the_probability_as_it_is() {
    let expected = expected("qwen2-prm");
    let cases = expected["cases"].as_array().unwrap();
    let rendered: Vec<&str> = cases
        .iter()
        .map(|c| c["rendered"].as_str().or(c["text"].as_str()).unwrap())
        .collect();
    let want: Vec<f64> = cases.iter().map(|c| c["score"].as_f64().unwrap()).collect();
    let server = Server::started(&["--model", &fixture("qwen2-prm").display().to_string()]);

    let (status, body) = server.post("/get_reward", &json!({ "query": rendered }));
    assert_eq!(status, 200, "{body}");
    assert_close(&floats(&body["rewards"]), &want, "/get_reward");

    let (status, body) = server.post("/predict", &json!({ "inputs": rendered[0] }));
    assert_eq!(status, 200, "{body}");
    assert_close(
        &[body[0]["score"].as_f64().unwrap()],
        &want[..1],
        "/predict",
    );

    let (status, body) = server.post(
        "/classify",
        &json!({"model": "warm", "input": rendered[..2]}),
    );
    assert_eq!(status, 200, "{body}");
    for (i, item) in body["data"].as_array().unwrap().iter().enumerate() {
        assert_close(&floats(&item["probs"]), &want[i..=i], "/classify");
    }
    let (status, body) = server.post(
        "/classify",
        &json!({"model": "warm", "input": rendered[..1], "use_activation": true}),
    );
    assert_eq!(status, 200, "{body}");
    let sigmoid = 1.0 / (1.0 + (-want[0]).exp());
    assert_close(
        &floats(&body["data"][0]["probs"]),
        &[sigmoid],
        "/classify asked",
    );
}

/// vLLM's `/pooling` as its STEP pooler answers for Qwen2.5-Math-PRM: per input, one
/// `[p_negative, p_positive]` pair per step tag, as floats or base64 float32; from texts
/// (`input`) or a conversation (`messages`). A model that is not a process reward model,
/// and raw logits, are refused in vLLM's error shape.
#[test]
fn vllm_pooling_returns_each_steps_class_probabilities() {
    use base64::Engine;

    let expected = expected("qwen2-prm");
    let cases = expected["cases"].as_array().unwrap();
    let chat = cases.iter().find(|c| c["kind"] == "chat").unwrap();
    let pairs_of = |data: &Value| -> Vec<f64> {
        let pairs = data.as_array().unwrap_or_else(|| panic!("{data}"));
        pairs
            .iter()
            .map(|pair| {
                let [n, p] = floats(pair)[..] else {
                    panic!("not a pair: {pair}")
                };
                assert!((n + p - 1.0).abs() < 1e-6, "{pair}");
                p
            })
            .collect()
    };
    let server = Server::started(&["--model", &fixture("qwen2-prm").display().to_string()]);

    let rendered: Vec<&str> = cases[..2]
        .iter()
        .map(|c| c["rendered"].as_str().unwrap())
        .collect();
    let (status, body) = server.post(
        "/pooling",
        &json!({"model": "qwen2-prm", "input": rendered}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
    assert!(body["id"].as_str().unwrap().starts_with("pool-"), "{body}");
    for (i, case) in cases[..2].iter().enumerate() {
        let item = &body["data"][i];
        assert_eq!(
            (item["index"].as_u64(), &item["object"]),
            (Some(i as u64), &json!("pooling"))
        );
        assert_close(
            &pairs_of(&item["data"]),
            &floats(&case["step_scores"]),
            "/pooling",
        );
    }

    let (status, body) = server.post(
        "/pooling",
        &json!({"model": "qwen2-prm", "messages": chat["messages"], "encoding_format": "base64"}),
    );
    assert_eq!(status, 200, "{body}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(body["data"][0]["data"].as_str().unwrap())
        .unwrap();
    let values: Vec<f64> = bytes
        .chunks_exact(4)
        .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
        .collect();
    let positive: Vec<f64> = values.chunks_exact(2).map(|pair| pair[1]).collect();
    assert_close(&positive, &floats(&chat["step_scores"]), "/pooling base64");

    let (status, body) = server.post(
        "/pooling",
        &json!({"input": rendered[0], "use_activation": false}),
    );
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("logits"),
        "{body}"
    );

    // A model that scores whole inputs gets lmdeploy's answer instead (tests/compat.rs):
    // a number per input, not step pairs.
    let outcome_model = Server::started(&["--model", &fixture("qwen2").display().to_string()]);
    let (status, body) = outcome_model.post("/pooling", &json!({"input": "Hello"}));
    assert_eq!(status, 200, "{body}");
    assert!(body["data"][0]["data"].is_f64(), "{body}");
}

/// ENS of two members: each step's reward is the members' mean, the score the mean of
/// their weakest steps, the uncertainty their spread. WARM of a member whose output layer
/// is three times the first's: the average's logits double, so each step's reward is
/// sigmoid(2 logit(p)) of the first member's p.
#[test]
fn members_combine_by_predictions_and_by_weights() {
    combine_members("qwen2-prm", &["score.2.weight", "score.2.bias"]);
    combine_members("llama-trl-prm", &["score.weight", "score.bias"]);
}

/// Fixture `name` with a member whose output layer (`head`) is three times its own.
fn combine_members(name: &str, head: &[&str]) {
    let expected = expected(name);
    let cases = expected["cases"].as_array().unwrap();
    let (_keep, tripled) = common::fixture_variant(
        name,
        |_| {},
        |tensor, t| {
            if head.contains(&tensor.as_str()) {
                (tensor, common::scaled(t, 3.0))
            } else {
                (tensor, t)
            }
        },
    );
    let first: Vec<Vec<f64>> = cases.iter().map(|c| floats(&c["step_scores"])).collect();
    let second = steps_of(&tripled, cases);
    let server = Server::started(&[
        "--model",
        &fixture(name).display().to_string(),
        "--model",
        &tripled.display().to_string(),
        "--combine",
        "predictions",
    ]);
    let (status, body) = server.post("/v1/score", &json!({ "inputs": native_inputs(cases) }));
    assert_eq!(status, 200, "{body}");
    let min = |s: &[f64]| s.iter().copied().fold(f64::INFINITY, f64::min);
    for (i, (a, b)) in first.iter().zip(&second).enumerate() {
        let mean: Vec<f64> = a.iter().zip(b).map(|(x, y)| (x + y) / 2.0).collect();
        assert_close(
            &floats(&body["step_scores"][i]),
            &mean,
            &format!("{name} ENS steps"),
        );
        let (ma, mb) = (min(a), min(b));
        assert_close(
            &[body["scores"][i].as_f64().unwrap()],
            &[(ma + mb) / 2.0],
            "ENS score",
        );
        assert_close(
            &[body["uncertainty"][i].as_f64().unwrap()],
            &[(ma - mb).abs() / 2.0],
            "ENS uncertainty",
        );
    }

    let out = tempfile::tempdir().unwrap();
    let fused = out.path().join("fused");
    common::warm_fuse(&[&fixture(name), &tripled], &fused, &[]);
    let logit = |p: f64| (p / (1.0 - p)).ln();
    for (got, want) in steps_of(&fused, cases).iter().zip(&first) {
        let doubled: Vec<f64> = want
            .iter()
            .map(|&p| 1.0 / (1.0 + (-2.0 * logit(p)).exp()))
            .collect();
        assert_close(got, &doubled, &format!("{name} WARM steps"));
    }
}

/// Truncation keeps the steps whose tags survive (from the end, by default for a decoder);
/// an input truncated down to no tag is refused.
#[test]
fn truncation_keeps_the_tagged_steps_that_remain() {
    let expected = expected("qwen2-prm");
    let case = expected["cases"]
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|c| c["step_scores"].as_array().unwrap().len())
        .unwrap()
        .clone();
    let ids: Vec<u64> = case["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    let tag = expected["step_tag_id"].as_u64().unwrap();
    let tags: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] == tag).collect();
    assert!(tags.len() >= 3, "{tags:?}");
    let scorer = Scorer::load_one(&fixture("qwen2-prm")).unwrap();
    let input = input_of(&case);

    // Keep the end from just after the first tag: every tag but the first stays.
    let keep = ids.len() - tags[0] - 1;
    let sequence = scorer
        .encode_limited(&input, keep, true, Some(Direction::Left), true)
        .unwrap();
    let score = scorer.score(&[&sequence]).unwrap().remove(0);
    assert_eq!(score.steps.map(|s| s.len()), Some(tags.len() - 1));

    // Keep the start up to the first tag, exclusive: none stays.
    match scorer.encode_limited(&input, tags[0], true, Some(Direction::Right), true) {
        Err(TextError::Unscorable(message)) => assert!(message.contains("<extra_0>"), "{message}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn what_cannot_load_or_serve_is_named() {
    // The step tag must be one token: Qwen2's own tokenizer splits it.
    let (_keep, dir) = variant(|_| {}, unchanged);
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("qwen2").join(file), dir.join(file)).unwrap();
    }
    let message = load_error(&dir);
    assert!(
        message.contains("tokenizer") && message.contains("<extra_0>"),
        "{message}"
    );

    // A head of one output, as Qwen2ForRewardModel has, is not a two-class step head.
    let (_keep, dir) = variant(
        |_| {},
        |name, t| match name.as_str() {
            "score.2.weight" | "score.2.bias" => (name, first_row(t)),
            _ => (name, t),
        },
    );
    let message = load_error(&dir);
    assert!(message.contains("score.2"), "{message}");

    // OpenRLHF's statistics standardize raw rewards, not probabilities.
    let (_keep, dir) = variant(
        |c| {
            c["mean"] = 0.5.into();
            c["std"] = 0.1.into();
        },
        unchanged,
    );
    let stderr = common::server::start_failure(&[
        "--model".as_ref(),
        dir.as_os_str(),
        "--normalize-reward".as_ref(),
    ]);
    assert!(stderr.contains("process reward model"), "{stderr}");
}

/// The first row of a float tensor (its first output, for a linear layer's weight or bias).
fn first_row(t: Stored) -> Stored {
    let rows = t.shape[0];
    let width = t.bytes.len() / rows;
    let mut shape = t.shape.clone();
    shape[0] = 1;
    Stored {
        bytes: t.bytes[..width].to_vec(),
        shape,
        ..t
    }
}

/// A copy of the Math-Shepherd-style fixture (a causal LM) with config.json edited and each
/// tensor passed through `tensor`.
fn lm_variant(
    edit: impl FnOnce(&mut Value),
    tensor: impl Fn(String, Stored) -> (String, Stored),
) -> (tempfile::TempDir, PathBuf) {
    common::fixture_variant("mistral-prm", edit, tensor)
}

/// A causal LM whose config.json names its step tag and its good and bad tokens
/// (Math-Shepherd's format): served with every step's reward, the softmax over the two
/// tokens' logits at each tag; `/pooling` in `reward_tokens` order, `[p_good, p_bad]`;
/// `steps` refused, since the tag is an ordinary token whose text does not always make it.
#[test]
fn a_causal_lm_serves_as_a_process_reward_model_by_its_config() {
    let expected = expected("mistral-prm");
    let cases = expected["cases"].as_array().unwrap();
    let (server, _) = serve_and_check_steps("mistral-prm");

    let text = cases[0]["text"].as_str().unwrap();
    let (status, body) = server.post("/pooling", &json!({ "input": text }));
    assert_eq!(status, 200, "{body}");
    let pairs = body["data"][0]["data"].as_array().unwrap();
    let good: Vec<f64> = pairs.iter().map(|p| floats(p)[0]).collect();
    assert_close(
        &good,
        &floats(&cases[0]["step_scores"]),
        "/pooling [good, bad]",
    );

    let (status, body) = server.post(
        "/v1/score",
        &json!({ "inputs": [{"prompt": "2+2?", "steps": ["4"]}] }),
    );
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("ordinary token"),
        "{body}"
    );
    let (_, info) = server.get("/info");
    let info: Value = serde_json::from_str(&info).unwrap();
    let tag = expected["step_tag_id"].clone();
    assert_eq!(
        info["step_tag"],
        json!({"ids": [tag], "text": null}),
        "{info}"
    );
}

/// The tokens may be named by their vocabulary entries instead of ids; a checkpoint that
/// ties its LM head to the input embedding (no `lm_head.weight`) reads the embedding's rows.
#[test]
fn lm_tokens_by_name_and_tied_heads_score_alike() {
    let expected = expected("mistral-prm");
    let cases = expected["cases"].as_array().unwrap();
    let want: Vec<Vec<f64>> = cases.iter().map(|c| floats(&c["step_scores"])).collect();
    let (_keep, named) = lm_variant(
        |c| c["warm_process_reward"] = json!({"step_tag": "▁ки", "reward_tokens": ["▁+", "▁-"]}),
        unchanged,
    );
    for (got, want) in steps_of(&named, cases).iter().zip(&want) {
        assert_close(got, want, "tokens by name");
    }

    // Both tables equal to the LM head, then the same without the LM head.
    let head = common::read_checkpoint(&fixture("mistral-prm"))["lm_head.weight"].clone();
    let tie = |name: String, t: Stored| match name.as_str() {
        "model.embed_tokens.weight" => (name, head.clone()),
        _ => (name, t),
    };
    let (_keep, both) = lm_variant(|_| {}, tie);
    let (_keep, tied) = lm_variant(|c| c["tie_word_embeddings"] = true.into(), tie);
    common::map_safetensors(&tied.join("model.safetensors"), |name, t| {
        match name.as_str() {
            "lm_head.weight" => ("lm_head.unused".into(), t),
            _ => (name, t),
        }
    });
    let with_head = steps_of(&both, cases);
    let without = steps_of(&tied, cases);
    assert_ne!(with_head, want, "the embedding changed the scores");
    for (got, want) in without.iter().zip(&with_head) {
        assert_close(got, want, "tied");
    }
}

/// WARM over causal-LM PRMs keeps the LM head in the fusion (its two rows are read): a
/// member whose head is three times the first's averages to twice it, and each step's
/// reward is sigmoid(2 logit(p)). Members whose step tags differ are not averaged.
#[test]
fn lm_prm_members_fuse_and_disagreeing_tags_are_refused() {
    let expected = expected("mistral-prm");
    let cases = expected["cases"].as_array().unwrap();
    let (_keep, tripled) = lm_variant(
        |_| {},
        |name, t| match name.as_str() {
            "lm_head.weight" => (name, common::scaled(t, 3.0)),
            _ => (name, t),
        },
    );
    let server = Server::started(&[
        "--model",
        &fixture("mistral-prm").display().to_string(),
        "--model",
        &tripled.display().to_string(),
    ]);
    let (status, body) = server.post("/v1/score", &json!({ "inputs": native_inputs(cases) }));
    assert_eq!(status, 200, "{body}");
    let logit = |p: f64| (p / (1.0 - p)).ln();
    for (i, case) in cases.iter().enumerate() {
        let doubled: Vec<f64> = floats(&case["step_scores"])
            .iter()
            .map(|&p| 1.0 / (1.0 + (-2.0 * logit(p)).exp()))
            .collect();
        assert_close(&floats(&body["step_scores"][i]), &doubled, "WARM steps");
    }

    let (_keep, other_tag) = lm_variant(
        |c| c["warm_process_reward"]["step_tag"] = json!(5),
        unchanged,
    );
    let stderr = common::server::start_failure(&[
        "--model".as_ref(),
        fixture("mistral-prm").as_os_str(),
        "--model".as_ref(),
        other_tag.as_os_str(),
    ]);
    assert!(stderr.contains("warm_process_reward"), "{stderr}");
}

#[test]
fn what_a_causal_lm_prm_cannot_load_with_is_named() {
    for (section, words) in [
        (
            json!({"step_tag": "<step>", "reward_tokens": ["▁+", "▁-"]}),
            "not an entry of the vocabulary",
        ),
        (
            json!({"step_tag": 100000, "reward_tokens": ["▁+", "▁-"]}),
            "beyond vocab_size",
        ),
        (
            json!({"step_tag": "▁ки", "reward_tokens": ["▁+", "▁+"]}),
            "both id",
        ),
        (json!({"step_tag": "▁ки"}), "reward_tokens"),
        (
            json!({"step_tag": "▁ки", "reward_tokens": ["▁+"]}),
            "reward_tokens",
        ),
    ] {
        let (_keep, dir) = lm_variant(|c| c["warm_process_reward"] = section.clone(), unchanged);
        let message = load_error(&dir);
        assert!(
            message.contains("warm_process_reward") && message.contains(words),
            "{section}: {message}"
        );
    }
    // Without the key, a causal LM with no value head is refused, and the key is named.
    let (_keep, dir) = lm_variant(
        |c| {
            c.as_object_mut().unwrap().remove("warm_process_reward");
        },
        unchanged,
    );
    let message = load_error(&dir);
    assert!(
        message.contains("value head") && message.contains("warm_process_reward"),
        "{message}"
    );
}

/// RLHFlow's PRMs: the step tag is a token sequence (the assistant's header, read at its
/// last token) and each step a user turn answered "+". One request scores every step of a
/// conversation as RLHFlow's evaluation does one step (one forward pass) at a time; the
/// fixture's expected step rewards come from that loop.
#[test]
fn a_tag_sequence_reads_each_step_of_a_conversation_in_one_pass() {
    let expected = expected("llama-prm");
    let (server, _) = serve_and_check_steps("llama-prm");
    // Plain text has no assistant header: refused, the tag named by its ids.
    let (status, body) = server.post("/v1/score", &json!({ "inputs": ["2 + 2 = 4."] }));
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("token ids ["),
        "{body}"
    );
    let (_, info) = server.get("/info");
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["step_tag"]["ids"], expected["step_tag_ids"], "{info}");

    // An empty sequence is no tag.
    let (_keep, dir) = common::fixture_variant(
        "llama-prm",
        |c| c["warm_process_reward"]["step_tag"] = json!([]),
        unchanged,
    );
    let message = load_error(&dir);
    assert!(message.contains("step_tag is empty"), "{message}");
}

/// A token-classification PRM as TRL's PRMTrainer trains one: a prompt with its steps, or
/// a response cut at each separator, is laid out as TRL lays it out (each piece tokenized
/// apart, the separator after every step) and every step's reward is transformers'.
/// Rerank takes lists of steps; texts and conversations are refused with the shapes it
/// takes; /info names the separator.
#[test]
fn token_classification_prms_read_steps_tokenized_apart() {
    let expected = expected("llama-trl-prm");
    let cases = expected["cases"].as_array().unwrap();
    let (server, _) = serve_and_check_steps("llama-trl-prm");

    // Best-of-N over the step lists that answer one prompt.
    let same: Vec<&Value> = cases
        .iter()
        .filter(|c| c["kind"] == "steps" && c["prompt"] == cases[0]["prompt"])
        .collect();
    let responses: Vec<&Value> = same.iter().map(|c| &c["steps"]).collect();
    let (status, body) = server.post(
        "/v1/rerank",
        &json!({"prompt": cases[0]["prompt"], "responses": responses}),
    );
    assert_eq!(status, 200, "{body}");
    for result in body["results"].as_array().unwrap() {
        let case = same[result["index"].as_u64().unwrap() as usize];
        assert_close(
            &floats(&result["step_scores"]),
            &floats(&case["step_scores"]),
            "rerank by steps",
        );
    }

    let text = expected["unscorable"][0]["text"].as_str().unwrap();
    let steps_input = json!({"prompt": cases[0]["prompt"], "steps": cases[0]["steps"]});
    for (input, status, words) in [
        (json!(text), 422, "send {\"prompt\", \"steps\""),
        (
            json!({"messages": [{"role": "user", "content": "2+2?"}], "steps": ["4"]}),
            422,
            "not a conversation",
        ),
        (json!({"prompt": "2+2?", "steps": []}), 400, "empty"),
        (json!({"prompt": "2+2?", "response": ""}), 422, "no step"),
    ] {
        let (got, body) = server.post("/v1/score", &json!({ "inputs": [steps_input, input] }));
        assert_eq!(got, status, "{input}: {body}");
        let message = body["error"].as_str().unwrap_or_default();
        assert!(
            message.starts_with("inputs[1]:") && message.contains(words),
            "{input}: {body}"
        );
    }
    let (_, info) = server.get("/info");
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        info["architecture"], "LlamaForTokenClassification",
        "{info}"
    );
    let separator = json!({"ids": expected["step_separator_ids"], "text": "\n"});
    assert_eq!(info["step_separator"], separator, "{info}");
    assert_eq!(info["step_tag"], Value::Null, "{info}");
}

/// Truncation keeps the steps whose separator it leaves (from the end by default, from
/// the start when asked), and the BOS token: attention is causal, so each kept step's
/// reward is the one it has in the whole input. Truncation that leaves no step's end is
/// refused.
#[test]
fn truncating_separated_steps_keeps_the_steps_left_whole() {
    let expected = expected("llama-trl-prm");
    let case = &expected["cases"][3];
    let all = floats(&case["step_scores"]);
    let read_at: Vec<usize> = case["read_at"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap() as usize)
        .collect();
    let scorer = Scorer::load_one(&fixture("llama-trl-prm")).unwrap();
    let input = input_of(case);
    let steps_within = |max: usize, direction: Direction| -> Vec<f64> {
        let sequence = scorer
            .encode_limited(&input, max, true, Some(direction), true)
            .unwrap();
        assert!(sequence.ids.len() <= max);
        let score = scorer.score(&[&sequence]).unwrap().remove(0);
        score.steps.unwrap().into_iter().map(f64::from).collect()
    };
    // Up to the second step's separator, from the end: the first two steps.
    assert_close(
        &steps_within(read_at[1] + 1, Direction::Right),
        &all[..2],
        "right",
    );
    let bos = expected["cases"][0]["ids"][0].as_u64().unwrap() as u32;
    let cut = scorer
        .encode_limited(&input, read_at[1] + 1, true, Some(Direction::Left), true)
        .unwrap();
    assert_eq!(cut.ids[0], bos, "BOS kept");
    assert!(matches!(
        scorer.encode_limited(&input, read_at[0], true, Some(Direction::Right), true),
        Err(TextError::Unscorable(_))
    ));
    assert!(matches!(
        scorer.encode_limited(&input, read_at[0], false, None, true),
        Err(TextError::TooLong { .. })
    ));
}

/// A token-classification model has two labels (TRL's); its separator comes from
/// config.json's `warm_process_reward.step_separator` (TRL does not save it), and nothing
/// else is taken there.
#[test]
fn token_classification_prm_configs_are_checked() {
    let (_keep, dir) = common::fixture_variant(
        "llama-trl-prm",
        |c| {
            c["num_labels"] = json!(3);
            c["id2label"] = json!({"0": "a", "1": "b", "2": "c"});
        },
        unchanged,
    );
    let message = load_error(&dir);
    assert!(
        message.contains("two labels") && message.contains("has 3"),
        "{message}"
    );

    let (_keep, dir) = common::fixture_variant(
        "llama-trl-prm",
        |c| c["warm_process_reward"] = json!({"step_tag": "\n"}),
        unchanged,
    );
    let message = load_error(&dir);
    assert!(message.contains("step_separator"), "{message}");

    // Another separator: the steps are followed by its ids (and the scores change).
    let (_keep, dir) = common::fixture_variant(
        "llama-trl-prm",
        |c| c["warm_process_reward"] = json!({"step_separator": " ."}),
        unchanged,
    );
    let scorer = Scorer::load_one(&dir).unwrap();
    let input = warm::text::Input::Steps {
        prompt: "2+2?".into(),
        steps: vec!["4".into(), "yes".into()],
    };
    let sequence = scorer.encode(&input, false, None, true).unwrap();
    let at = sequence.read_at.clone().unwrap();
    assert_eq!(at.len(), 2);
    assert_eq!(at[1], sequence.ids.len() - 1);
    let default = Scorer::load_one(&fixture("llama-trl-prm")).unwrap();
    let newline = default.encode(&input, false, None, true).unwrap();
    assert_ne!(sequence.ids, newline.ids);
}

/// Skywork's o1-Open-PRM (`Qwen2ForPrmModel`): the BOS token, the prompt and a "\n", then
/// each step tokenized apart and followed by "\n"; a step's reward is sigmoid(v_head)
/// there, as transformers computes it on Skywork's layout. Its layout writes the BOS
/// token, so a tokenizer without one is refused at load, the key named.
#[test]
fn skywork_prms_read_steps_after_a_prompt_line() {
    let expected = expected("qwen2-skywork-prm");
    let (server, _) = serve_and_check_steps("qwen2-skywork-prm");
    let (_, info) = server.get("/info");
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["architecture"], "Qwen2ForPrmModel", "{info}");
    let separator = json!({"ids": expected["step_separator_ids"], "text": "\n"});
    assert_eq!(info["step_separator"], separator, "{info}");

    let (_keep, dir) = common::fixture_variant("qwen2-skywork-prm", |_| {}, unchanged);
    for file in ["tokenizer_config.json", "special_tokens_map.json"] {
        let path = dir.join(file);
        let mut config: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        config.as_object_mut().unwrap().remove("bos_token");
        std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    }
    let message = load_error(&dir);
    assert!(
        message.contains("BOS") && message.contains("bos_token"),
        "{message}"
    );
}
