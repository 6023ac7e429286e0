//! The activations compat routes apply to logits by default, as the originals do.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    None,
    Sigmoid,
    Softmax,
}

impl Activation {
    /// Sigmoid for one label, softmax for several (TEI, vLLM classify).
    pub fn for_labels(num_labels: usize) -> Self {
        if num_labels == 1 {
            Self::Sigmoid
        } else {
            Self::Softmax
        }
    }

    /// transformers' text-classification pipeline default for `function_to_apply`.
    pub fn pipeline_default(num_labels: usize, problem_type: Option<&str>) -> Self {
        match problem_type {
            Some("regression") => Self::None,
            Some("multi_label_classification") => Self::Sigmoid,
            _ => Self::for_labels(num_labels),
        }
    }

    pub fn apply(self, logits: &[f32]) -> Vec<f32> {
        match self {
            Self::None => logits.to_vec(),
            Self::Sigmoid => logits.iter().map(|&x| sigmoid(x)).collect(),
            Self::Softmax => {
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let exp: Vec<f64> = logits.iter().map(|&x| f64::from(x - max).exp()).collect();
                let sum: f64 = exp.iter().sum();
                exp.iter().map(|e| (e / sum) as f32).collect()
            }
        }
    }
}

pub fn sigmoid(x: f32) -> f32 {
    (1.0 / (1.0 + (-f64::from(x)).exp())) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activations() {
        assert_eq!(Activation::Sigmoid.apply(&[0.0]), vec![0.5]);
        let p = Activation::Softmax.apply(&[1.0, 1.0, 1000.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6 && p[2] > 0.99);
        assert_eq!(Activation::None.apply(&[-3.0]), vec![-3.0]);
        assert_eq!(
            Activation::pipeline_default(1, Some("regression")),
            Activation::None
        );
        assert_eq!(Activation::pipeline_default(1, None), Activation::Sigmoid);
        assert_eq!(Activation::pipeline_default(3, None), Activation::Softmax);
    }
}
