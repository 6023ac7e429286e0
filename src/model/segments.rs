//! How the packed rows of a batch divide into segments, and shared prompt prefixes.
//!
//! Best-of-N and GRPO-style scoring send one prompt with many responses: the inputs of a
//! batch begin with the same tokens. In a causal model (only there) those tokens' hidden states do not
//! depend on what follows them, so they can be computed once. A group of inputs sharing a
//! start becomes one prefix segment (the shared tokens, once) and one segment per input
//! (the rest); an input's segment attends to its prefix's rows as if they came before it,
//! at positions that continue from the prefix's length. Inputs sharing nothing are one
//! segment each, in input order, exactly as without sharing.

use super::Sequence;

/// The segments of the packed rows, in row order, and which segment ends each input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segments {
    lengths: Vec<usize>,
    starts: Vec<usize>,
    /// Per segment: the segment whose rows come before its own as a shared prefix.
    prefix: Vec<Option<usize>>,
    /// Per input, in input order: its last segment (the one holding its last token).
    ends: Vec<usize>,
}

impl Segments {
    /// One segment per input, in input order, nothing shared.
    pub fn plain(lengths: &[usize]) -> Self {
        Self::from_parts(
            lengths.to_vec(),
            vec![None; lengths.len()],
            (0..lengths.len()).collect(),
        )
    }

    fn from_parts(lengths: Vec<usize>, prefix: Vec<Option<usize>>, ends: Vec<usize>) -> Self {
        let starts = lengths
            .iter()
            .scan(0, |start, &len| {
                let here = *start;
                *start += len;
                Some(here)
            })
            .collect();
        Self {
            lengths,
            starts,
            prefix,
            ends,
        }
    }

    /// Segments for `sequences` where groups of them begin with at least `min_shared`
    /// common tokens (0: never), with the token ids of the packed rows. Every input keeps
    /// at least its last token in a segment of its own (the score head reads it).
    pub fn share_prefixes(sequences: &[&Sequence], min_shared: usize) -> (Self, Vec<u32>) {
        let groups = if min_shared == 0 {
            Vec::new()
        } else {
            prefix_groups(sequences, min_shared)
        };
        if groups.iter().all(|g| g.shared == 0) {
            let lengths: Vec<usize> = sequences.iter().map(|s| s.ids.len()).collect();
            let ids = sequences
                .iter()
                .flat_map(|s| s.ids.iter().copied())
                .collect();
            return (Self::plain(&lengths), ids);
        }
        let mut lengths = Vec::new();
        let mut prefix = Vec::new();
        let mut ends = vec![0; sequences.len()];
        let mut ids = Vec::with_capacity(sequences.iter().map(|s| s.ids.len()).sum());
        for group in &groups {
            let parent = (group.shared > 0).then(|| {
                let first = &sequences[group.members[0]].ids;
                ids.extend_from_slice(&first[..group.shared]);
                lengths.push(group.shared);
                prefix.push(None);
                lengths.len() - 1
            });
            for &input in &group.members {
                let own = &sequences[input].ids[group.shared..];
                ids.extend_from_slice(own);
                ends[input] = lengths.len();
                lengths.push(own.len());
                prefix.push(parent);
            }
        }
        (Self::from_parts(lengths, prefix, ends), ids)
    }

    pub fn count(&self) -> usize {
        self.lengths.len()
    }

    pub fn inputs(&self) -> usize {
        self.ends.len()
    }

    pub fn total_rows(&self) -> usize {
        self.lengths.iter().sum()
    }

    /// Rows of segment `s`: its first row and how many.
    pub fn rows(&self, s: usize) -> (usize, usize) {
        (self.starts[s], self.lengths[s])
    }

    /// The rows of the prefix segment `s` attends to before its own: first row and count
    /// (count 0 without one).
    pub fn prefix_rows(&self, s: usize) -> (usize, usize) {
        self.prefix[s].map_or((0, 0), |p| self.rows(p))
    }

