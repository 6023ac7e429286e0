//! OpenBMB's reward models: UltraRM (`LlamaRewardModel`) and Eurus-RM (`EurusRewardModel`),
//! a backbone under a bias-free `regression_head`. The fixtures are checked for parity in
//! tests/parity.rs; these tests average two members with `warm fuse` and name what is
//! wrong with a checkpoint that cannot load.

mod common;

use common::cases::{assert_scores, load_error};
use common::server::fixture;
use serde_json::json;

const ULTRARM: &str = "ultrarm-llama";
const EURUS: &str = "eurus-rm-mistral";

/// The second member's head is three times the first's, the average twice it, and the
/// score (linear in the head) doubles. The fused checkpoint keeps the class and its names.
#[test]
fn warm_fuse_averages_regression_heads() {
    for name in [ULTRARM, EURUS] {
        let (_keep, tripled) = common::fixture_variant(
            name,
            |_| {},
            |tensor, t| match tensor.as_str() {
                "regression_head.weight" => (tensor, common::scaled(t, 3.0)),
                _ => (tensor, t),
            },
        );
        let out = tempfile::tempdir().unwrap();
        let fused = out.path().join("fused");
        common::warm_fuse(&[&fixture(name), &tripled], &fused, &[]);
        let config = common::read_config(&fused);
        let class = if name == ULTRARM {
            "LlamaRewardModel"
        } else {
            "EurusRewardModel"
        };
        assert_eq!(config["architectures"], json!([class]));
        assert!(common::read_checkpoint(&fused).contains_key("regression_head.weight"));
        assert_scores(&fused, name, 2.0, 1e-4);
    }
}

#[test]
fn a_checkpoint_without_the_regression_head_is_named() {
    let (_keep, dir) = common::fixture_variant(
        ULTRARM,
        |_| {},
        |tensor, t| (tensor.replace("regression_head", "value_head"), t),
    );
    let message = load_error(&dir);
    assert!(
        message.contains("LlamaRewardModel") && message.contains("regression_head.weight"),
        "{message}"
    );
}
