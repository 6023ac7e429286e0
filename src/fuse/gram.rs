//! The averaging pass for up to four members (the common WARM set-up), in one pass over the
//! data with every value kept in registers: each step widens the members' values, forms the
//! average around the base member b and accumulates the Gram matrix of (b, y_1..y_K), where
//! y_j = x_j - b are the other members' differences to the base. Every statistic of the
//! shared-init check is a quadratic form of that matrix, so a member's four sums cost no
//! pass of their own: on an AVX2 machine the per-member statistics were two thirds of the
//! pass's time (docs/benchmarks.md).
//!
//! The average is the same expression, in the same order, as the general pass in kernel.rs
//! (b + w_1 y_1 + w_2 y_2 + ...), so both give the same bits.

use super::kernel::MemberSums;

/// The largest basis, b and three differences: four members.
pub const MAX_MEMBERS: usize = 4;

/// One member's values, widened to f32 a few lanes at a time.
pub trait Row: Copy {
    /// Elements `at..at + L`, which the caller keeps within the row.
    fn lanes<const L: usize>(self, at: usize) -> [f32; L];
}

impl Row for &[f32] {
    #[inline(always)]
    fn lanes<const L: usize>(self, at: usize) -> [f32; L] {
        let v = &self[at..at + L];
        std::array::from_fn(|l| v[l])
    }
}

/// bf16 members read straight from their little-endian bytes: widening is a shift.
#[derive(Clone, Copy)]
pub struct Bf16Bytes<'a>(pub &'a [u8]);

impl Row for Bf16Bytes<'_> {
    #[inline(always)]
    fn lanes<const L: usize>(self, at: usize) -> [f32; L] {
        let v = &self.0[2 * at..2 * (at + L)];
        std::array::from_fn(|l| {
            f32::from_bits(u32::from(u16::from_le_bytes([v[2 * l], v[2 * l + 1]])) << 16)
        })
    }
}

/// The Gram matrix of (b, y_1..y_K) over the elements seen so far, upper triangle, in f64
/// per lane (summed over the lanes at the end: adding a block's lanes into one value was 3%
/// of `warm fuse`).
#[derive(Debug, Clone)]
pub struct Gram<const L: usize>([[[f64; L]; MAX_MEMBERS]; MAX_MEMBERS]);

impl<const L: usize> Default for Gram<L> {
    fn default() -> Self {
        Self([[[0.0; L]; MAX_MEMBERS]; MAX_MEMBERS])
    }
}

/// Per-lane f32 sums of one block, added into the f64 matrix after it so that the f32
/// rounding error stays that of a block.
type LaneGram<const L: usize> = [[[f32; L]; MAX_MEMBERS]; MAX_MEMBERS];

/// Averages elements `start..start + acc.len()` of the members into `acc` (f32, to be
/// rounded by the caller) and adds their Gram matrix to `gram`. `others` are the members
/// other than the base, in member order, with their weights `ws`.
#[inline(always)]
pub fn average_block<R: Row, const K: usize, const L: usize>(
    base: R,
    others: [R; K],
    ws: [f32; K],
    start: usize,
    acc: &mut [f32],
    gram: &mut Gram<L>,
) {
    let body = acc.len() / L * L;
    let (head, tail) = acc.split_at_mut(body);
    let mut lanes: LaneGram<L> = [[[0f32; L]; MAX_MEMBERS]; MAX_MEMBERS];
    for (s, out) in head.chunks_exact_mut(L).enumerate() {
        step::<R, K, L>(base, others, ws, start + s * L, out, &mut lanes);
    }
    gram.add_lanes(&lanes, K);
    // The last few elements one at a time.
    let mut single: LaneGram<1> = [[[0f32; 1]; MAX_MEMBERS]; MAX_MEMBERS];
    for (s, out) in tail.chunks_exact_mut(1).enumerate() {
        step::<R, K, 1>(base, others, ws, start + body + s, out, &mut single);
    }
    gram.add_lanes(&single, K);
}