    /// The segment holding packed row `row` (< `total_rows`).
    pub fn segment_of(&self, row: usize) -> usize {
        // The last segment starting at or before the row: later empty ones start after it.
        self.starts
            .partition_point(|&start| start <= row)
            .saturating_sub(1)
    }

    /// The last segment of input `i`.
    pub fn end_of(&self, input: usize) -> usize {
        self.ends[input]
    }

    /// Each row's position in its input (a segment's rows continue after its prefix).
    pub fn positions(&self) -> Vec<usize> {
        (0..self.count())
            .flat_map(|s| {
                let offset = self.prefix_rows(s).1;
                offset..offset + self.lengths[s]
            })
            .collect()
    }

    /// Row of each input's last token, in input order.
    pub fn last_rows(&self) -> Vec<u32> {
        self.ends
            .iter()
            .map(|&s| (self.starts[s] + self.lengths[s]).saturating_sub(1) as u32)
            .collect()
    }

    /// Position of each input's last token, in input order.
    pub fn last_positions(&self) -> Vec<usize> {
        self.ends
            .iter()
            .map(|&s| (self.prefix_rows(s).1 + self.lengths[s]).saturating_sub(1))
            .collect()
    }

    /// The rows of each input's tokens at `positions[input]` (in a shared prefix or in the
    /// input's own segment), input after input.
    pub fn rows_at(&self, positions: &[Vec<usize>]) -> Vec<u32> {
        self.ends
            .iter()
            .zip(positions)
            .flat_map(|(&end, at)| {
                let (prefix_start, prefix_len) = self.prefix_rows(end);
                let own_start = self.starts[end];
                at.iter().map(move |&position| {
                    let row = if position < prefix_len {
                        prefix_start + position
                    } else {
                        own_start + position - prefix_len
                    };
                    row as u32
                })
            })
            .collect()
    }

    /// Rows saved by sharing: the inputs' tokens less the packed rows.
    pub fn rows_saved(&self, sequences: &[&Sequence]) -> usize {
        let tokens: usize = sequences.iter().map(|s| s.ids.len()).sum();
        tokens.saturating_sub(self.total_rows())
    }
}

/// Inputs computed together: with `shared` > 0, their first `shared` tokens are equal.
#[derive(Debug, PartialEq, Eq)]
struct Group {
    members: Vec<usize>,
    shared: usize,
}

/// Groups of inputs that share a start worth computing once. Sorted by token ids, inputs
/// with a common start are neighbours and a run's common start is the least of its
/// neighbours' common starts. A run grows while the rows it saves do not shrink, so one
/// long shared prompt is not cut down to a short one that more inputs have in common.
fn prefix_groups(sequences: &[&Sequence], min_shared: usize) -> Vec<Group> {
    let mut order: Vec<usize> = (0..sequences.len()).collect();
    order.sort_by(|&a, &b| sequences[a].ids.cmp(&sequences[b].ids));
    let mut groups = Vec::new();
    let (mut run, mut members) = (None, Vec::new());
    for input in order {
        if let Some(done) = Run::advance(&mut run, &sequences[input].ids, min_shared) {
            let members = std::mem::take(&mut members);
            groups.push(Group {
                members,
                shared: done.shared(),
            });
        }
        members.push(input);
    }
    if let Some(done) = run {
        groups.push(Group {
            members,
            shared: done.shared(),
        });
    }
    groups
}

/// A group growing one input at a time, inputs in token order: the rule of
/// `prefix_groups`, kept apart so that the batcher can count a batch's cost as it forms.
#[derive(Debug, Clone, Copy)]
struct Run<'a> {
    members: usize,
    /// The start its members share (while one member: all of it but its last token).
    shared: usize,
    last: &'a [u32],
    longest: usize,
    tokens: usize,
}

impl<'a> Run<'a> {
    fn start(ids: &'a [u32]) -> Self {
        Self {
            members: 1,
            // At most the member's length less one: its last token stays its own.
            shared: ids.len().saturating_sub(1),
            last: ids,
            longest: ids.len(),
            tokens: ids.len(),
        }
    }

