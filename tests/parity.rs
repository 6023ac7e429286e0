//! Parity with Hugging Face transformers: the tiny checkpoints in tests/fixtures/models and
//! the token ids and scores transformers produced for them (tests/fixtures/generate.py).
//! Ids must be equal; scores within 1e-4, one at a time and in one padded batch.

mod common;

use std::path::{Path, PathBuf};

use common::cases::input_of;
use serde_json::Value;
use warm::model::Sequence;
use warm::scorer::Scorer;
use warm::text::{Direction, Input, Message, TextError};

const TOLERANCE: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn load(name: &str, dir: PathBuf, expected: &Path) -> (Scorer, Value) {
    let expected: Value = serde_json::from_slice(&std::fs::read(expected).unwrap()).unwrap();
    let scorer = Scorer::load_one(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    (scorer, expected)
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn check(name: &str) {
    let dir = fixtures().join("models").join(name);
    check_dir(
        name,
        dir,
        &fixtures().join("expected").join(format!("{name}.json")),
    );
}

fn check_dir(name: &str, dir: PathBuf, expected: &Path) {
    let (scorer, expected) = load(name, dir, expected);
    assert_eq!(
        scorer.max_input_length(),
        expected["max_length"].as_u64().unwrap() as usize,
        "{name}: max input length"
    );
    let cases = expected["cases"].as_array().unwrap();
    let mut sequences = Vec::new();
    let mut worst_single = 0f32;
    for (i, case) in cases.iter().enumerate() {
        let seq = scorer
            .encode(&input_of(case), false, None, true)
            .unwrap_or_else(|e| panic!("{name} case {i}: {e}"));
        assert_eq!(seq.ids, ids_of(&case["ids"]), "{name} case {i}: token ids");
        if let Some(read_at) = case.get("read_at") {
            let read_at = ids_of(read_at).into_iter().map(|p| p as usize).collect();
            assert_eq!(seq.read_at, Some(read_at), "{name} case {i}: steps' ends");
        }
        let scored = scorer.score(&[&seq]).unwrap().remove(0);
        let got = scored.value;
        let want = case["score"].as_f64().unwrap() as f32;
        assert!(
            (got - want).abs() < TOLERANCE,
            "{name} case {i}: score {got} vs transformers {want}"
        );
        let at = format!("case {i}");
        if case.get("logits").is_some() {
            let logits = Some(scored.logits.clone());
            assert_parts(name, &at, "logits", &logits, &case["logits"]);
        }
        assert_parts(name, &at, "steps", &scored.steps, &case["step_scores"]);
        let objectives = &case["objective_scores"];
        assert_parts(name, &at, "objectives", &scored.objectives, objectives);
        worst_single = worst_single.max((got - want).abs());
        sequences.push(seq);
    }
    let refs: Vec<&Sequence> = sequences.iter().collect();
    let batch = scorer.score(&refs).unwrap();
    let mut worst_batch = 0f32;
    for (i, (got, want)) in batch
        .iter()
        .zip(expected["batch_scores"].as_array().unwrap())
        .enumerate()
    {
        let want = want.as_f64().unwrap() as f32;
        assert!(
            (got.value - want).abs() < TOLERANCE,
            "{name} batch case {i}: {} vs {want}",
            got.value
        );
        let at = format!("batch case {i}");
        if let Some(logits) = expected.get("batch_logits") {
            assert_parts(name, &at, "logits", &Some(got.logits.clone()), &logits[i]);
        }
        let steps = &expected["batch_step_scores"][i];
        assert_parts(name, &at, "steps", &got.steps, steps);
        let objectives = &expected["batch_objective_scores"][i];
        assert_parts(name, &at, "objectives", &got.objectives, objectives);
        worst_batch = worst_batch.max((got.value - want).abs());
    }
    for (i, t) in expected["truncation"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let direction = match t["direction"].as_str().unwrap() {
            "left" => Direction::Left,
            _ => Direction::Right,
        };
        let max = t["max_length"].as_u64().unwrap() as usize;
        let seq = scorer
            .encode_limited(
                &Input::Text(t["text"].as_str().unwrap().into()),
                max,
                true,
                Some(direction),
                true,
            )
            .unwrap();
        assert_eq!(seq.ids, ids_of(&t["ids"]), "{name} truncation case {i}");
    }
    // Inputs the model refuses on their own (ArmoRM: no prompt's end in them; a process
    // reward model: no step tag, or for steps read apart no prompt and steps).
    let refusal = if expected.get("step_tag_ids").is_some() {
        "step tag"
    } else if expected.get("step_separator").is_some() {
        "reads a plain prompt and the steps"
    } else {
        "prompt ends"
    };
    for (i, case) in expected["unscorable"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        match scorer.encode(&input_of(case), false, None, true) {
            Err(TextError::Unscorable(message)) => {
                assert!(message.contains(refusal), "{name}: {message}")
            }
            other => panic!("{name} unscorable case {i}: expected a refusal, got {other:?}"),
        }
    }
    for t in expected["template_errors"].as_array().into_iter().flatten() {
        let messages: Vec<Message> = serde_json::from_value(t["messages"].clone()).unwrap();
        match scorer.encode(&Input::Messages(messages), false, None, true) {
            Err(TextError::Rejected(message)) => {
                assert_eq!(message, t["error"].as_str().unwrap(), "{name}")
            }
            other => {
                panic!("{name}: expected the template to reject the conversation, got {other:?}")
            }
        }
    }
    eprintln!(
        "{name}: {} cases, max |diff| single {worst_single:.2e}, batched {worst_batch:.2e}",
        cases.len()
    );
}

/// The rewards an input gets besides its score (a process reward model's `steps`, ArmoRM's
/// `objectives`) against transformers' (`want`: null for the models without).
fn assert_parts(name: &str, case: &str, what: &str, got: &Option<Vec<f32>>, want: &Value) {
    let Some(want) = want.as_array() else {
        assert_eq!(got, &None, "{name} {case}: {what} from a model without");
        return;
    };
    let got = got
        .as_ref()
        .unwrap_or_else(|| panic!("{name} {case}: no {what}"));
    assert_eq!(got.len(), want.len(), "{name} {case}: {what}");
    for (k, (got, want)) in got.iter().zip(want).enumerate() {
        let want = want.as_f64().unwrap() as f32;
        assert!(
            (got - want).abs() < TOLERANCE,
            "{name} {case} {what} {k}: {got} vs transformers {want}"
        );
    }
}

macro_rules! parity {
    ($($test:ident => $name:literal),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                check($name);
            }
        )*
    };
}

