//! Forming batches: sequences sorted by length (so that a batch pads little), cut where the
//! padded size would pass the token budget or the batch would hold too many sequences.

/// Limits of one forward pass.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Padded tokens per batch (sequences x longest sequence).
    pub max_batch_tokens: usize,
    pub max_batch_requests: usize,
}

/// `items` are (job, index in job, length). Returns batches of items, shortest first. A
/// sequence longer than the budget gets a batch of its own.
pub fn plan_batches(
    items: &[(usize, usize, usize)],
    limits: &BatchLimits,
) -> Vec<Vec<(usize, usize, usize)>> {
    let mut sorted = items.to_vec();
    sorted.sort_by_key(|&(j, i, len)| (len, j, i));
    let mut batches = Vec::new();
    let mut current: Vec<(usize, usize, usize)> = Vec::new();
    for item in sorted {
        let longest = item.2;
        let would_be = (current.len() + 1) * longest;
        if !current.is_empty()
            && (would_be > limits.max_batch_tokens || current.len() + 1 > limits.max_batch_requests)
        {
            batches.push(std::mem::take(&mut current));
        }
        current.push(item);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_length_under_the_budget() {
        let items = vec![(0, 0, 100), (1, 0, 5), (1, 1, 6), (2, 0, 50), (2, 1, 7)];
        let limits = BatchLimits {
            max_batch_tokens: 120,
            max_batch_requests: 8,
        };
        let batches = plan_batches(&items, &limits);
        let lens: Vec<Vec<usize>> = batches
            .iter()
            .map(|b| b.iter().map(|x| x.2).collect())
            .collect();
        assert_eq!(lens, vec![vec![5, 6, 7], vec![50], vec![100]]);
        for b in &batches {
            let padded = b.len() * b.iter().map(|x| x.2).max().unwrap();
            assert!(padded <= 120 || b.len() == 1);
        }
    }

    #[test]
    fn request_limit_and_oversized_sequences() {
        let items: Vec<(usize, usize, usize)> =
            (0..5).map(|i| (0, i, 3)).chain([(1, 0, 999)]).collect();
        let limits = BatchLimits {
            max_batch_tokens: 100,
            max_batch_requests: 2,
        };
        let sizes: Vec<usize> = plan_batches(&items, &limits).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![2, 2, 1, 1]);
    }
}