    /// The start shared once `next` (after every member in token order) joins, or None
    /// when `next` begins a group of its own.
    fn admits(&self, next: &[u32], min_shared: usize) -> Option<usize> {
        let candidate = self
            .shared
            .min(common_start(self.last, next))
            .min(next.len().saturating_sub(1));
        let saved_now = (self.members - 1) * self.shared;
        (candidate >= min_shared && self.members * candidate >= saved_now).then_some(candidate)
    }

    /// Adds `ids` (after every input so far in token order) to `run`, or starts a new run
    /// with it (always when `min_shared` is 0); returns the run that closed, if one did.
    fn advance(run: &mut Option<Self>, ids: &'a [u32], min_shared: usize) -> Option<Self> {
        let joins = match run {
            Some(current) if min_shared > 0 => current.admits(ids, min_shared),
            _ => None,
        };
        match (run.as_mut(), joins) {
            (Some(current), Some(shared)) => {
                current.join(ids, shared);
                None
            }
            _ => run.replace(Self::start(ids)),
        }
    }

    fn join(&mut self, next: &'a [u32], shared: usize) {
        self.members += 1;
        self.shared = shared;
        self.last = next;
        self.longest = self.longest.max(next.len());
        self.tokens += next.len();
    }

    /// The start computed once (0 for a group of one).
    fn shared(&self) -> usize {
        if self.members > 1 {
            self.shared
        } else {
            0
        }
    }
}

/// What a batch costs once its inputs' shared starts are computed once, counted as
/// inputs arrive in token order without building the segments.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SharedTally {
    /// Packed rows: every input's tokens, a shared start once.
    pub rows: usize,
    /// Segments attending to their own rows only (shared starts, inputs sharing nothing)
    /// and the longest of them.
    alone: usize,
    alone_longest: usize,
    /// Segments continuing a shared start and the longest of them (their own rows).
    continuing: usize,
    continuing_longest: usize,
    /// Shared starts with segments continuing them, the longest such start, and the most
    /// rows continuing one start.
    prompts: usize,
    prompt_longest: usize,
    prompt_queries: usize,
}

impl SharedTally {
    /// Rows the padded layout gathers for attention (src/model/shared_padding.rs): per
    /// block, the larger of its padded queries and keys. The batch's largest per-token
    /// tensors have that many rows.
    pub fn gathered_rows(&self) -> usize {
        self.alone * self.alone_longest
            + self.continuing * self.continuing_longest
            + self.prompts * self.prompt_longest.max(self.prompt_queries)
    }

    fn add(mut self, run: &Run) -> Self {
        let shared = run.shared();
        let continuing_rows = run.tokens - run.members * shared;
        self.rows += continuing_rows + shared;
        if shared > 0 {
            self.alone += 1;
            self.alone_longest = self.alone_longest.max(shared);
            self.continuing += run.members;
            self.continuing_longest = self.continuing_longest.max(run.longest - shared);
            self.prompts += 1;
            self.prompt_longest = self.prompt_longest.max(shared);
            self.prompt_queries = self.prompt_queries.max(continuing_rows);
        } else {
            self.alone += run.members;
            self.alone_longest = self.alone_longest.max(run.longest);
        }
        self
    }
}

/// The groups `Segments::share_prefixes` forms, followed input by input: inputs must come
/// in token order, as the batcher takes them.
#[derive(Debug, Clone, Copy)]
pub struct SharedCount<'a> {
    min_shared: usize,
    closed: SharedTally,
    run: Option<Run<'a>>,
}

impl<'a> SharedCount<'a> {
    /// With `min_shared` 0 nothing is shared.
    pub fn new(min_shared: usize) -> Self {
        Self {
            min_shared,
            closed: SharedTally::default(),
            run: None,
        }
    }

