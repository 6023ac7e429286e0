//! Everything that makes a set of members unfit to be averaged, each naming the member
//! folder, the file or tensor, and both values.

use std::fmt;
use std::path::PathBuf;

use crate::dtype::DType;

/// One member as named in messages: its 1-based position and folder.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberRef {
    pub index: usize,
    pub dir: PathBuf,
}

impl fmt::Display for MemberRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "member {} ({})", self.index + 1, self.dir.display())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Problem {
    /// `--weights` is unusable.
    Weights(String),
    /// A member folder could not be opened or read.
    Unreadable { member: MemberRef, reason: String },
    ConfigDiffers {
        member: MemberRef,
        base: MemberRef,
        key: String,
        value: String,
        base_value: String,
    },
    TokenizerDiffers {
        member: MemberRef,
        base: MemberRef,
        file: String,
    },
    MissingTensor {
        member: MemberRef,
        base: MemberRef,
        tensor: String,
    },
    ExtraTensor {
        member: MemberRef,
        base: MemberRef,
        tensor: String,
    },
    ShapeDiffers {
        member: MemberRef,
        base: MemberRef,
        tensor: String,
        shape: Vec<usize>,
        base_shape: Vec<usize>,
    },
    DTypeDiffers {
        member: MemberRef,
        base: MemberRef,
        tensor: String,
        dtype: DType,
        base_dtype: DType,
    },
    UnsupportedDType {
        member: MemberRef,
        tensor: String,
        dtype: DType,
    },
    NonFinite {
        member: MemberRef,
        tensor: String,
        count: usize,
        first_index: usize,
        value: f32,
    },
    IntegerTensorDiffers {
        member: MemberRef,
        base: MemberRef,
        tensor: String,
    },
    Unrelated {
        member: MemberRef,
        cosine: f64,
        threshold: f64,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Weights(reason) => write!(f, "--weights: {reason}"),
            Self::Unreadable { member, reason } => write!(f, "{member}: {reason}"),
            Self::ConfigDiffers { member, base, key, value, base_value } => write!(
                f,
                "{member}: config.json '{key}' is {value}, {base} has {base_value}"
            ),
            Self::TokenizerDiffers { member, base, file } => {
                write!(f, "{member}: {file} differs from {base}'s")
            }
            Self::MissingTensor { member, base, tensor } => {
                write!(f, "{member}: tensor '{tensor}' is missing ({base} has it)")
            }
            Self::ExtraTensor { member, base, tensor } => {
                write!(f, "{member}: tensor '{tensor}' is not in {base}")
            }
            Self::ShapeDiffers { member, base, tensor, shape, base_shape } => write!(
                f,
                "{member}: tensor '{tensor}' has shape {shape:?}, {base} has {base_shape:?}"
            ),
            Self::DTypeDiffers { member, base, tensor, dtype, base_dtype } => write!(
                f,
                "{member}: tensor '{tensor}' is stored as {dtype}, {base} as {base_dtype}"
            ),
            Self::UnsupportedDType { member, tensor, dtype } => write!(
                f,
                "{member}: tensor '{tensor}' has dtype {dtype}, which cannot be averaged (F32, F16 and BF16 can)"
            ),
            Self::NonFinite { member, tensor, count, first_index, value } => write!(
                f,
                "{member}: tensor '{tensor}' holds {count} non-finite value(s), the first {value} at flat index {first_index}"
            ),
            Self::IntegerTensorDiffers { member, base, tensor } => write!(
                f,
                "{member}: integer tensor '{tensor}' differs from {base}'s (integer tensors are copied, not averaged)"
            ),
            Self::Unrelated { member, cosine, threshold } => write!(
                f,
                "{member}: cosine similarity to the mean of the other members is {cosine:.4}, below {threshold}: not fine-tuned from the same init? (--allow-unrelated-members overrides)"
            ),
        }
    }
}

/// The one message printed when members cannot be fused: every problem, one per line.
pub fn describe(problems: &[Problem]) -> String {
    let mut text = format!(
        "cannot fuse the members: {} problem{} found",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems {
        text.push_str("\n  - ");
        text.push_str(&p.to_string());
    }
    text
}
