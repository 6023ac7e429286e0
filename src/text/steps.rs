//! A process reward model's response given as its steps: joined and ended by the model's
//! step tag, as Qwen2.5-Math-PRM's model card formats them ("<extra_0>".join(steps) +
//! "<extra_0>"), so that clients need not know the tag.

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum StepsError {
    #[error("'steps' gives a process reward model a response by its steps, and this model is not a process reward model: send the response whole")]
    NotProcessReward,
    #[error("'steps' needs the step tag's text, and this model's tag is an ordinary token that its text does not always make: send the response whole, each step ended by the tag as in training")]
    TagHasNoText,
    #[error("'steps' is empty: give at least one step")]
    Empty,
    #[error("step {index} holds the step tag {tag}, which would split it in two")]
    HoldsTag { index: usize, tag: String },
}

/// The response text of `steps` for a model whose steps end with `tag`.
pub fn join_steps(steps: &[String], tag: &str) -> Result<String, StepsError> {
    if steps.is_empty() {
        return Err(StepsError::Empty);
    }
    if let Some(index) = steps.iter().position(|s| s.contains(tag)) {
        return Err(StepsError::HoldsTag {
            index,
            tag: tag.to_string(),
        });
    }
    let mut response = String::new();
    for step in steps {
        response.push_str(step);
        response.push_str(tag);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_joined_and_ended_by_the_tag() {
        let steps = ["a".to_string(), "b c".to_string()];
        assert_eq!(join_steps(&steps, "<t>"), Ok("a<t>b c<t>".into()));
        assert_eq!(join_steps(&steps[..1], "<t>"), Ok("a<t>".into()));
        assert_eq!(join_steps(&[], "<t>"), Err(StepsError::Empty));
        let tagged = ["a".to_string(), "b<t>c".to_string()];
        assert_eq!(
            join_steps(&tagged, "<t>"),
            Err(StepsError::HoldsTag {
                index: 1,
                tag: "<t>".into()
            })
        );
    }
}
