use std::path::PathBuf;

use super::problem::{describe, Problem};

#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    #[error("no members: give at least one --model")]
    NoMembers,
    #[error("{}", describe(.0))]
    Incompatible(Vec<Problem>),
    #[error("{path}: {source}")]
    Output {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tensor '{tensor}': {reason}")]
    Load { tensor: String, reason: String },
    /// `--device` names a device this build or machine cannot use.
    #[error("{0}")]
    Device(String),
    /// SIGINT or SIGTERM during the pass (`warm fuse`, see interrupt.rs).
    #[error("interrupted: the fusion stopped and its partial output was removed")]
    Interrupted,
}

impl FuseError {
    pub(crate) fn output(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Output {
            path: path.into(),
            source,
        }
    }
}
