//! The fusion plan: which tensors to average, in which order, with which weights and
//! output types, and every reason the members cannot be fused.

use std::collections::BTreeSet;

use super::problem::{MemberRef, Problem};
use crate::checkpoint::{Checkpoint, TOKENIZER_FILES};
use crate::dtype::{DType, FloatDType};

#[derive(Debug, Clone)]
pub struct PlannedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub stored: DType,
    /// The type written out: the stored one for integers, else `--dtype` or the stored one.
    pub output: DType,
}

impl PlannedTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn output_bytes(&self) -> u64 {
        (self.numel() * self.output.size_in_bytes()) as u64
    }
}

#[derive(Debug)]
pub struct FusionPlan {
    /// Normalized to sum to one.
    pub weights: Vec<f32>,
    /// The member the averaged sum is formed around (the largest weight).
    pub base: usize,
    /// Tensors present and consistent in every member, in the first member's file order.
    pub tensors: Vec<PlannedTensor>,
    pub problems: Vec<Problem>,
    /// Differences that do not prevent fusion (e.g. dropout rates in config.json).
    pub warnings: Vec<String>,
}

impl FusionPlan {
    pub fn output_bytes(&self) -> u64 {
        self.tensors.iter().map(PlannedTensor::output_bytes).sum()
    }
}

pub fn member_ref(members: &[Checkpoint], index: usize) -> MemberRef {
    MemberRef {
        index,
        dir: members[index].dir().to_path_buf(),
    }
}

/// Builds the plan and lists every problem; `members` must not be empty.
pub fn plan(
    members: &[Checkpoint],
    weights: Option<&[f64]>,
    output_dtype: Option<FloatDType>,
) -> FusionPlan {
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let weights = match normalize_weights(weights, members.len()) {
        Ok(w) => w,
        Err(reason) => {
            problems.push(Problem::Weights(reason));
            vec![1.0 / members.len() as f32; members.len()]
        }
    };
    let base = (0..weights.len())
        .max_by(|&a, &b| weights[a].total_cmp(&weights[b]).then(b.cmp(&a)))
        .unwrap_or(0);
    let first = member_ref(members, 0);
    for (i, member) in members.iter().enumerate().skip(1) {
        let this = member_ref(members, i);
        let diff = member.config().compare(members[0].config());
        for (key, value, base_value) in diff.structural {
            problems.push(Problem::ConfigDiffers {
                member: this.clone(),
                base: first.clone(),
                key,
                value,
                base_value,
            });
        }
        for (key, value, base_value) in diff.cosmetic {
            warnings.push(format!(
                "{this}: config.json '{key}' is {value}, {first} has {base_value} (does not affect the weights' layout)"
            ));
        }
        for file in TOKENIZER_FILES {
            if !member.tokenizer_file_matches(file, &members[0]) {
                problems.push(Problem::TokenizerDiffers {
                    member: this.clone(),
                    base: first.clone(),
                    file: file.to_string(),
                });
            }
        }
    }
    let tensors = plan_tensors(members, output_dtype, &mut problems);
    FusionPlan {
        weights,
        base,
        tensors,
        problems,
        warnings,
    }
}

fn plan_tensors(
    members: &[Checkpoint],
    output_dtype: Option<FloatDType>,
    problems: &mut Vec<Problem>,
) -> Vec<PlannedTensor> {
    let first = member_ref(members, 0);
    let mut tensors = Vec::new();
    for info in members[0].tensors_in_file_order() {
        let mut consistent = true;
        if info.dtype.is_float() && info.dtype.as_fusable().is_none() {
            problems.push(Problem::UnsupportedDType {
                member: first.clone(),
                tensor: info.name.clone(),
                dtype: info.dtype,
            });
            consistent = false;
        }
        for (i, member) in members.iter().enumerate().skip(1) {
            let this = member_ref(members, i);
            let Some((_, other)) = member.tensor(&info.name) else {
                problems.push(Problem::MissingTensor {
                    member: this,
                    base: first.clone(),
                    tensor: info.name.clone(),
                });
                consistent = false;
                continue;
            };
            if other.shape != info.shape {
                problems.push(Problem::ShapeDiffers {
                    member: this.clone(),
                    base: first.clone(),
                    tensor: info.name.clone(),
                    shape: other.shape.clone(),
                    base_shape: info.shape.clone(),
                });
                consistent = false;
            }
            if other.dtype != info.dtype {
                problems.push(Problem::DTypeDiffers {
                    member: this,
                    base: first.clone(),
                    tensor: info.name.clone(),
                    dtype: other.dtype,
                    base_dtype: info.dtype,
                });
                consistent = false;
            }
        }
        if consistent {
            let output = match (info.dtype.as_fusable(), output_dtype) {
                (Some(_), Some(chosen)) => chosen.dtype(),
                _ => info.dtype,
            };
            tensors.push(PlannedTensor {
                name: info.name.clone(),
                shape: info.shape.clone(),
                stored: info.dtype,
                output,
            });
        }
    }
    let known: BTreeSet<&str> = members[0].tensor_names().collect();
    for (i, member) in members.iter().enumerate().skip(1) {
        for name in member.tensor_names().filter(|n| !known.contains(n)) {
            problems.push(Problem::ExtraTensor {
                member: member_ref(members, i),
                base: first.clone(),
                tensor: name.to_string(),
            });
        }
    }
    tensors
}

/// Normalizes `--weights` to sum to one (uniform when absent).
pub fn normalize_weights(weights: Option<&[f64]>, members: usize) -> Result<Vec<f32>, String> {
    let Some(weights) = weights else {
        return Ok(vec![1.0 / members as f32; members]);
    };
    if weights.len() != members {
        return Err(format!(
            "{} weight(s) given for {members} member(s)",
            weights.len()
        ));
    }
    if let Some((i, w)) = weights
        .iter()
        .enumerate()
        .find(|(_, w)| !w.is_finite() || **w < 0.0)
    {
        return Err(format!(
            "weight {} is {w}: weights must be finite and not negative",
            i + 1
        ));
    }
    let sum: f64 = weights.iter().sum();
    if sum <= 0.0 {
        return Err("the weights sum to zero".into());
    }
    Ok(weights.iter().map(|w| (w / sum) as f32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_normalized_and_checked() {
        assert_eq!(normalize_weights(None, 4).unwrap(), vec![0.25; 4]);
        assert_eq!(
            normalize_weights(Some(&[1.0, 3.0]), 2).unwrap(),
            vec![0.25, 0.75]
        );
        let err = normalize_weights(Some(&[1.0]), 2).unwrap_err();
        assert_eq!(err, "1 weight(s) given for 2 member(s)");
        let err = normalize_weights(Some(&[1.0, -0.5]), 2).unwrap_err();
        assert!(err.contains("weight 2 is -0.5"), "{err}");
        let err = normalize_weights(Some(&[f64::NAN, 1.0]), 2).unwrap_err();
        assert!(err.contains("weight 1 is NaN"), "{err}");
        let err = normalize_weights(Some(&[0.0, 0.0]), 2).unwrap_err();
        assert_eq!(err, "the weights sum to zero");
    }
}