#[inline(always)]
fn step<R: Row, const K: usize, const L: usize>(
    base: R,
    others: [R; K],
    ws: [f32; K],
    at: usize,
    out: &mut [f32],
    g: &mut LaneGram<L>,
) {
    let b = base.lanes::<L>(at);
    let mut a = b;
    let mut y = [[0f32; L]; K];
    for j in 0..K {
        let x = others[j].lanes::<L>(at);
        for l in 0..L {
            y[j][l] = x[l] - b[l];
            // Not an FMA: the same bits as the general pass on every CPU.
            a[l] += ws[j] * y[j][l];
        }
    }
    out.copy_from_slice(&a);
    for l in 0..L {
        g[0][0][l] += b[l] * b[l];
    }
    for p in 0..K {
        for l in 0..L {
            g[0][p + 1][l] += b[l] * y[p][l];
        }
        for q in p..K {
            for l in 0..L {
                g[p + 1][q + 1][l] += y[p][l] * y[q][l];
            }
        }
    }
}

impl<const L: usize> Gram<L> {
    /// Adds a block's lane sums, lane by lane (`N` is `L`, or 1 for the last elements).
    #[inline(always)]
    fn add_lanes<const N: usize>(&mut self, lanes: &LaneGram<N>, k: usize) {
        let rows = self.0.iter_mut().zip(lanes).take(k + 1);
        for (p, (row, lane_row)) in rows.enumerate() {
            for (sums, lane) in row.iter_mut().zip(lane_row).take(k + 1).skip(p) {
                for (s, &v) in sums.iter_mut().zip(lane) {
                    *s += f64::from(v);
                }
            }
        }
    }

    /// Entry (p, q) of the matrix.
    fn entry(&self, p: usize, q: usize) -> f64 {
        let (p, q) = if p <= q { (p, q) } else { (q, p) };
        self.0[p][q].iter().sum()
    }

    /// <u, v> for vectors given by their coefficients over the basis (b, y_1..y_K).
    fn form(
        g: &[[f64; MAX_MEMBERS]; MAX_MEMBERS],
        u: &[f64; MAX_MEMBERS],
        v: &[f64; MAX_MEMBERS],
        k: usize,
    ) -> f64 {
        let mut s = 0.0;
        for p in 0..=k {
            for q in 0..=k {
                s += u[p] * v[q] * g[p][q];
            }
        }
        s
    }

    /// Each member's [`MemberSums`], for `m` members around member `base`. With
    /// x_i = b + y_i (y_base = 0) and Y the sum of the differences: the sum of the others
    /// r_i = (M-1) b + Y - y_i, and the deviation d_i = (M-1) x_i - r_i = M y_i - Y, which
    /// is formed from the differences alone, so it keeps its precision when the members
    /// are close.
    pub fn member_sums(&self, m: usize, base: usize) -> Vec<MemberSums> {
        let k = m - 1;
        let mut g = [[0.0; MAX_MEMBERS]; MAX_MEMBERS];
        for (p, row) in g.iter_mut().enumerate().take(k + 1) {
            for (q, e) in row.iter_mut().enumerate().take(k + 1) {
                *e = self.entry(p, q);
            }
        }
        (0..m)
            .map(|i| {
                // The basis index of member i's difference, none for the base.
                let own = (i != base).then(|| if i < base { i + 1 } else { i });
                let mut x = [0.0; MAX_MEMBERS];
                let mut r = [0.0; MAX_MEMBERS];
                let mut d = [0.0; MAX_MEMBERS];
                x[0] = 1.0;
                r[0] = k as f64;
                for j in 1..=k {
                    r[j] = 1.0;
                    d[j] = -1.0;
                }
                if let Some(o) = own {
                    x[o] += 1.0;
                    r[o] -= 1.0;
                    d[o] += m as f64;
                }
                MemberSums {
                    sq: Self::form(&g, &x, &x, k),
                    dot_rest: Self::form(&g, &x, &r, k),
                    rest_sq: Self::form(&g, &r, &r, k),
                    dev_sq: Self::form(&g, &d, &d, k),
                }
            })
            .collect()
    }
}
