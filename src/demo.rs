//! The demo WARM set committed in `models/`: what the commands use when no `--model` is
//! given, so `warm serve` on a fresh checkout (or in the Docker image) serves a real set.

use std::path::{Path, PathBuf};

/// The set's folder under `models/`.
pub const DEMO_SET: &str = "minilm-sentiment-warm";

#[derive(Debug, thiserror::Error)]
pub enum DemoSetError {
    #[error(
        "no --model given (nor WARM_MODEL), and the demo set was not found in {}; pass --model DIR",
        searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" or ")
    )]
    NotFound { searched: Vec<PathBuf> },
    #[error("{}: the demo set folder holds no member (member-*/config.json)", .0.display())]
    Empty(PathBuf),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where the set is looked for, in order: `./models/` (a checkout, the Docker image's
/// working directory), then the source tree this binary was built from.
pub fn candidate_dirs() -> Vec<PathBuf> {
    let here = std::env::current_dir().unwrap_or_default();
    let mut dirs = vec![here.join("models").join(DEMO_SET)];
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(DEMO_SET);
    if !dirs.contains(&built_from) {
        dirs.push(built_from);
    }
    dirs
}

/// The member folders of the first demo set found, sorted by name.
pub fn demo_members() -> Result<Vec<PathBuf>, DemoSetError> {
    let searched = candidate_dirs();
    let Some(set) = searched.iter().find(|d| d.is_dir()) else {
        return Err(DemoSetError::NotFound { searched });
    };
    members_in(set)
}

/// Sub-folders named `member-*` that hold a config.json, sorted by name.
pub fn members_in(set: &Path) -> Result<Vec<PathBuf>, DemoSetError> {
    let entries = std::fs::read_dir(set).map_err(|source| DemoSetError::Io {
        path: set.to_path_buf(),
        source,
    })?;
    let mut members: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("member-"))
                && p.join("config.json").is_file()
        })
        .collect();
    members.sort();
    if members.is_empty() {
        return Err(DemoSetError::Empty(set.to_path_buf()));
    }
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_sorted_and_filtered() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["member-1", "member-0", "notes", "member-2"] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }
        for name in ["member-1", "member-0", "notes"] {
            std::fs::write(dir.path().join(name).join("config.json"), "{}").unwrap();
        }
        let members = members_in(dir.path()).unwrap();
        let names: Vec<_> = members
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(names, ["member-0", "member-1"]);
    }

    #[test]
    fn an_empty_set_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = members_in(dir.path()).unwrap_err();
        assert!(err.to_string().contains("holds no member"), "{err}");
    }
}