parity! {
    bert => "bert",
    roberta => "roberta",
    xlm_roberta => "xlm-roberta",
    deberta_v2 => "deberta-v2",
    llama => "llama",
    mistral => "mistral",
    qwen2 => "qwen2",
    qwen3 => "qwen3",
    gemma2 => "gemma2",
    deberta_v2_conv => "deberta-v2-conv",
    openrlhf_llama => "openrlhf-llama",
    qwen2_rm => "qwen2-rm",
    inform_llama => "inform-llama",
    llamafactory_qwen2 => "llamafactory-qwen2",
    armo_llama => "armo-llama",
    qwen2_prm => "qwen2-prm",
    mistral_prm => "mistral-prm",
    llama_prm => "llama-prm",
    llama_trl_prm => "llama-trl-prm",
    qwen2_skywork_prm => "qwen2-skywork-prm",
    internlm2_rm => "internlm2-rm",
    polar_rm => "polar-rm",
    ultrarm_llama => "ultrarm-llama",
    eurus_rm_mistral => "eurus-rm-mistral",
    gemma => "gemma",
    gpt_neox => "gpt-neox",
    gpt2 => "gpt2",
    distilbert => "distilbert",
    oasst_pythia_rm => "oasst-pythia-rm",
}

/// Real pre-trained weights (too large for the repository): run
/// `scripts/make_real_checkpoints.py OUT` with the reference environment, then
/// `WARM_REAL_MODELS=OUT cargo test --release --test parity -- --ignored --nocapture`.
#[test]
#[ignore]
fn real_models() {
    let root = PathBuf::from(std::env::var("WARM_REAL_MODELS").expect("set WARM_REAL_MODELS"));
    for entry in std::fs::read_dir(&root).unwrap() {
        let dir = entry.unwrap().path();
        let expected = dir.join("expected.json");
        if expected.is_file() {
            let name = dir.file_name().unwrap().to_string_lossy().to_string();
            check_dir(&name, dir, &expected);
        }
    }
}