    /// The tally so far.
    pub fn tally(&self) -> SharedTally {
        self.run.map_or(self.closed, |run| self.closed.add(&run))
    }

    pub fn push(&mut self, ids: &'a [u32]) {
        if let Some(done) = Run::advance(&mut self.run, ids, self.min_shared) {
            self.closed = self.closed.add(&done);
        }
    }
}

fn common_start(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::{prompt_batch, Draws};

    fn seq(ids: &[u32]) -> Sequence {
        Sequence {
            ids: ids.to_vec(),
            type_ids: vec![0; ids.len()],
            read_at: None,
        }
    }

    #[test]
    fn inputs_sharing_nothing_stay_one_segment_each_in_input_order() {
        let a = seq(&[1, 2, 3]);
        let b = seq(&[4, 5]);
        let (segments, ids) = Segments::share_prefixes(&[&a, &b], 2);
        assert_eq!(segments, Segments::plain(&[3, 2]));
        assert_eq!(ids, vec![1, 2, 3, 4, 5]);
        assert_eq!(segments.positions(), vec![0, 1, 2, 0, 1]);
        assert_eq!(segments.last_rows(), vec![2, 4]);
    }

    #[test]
    fn a_shared_prompt_is_packed_once_and_positions_continue_after_it() {
        let a = seq(&[7, 7, 7, 1, 2]);
        let b = seq(&[9]);
        let c = seq(&[7, 7, 7, 3]);
        let (segments, ids) = Segments::share_prefixes(&[&a, &b, &c], 3);
        // Sorted by ids: a's group ([7,7,7] then [1,2], [3]) before b.
        assert_eq!(ids, vec![7, 7, 7, 1, 2, 3, 9]);
        assert_eq!(segments.count(), 4);
        assert_eq!(segments.prefix_rows(1), (0, 3));
        assert_eq!(segments.prefix_rows(2), (0, 3));
        assert_eq!(segments.prefix_rows(3), (0, 0));
        assert_eq!(segments.positions(), vec![0, 1, 2, 3, 4, 3, 0]);
        assert_eq!(segments.last_rows(), vec![4, 6, 5]);
        assert_eq!(segments.last_positions(), vec![4, 0, 3]);
        assert_eq!(segments.rows_saved(&[&a, &b, &c]), 3);
        // Under the threshold nothing is shared.
        let (plain, _) = Segments::share_prefixes(&[&a, &b, &c], 4);
        assert_eq!(plain, Segments::plain(&[5, 1, 4]));
        assert_eq!(Segments::share_prefixes(&[&a, &b, &c], 0).0, plain);
    }

    #[test]
    fn every_input_keeps_its_last_token_even_when_one_is_a_prefix_of_another() {
        let short = seq(&[5, 5, 5, 5]);
        let long = seq(&[5, 5, 5, 5, 6, 6]);
        let same = seq(&[5, 5, 5, 5]);
        let (segments, ids) = Segments::share_prefixes(&[&long, &short, &same], 2);
        assert_eq!(ids.len(), 3 + 1 + 1 + 3);
        for input in 0..3 {
            let (_, own) = segments.rows(segments.end_of(input));
            assert!(own >= 1);
        }
        assert_eq!(segments.last_positions(), vec![5, 3, 3]);
    }

    #[test]
    fn random_batches_pack_every_input_exactly_once() {
        // Seeded batches of inputs drawn from a few prompts (some empty) and short tails,
        // duplicates included: every input's tokens are its prefix's rows then its own.
        let mut draws = Draws::new(0x9e37_79b9_7f4a_7c15);
        let mut sharing = 0;
        for _ in 0..200 {
            let inputs = prompt_batch(&mut draws, 40, 5, 12, 6);
            let refs: Vec<&Sequence> = inputs.iter().collect();
            let min_shared = 1 + draws.below(8);
            let (segments, ids) = Segments::share_prefixes(&refs, min_shared);
            assert_eq!(ids.len(), segments.total_rows());
            sharing += usize::from(segments.rows_saved(&refs) > 0);
            let positions = segments.positions();
            let last_rows = segments.last_rows();
            for (i, input) in inputs.iter().enumerate() {
                let s = segments.end_of(i);
                let (prefix_start, prefix_len) = segments.prefix_rows(s);
                let (start, len) = segments.rows(s);
                assert!(len >= 1, "input {i} keeps its last token");
                assert!(prefix_len == 0 || prefix_len >= min_shared);
                let rebuilt = [
                    &ids[prefix_start..prefix_start + prefix_len],
                    &ids[start..start + len],
                ]
                .concat();
                assert_eq!(rebuilt, input.ids, "input {i}");
                let rows: Vec<usize> = (prefix_start..prefix_start + prefix_len)
                    .chain(start..start + len)
                    .collect();
                let got: Vec<usize> = rows.iter().map(|&r| positions[r]).collect();
                assert_eq!(got, (0..input.ids.len()).collect::<Vec<_>>(), "input {i}");
                assert_eq!(last_rows[i] as usize, start + len - 1);
            }
            // rows_at finds each input's token at any position, in a prefix or its own rows.
            let longest = inputs.iter().map(|s| s.ids.len()).max().unwrap_or(0);
            for p in 0..longest {
                let at: Vec<Vec<usize>> = inputs
                    .iter()
                    .map(|s| vec![p.min(s.ids.len() - 1)])
                    .collect();
                for (i, row) in segments.rows_at(&at).into_iter().enumerate() {
                    assert_eq!(
                        ids[row as usize], inputs[i].ids[at[i][0]],
                        "input {i} at {p}"
                    );
                    assert_eq!(positions[row as usize], at[i][0], "input {i} at {p}");
                }
            }
            // ... and several positions of an input at once, input after input: every
            // third position of each, none for some.
            let at: Vec<Vec<usize>> = inputs
                .iter()
                .enumerate()
                .map(|(i, s)| (i % 3..s.ids.len()).step_by(3).collect())
                .collect();
            let rows = segments.rows_at(&at);
            let wanted: Vec<(usize, usize)> = at
                .iter()
                .enumerate()
                .flat_map(|(i, a)| a.iter().map(move |&p| (i, p)))
                .collect();
            assert_eq!(rows.len(), wanted.len());
            for (&row, &(i, p)) in rows.iter().zip(&wanted) {
                assert_eq!(ids[row as usize], inputs[i].ids[p], "input {i} at {p}");
                assert_eq!(positions[row as usize], p, "input {i} at {p}");
            }
            // Every row belongs to an input: no segment is left unused.
            let used: usize = (0..segments.count())
                .filter(|&s| {
                    (0..inputs.len()).any(|i| {
                        let end = segments.end_of(i);
                        end == s || segments.prefix[end] == Some(s)
                    })
                })
                .map(|s| segments.rows(s).1)
                .sum();
            assert_eq!(used, segments.total_rows());
        }
        assert!(
            sharing >= 50,
            "only {sharing} of 200 batches shared a prompt"
        );
    }

    #[test]
    fn a_long_shared_prompt_is_not_given_up_for_a_short_one_shared_more_widely() {
        // Two inputs share 40 tokens; a third shares only 10 with them.
        let head: Vec<u32> = (0..10).collect();
        let long_a: Vec<u32> = head.iter().copied().chain(100..130).chain([1]).collect();
        let long_b: Vec<u32> = head.iter().copied().chain(100..130).chain([2]).collect();
        let other: Vec<u32> = head.iter().copied().chain([500, 501]).collect();
        let (a, b, c) = (seq(&long_a), seq(&long_b), seq(&other));
        let groups = prefix_groups(&[&a, &b, &c], 8);
        assert_eq!(
            groups,
            vec![
                Group {
                    members: vec![0, 1],
                    shared: 40
                },
                Group {
                    members: vec![2],
                    shared: 0
                }
            ]
        );
    }
}
