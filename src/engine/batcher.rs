//! Forming batches under a token budget, the batch's cost counted as its layout computes
//! it (`BatchCost`). On the padded layout a batch costs sequences x longest, so sequences
//! go in order of length (a batch pads little). On packed rows it costs the real tokens.
//! Where the model computes a shared start once, on either layout, the sequences go in
//! order of their tokens, so that inputs beginning alike (one prompt's responses, from one
//! request or many) meet in one batch, and a shared start counts once (on the padded
//! layout, once as queries and once as keys for all the inputs continuing it).

use crate::model::{BatchCost, BatchLayout};

/// Limits of one forward pass.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Tokens per batch, as the layout counts them.
    pub max_batch_tokens: usize,
    pub max_batch_requests: usize,
    pub layout: BatchLayout,
}

/// One sequence waiting for a batch.
#[derive(Debug, Clone, Copy)]
pub struct Item<'a> {
    pub job: usize,
    /// Its index in the job.
    pub index: usize,
    pub ids: &'a [u32],
}

/// Returns batches of (job, index in job, length). A sequence over the budget alone gets
/// a batch of its own.
pub fn plan_batches(items: &[Item], limits: &BatchLimits) -> Vec<Vec<(usize, usize, usize)>> {
    let mut sorted = items.to_vec();
    if limits.layout.shares() {
        sorted.sort_by(|a, b| {
            a.ids
                .cmp(b.ids)
                .then((a.job, a.index).cmp(&(b.job, b.index)))
        });
    } else {
        sorted.sort_by_key(|it| (it.ids.len(), it.job, it.index));
    }
    let mut batches = Vec::new();
    let mut current: Vec<(usize, usize, usize)> = Vec::new();
    let mut cost = BatchCost::new(limits.layout);
    for item in sorted {
        if !current.is_empty()
            && (cost.tokens_with(item.ids) > limits.max_batch_tokens
                || current.len() + 1 > limits.max_batch_requests)
        {
            batches.push(std::mem::take(&mut current));
            cost = BatchCost::new(limits.layout);
        }
        current.push((item.job, item.index, item.ids.len()));
        cost.push(item.ids);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACKED_SHARING: BatchLayout = BatchLayout::PackedSharing { min_shared: 8 };
    const PADDED_SHARING: BatchLayout = BatchLayout::PaddedSharing { min_shared: 8 };

    fn items(ids: &[Vec<u32>], jobs: &[(usize, usize)]) -> Vec<Item<'static>> {
        let leaked: &'static [Vec<u32>] = Box::leak(ids.to_vec().into_boxed_slice());
        leaked
            .iter()
            .zip(jobs)
            .map(|(ids, &(job, index))| Item { job, index, ids })
            .collect()
    }

    fn limits(
        max_batch_tokens: usize,
        max_batch_requests: usize,
        layout: BatchLayout,
    ) -> BatchLimits {
        BatchLimits {
            max_batch_tokens,
            max_batch_requests,
            layout,
        }
    }

    #[test]
    fn groups_by_length_under_the_padded_budget() {
        let ids: Vec<Vec<u32>> = [100, 5, 6, 50, 7].iter().map(|&n| vec![1; n]).collect();
        let items = items(&ids, &[(0, 0), (1, 0), (1, 1), (2, 0), (2, 1)]);
        let batches = plan_batches(&items, &limits(120, 8, BatchLayout::Padded));
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
        let ids: Vec<Vec<u32>> = (0..5).map(|_| vec![1; 3]).chain([vec![1; 999]]).collect();
        let jobs: Vec<(usize, usize)> = (0..5).map(|i| (0, i)).chain([(1, 0)]).collect();
        let items = items(&ids, &jobs);
        for layout in [
            BatchLayout::Padded,
            BatchLayout::Packed,
            PACKED_SHARING,
            PADDED_SHARING,
        ] {
            let sizes: Vec<usize> = plan_batches(&items, &limits(100, 2, layout))
                .iter()
                .map(Vec::len)
                .collect();
            assert_eq!(sizes, vec![2, 2, 1, 1], "{layout:?}");
        }
    }

    #[test]
    fn packed_rows_count_real_tokens_not_padding() {
        // 10 + 90 real tokens fit 100; padded they would be 2 x 90.
        let ids = vec![vec![1; 10], vec![1; 90]];
        let items = items(&ids, &[(0, 0), (0, 1)]);
        assert_eq!(
            plan_batches(&items, &limits(100, 8, BatchLayout::Packed)).len(),
            1
        );
        for layout in [BatchLayout::Padded, PADDED_SHARING] {
            assert_eq!(plan_batches(&items, &limits(100, 8, layout)).len(), 2);
        }
    }

    #[test]
    fn inputs_beginning_alike_meet_in_one_batch_when_starts_are_shared() {
        // Two prompts' responses from four requests, lengths interleaved: by length they
        // would alternate between prompts; by tokens each prompt's are together.
        let prompt_a = vec![7u32; 20];
        let prompt_b = vec![3u32; 20];
        let with = |p: &Vec<u32>, extra: usize| -> Vec<u32> {
            p.iter()
                .copied()
                .chain(std::iter::repeat_n(9, extra))
                .collect()
        };
        let ids = vec![
            with(&prompt_a, 1),
            with(&prompt_b, 2),
            with(&prompt_a, 3),
            with(&prompt_b, 4),
        ];
        let items = items(&ids, &[(0, 0), (1, 0), (2, 0), (3, 0)]);
        // The jobs of each batch, under a budget of two inputs whole or one prompt's
        // inputs shared (packed: 21 + 1 + 3 rows; padded attention: the prompt's 21 rows
        // as queries, 2 x 3 for the responses, the prompt's 21 keys for them).
        let jobs = |layout, budget| -> Vec<Vec<usize>> {
            plan_batches(&items, &limits(budget, 8, layout))
                .iter()
                .map(|b| b.iter().map(|x| x.0).collect())
                .collect()
        };
        assert_eq!(jobs(PACKED_SHARING, 30), vec![vec![1, 3], vec![0, 2]]);
        assert_eq!(jobs(PADDED_SHARING, 50), vec![vec![1, 3], vec![0, 2]]);
        for layout in [BatchLayout::Packed, BatchLayout::Padded] {
            assert_eq!(jobs(layout, 50), vec![vec![0, 1], vec![2, 3]], "{layout:?}");
        }
    }

    #[test]
    fn a_shared_prompt_counts_once_in_the_budget() {
        // Best-of-8: a 100-token prompt, 5-token responses. Whole, each input costs 105 and
        // three exceed 250. Packed rows compute the prompt once: 100 + 8 x 5. Padded
        // attention holds it once as queries and once as keys for all the responses:
        // 100 + 8 x 5 + 100.
        let prompt: Vec<u32> = (0..100).collect();
        let ids: Vec<Vec<u32>> = (0..8u32)
            .map(|r| prompt.iter().copied().chain([1000 + r; 5]).collect())
            .collect();
        let jobs: Vec<(usize, usize)> = (0..8).map(|i| (i, 0)).collect();
        let items = items(&ids, &jobs);
        let sizes = |layout| -> Vec<usize> {
            plan_batches(&items, &limits(250, 64, layout))
                .iter()
                .map(Vec::len)
                .collect()
        };
        for layout in [PACKED_SHARING, PADDED_SHARING] {
            assert_eq!(sizes(layout), vec![8], "{layout:?}");
        }
        for layout in [BatchLayout::Packed, BatchLayout::Padded] {
            assert_eq!(sizes(layout), vec![2; 4], "{layout:?}");
        }
        // Budgets just under and at the batch's cost.
        for (layout, cost) in [(PACKED_SHARING, 140), (PADDED_SHARING, 240)] {
            let at = |budget| plan_batches(&items, &limits(budget, 64, layout)).len();
            assert_eq!((at(cost - 1), at(cost)), (2, 1), "{layout:?}");
        }
    }
}
