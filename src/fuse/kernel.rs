//! The CPU averaging kernel: out = sum_i w_i x_i over M members for one tensor, with f32
//! accumulation and one rounding to the output type, plus the statistics of the shared-init
//! check gathered in the same pass over the data.
//!
//! The sum is formed around a base member b (the one with the largest weight):
//! out = x_b + sum_{i != b} w_i (x_i - x_b). With weights summing to one this is the same
//! average, but it is exact when all members are equal (fusing a model with itself returns
//! it bit for bit) and more accurate when members are close, which is the WARM case.

use half::{bf16, f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;

use super::gram::{self, average_block, Bf16Bytes, Gram};
use super::sink::FusedData;
use crate::dtype::FloatDType;

/// Elements per inner block: the M widened blocks, the average and the total (2 KiB each in
/// f32) stay in the L1 cache. 1024 ran bf16 and f16 members 1.6x slower, 256 no faster
/// (`cargo bench --bench fusion`, docs/benchmarks.md).
const BLOCK: usize = 512;
/// Elements per parallel task.
const CHUNK: usize = 64 * 1024;
/// Below this many elements a tensor is done on the calling thread.
const PARALLEL_MIN: usize = 4 * CHUNK;

/// Sums over one member's elements x, with r = s - x the sum of the other members and
/// M the member count: |x|^2, <x, r>, |r|^2 and |(M-1) x - r|^2. They give the cosine of x
/// to the mean of the others and its relative distance to it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MemberSums {
    pub sq: f64,
    pub dot_rest: f64,
    pub rest_sq: f64,
    pub dev_sq: f64,
}

impl MemberSums {
    /// Whether all four sums are finite: NaN or Inf in a member's data, or squares that
    /// overflowed, make them not.
    pub fn is_finite(&self) -> bool {
        [self.sq, self.dot_rest, self.rest_sq, self.dev_sq]
            .iter()
            .all(|v| v.is_finite())
    }
}

impl std::ops::AddAssign for MemberSums {
    fn add_assign(&mut self, o: Self) {
        self.sq += o.sq;
        self.dot_rest += o.dot_rest;
        self.rest_sq += o.rest_sq;
        self.dev_sq += o.dev_sq;
    }
}

/// What averaging one tensor found out about its members.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSums {
    pub members: Vec<MemberSums>,
    /// A member whose block sums were not finite holds NaN or Inf (or values so large that
    /// their squares overflow f32): the caller scans it exactly.
    pub suspect: Vec<bool>,
}

impl TensorSums {
    pub fn zero(m: usize) -> Self {
        Self {
            members: vec![MemberSums::default(); m],
            suspect: vec![false; m],
        }
    }

    pub fn merge(mut self, other: Self) -> Self {
        for (a, b) in self.members.iter_mut().zip(other.members) {
            *a += b;
        }
        for (a, b) in self.suspect.iter_mut().zip(other.suspect) {
            *a |= b;
        }
        self
    }
}

/// An output element type.
pub trait OutElem: bytemuck::Pod + Default + Send + Sync + 'static {
    const DTYPE: FloatDType;
    /// Wraps a fused vector as sink data, and unwraps a spare buffer of this type.
    fn wrap(values: Vec<Self>) -> FusedData;
    fn unwrap(data: FusedData) -> Option<Vec<Self>>;
    fn encode(src: &[f32], dst: &mut [Self]);
    fn to_f32(self) -> f32;
}

impl OutElem for f32 {
    const DTYPE: FloatDType = FloatDType::F32;
    fn wrap(values: Vec<Self>) -> FusedData {
        FusedData::F32(values)
    }
    fn unwrap(data: FusedData) -> Option<Vec<Self>> {
        match data {
            FusedData::F32(v) => Some(v),
            _ => None,
        }
    }
    #[inline(always)]
    fn encode(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl OutElem for f16 {
    const DTYPE: FloatDType = FloatDType::F16;
    fn wrap(values: Vec<Self>) -> FusedData {
        FusedData::F16(values)
    }
    fn unwrap(data: FusedData) -> Option<Vec<Self>> {
        match data {
            FusedData::F16(v) => Some(v),
            _ => None,
        }
    }
    #[inline(always)]
    fn encode(src: &[f32], dst: &mut [Self]) {
        #[cfg(target_arch = "x86_64")]
        {
            if has_f16c() {
                // SAFETY: the CPU has F16C (and AVX), checked just above.
                return unsafe { f32_to_f16_f16c(src, dst) };
            }
        }
        // half rounds to nearest even, four lanes at a time with F16C.
        dst.convert_from_f32_slice(src);
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

impl OutElem for bf16 {
    const DTYPE: FloatDType = FloatDType::BF16;
    fn wrap(values: Vec<Self>) -> FusedData {
        FusedData::BF16(values)
    }
    fn unwrap(data: FusedData) -> Option<Vec<Self>> {
        match data {
            FusedData::BF16(v) => Some(v),
            _ => None,
        }
    }
    #[inline(always)]
    fn encode(src: &[f32], dst: &mut [Self]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = bf16::from_bits(f32_to_bf16_bits(s));
        }
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// Round to nearest even, branch-free so that it vectorizes. NaN stays NaN.
#[inline(always)]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
    let is_nan = (bits & 0x7fff_ffff) > 0x7f80_0000;
    let nan = ((bits >> 16) | 0x40) as u16;
    if is_nan {
        nan
    } else {
        (rounded >> 16) as u16
    }
}

/// Widens little-endian stored values to f32.
#[inline(always)]
pub fn decode(dtype: FloatDType, bytes: &[u8], dst: &mut [f32]) {
    match dtype {
        FloatDType::F32 => {
            for (d, c) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        FloatDType::BF16 => {
            for (d, c) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                *d = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
            }
        }
        #[cfg(target_arch = "x86_64")]
        FloatDType::F16 if has_f16c() => {
            // SAFETY: the CPU has F16C (and AVX), checked by the guard.
            unsafe { f16_to_f32_f16c(bytes, dst) }
        }
        FloatDType::F16 => match bytemuck::try_cast_slice::<u8, f16>(bytes) {
            Ok(src) => src.convert_to_f32_slice(dst),
            Err(_) => {
                for (d, c) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                    *d = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                }
            }
        },
    }
}

#[cfg(target_arch = "x86_64")]
fn has_f16c() -> bool {
    std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx")
}

/// Eight f16 to f32 at a time (`half` converts four at a time).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f16_to_f32_f16c(bytes: &[u8], dst: &mut [f32]) {
    use std::arch::x86_64::{_mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};
    let n = dst.len().min(bytes.len() / 2);
    let body = n / 8 * 8;
    let mut k = 0;
    while k < body {
        // SAFETY: k + 8 <= n: 16 bytes read at 2k and 8 floats written at k are in bounds;
        // both accesses are unaligned loads/stores.
        unsafe {
            let h = _mm_loadu_si128(bytes.as_ptr().add(2 * k).cast());
            _mm256_storeu_ps(dst.as_mut_ptr().add(k), _mm256_cvtph_ps(h));
        }
        k += 8;
    }
    for k in body..n {
        dst[k] = f16::from_bits(u16::from_le_bytes([bytes[2 * k], bytes[2 * k + 1]])).to_f32();
    }
}

/// Eight f32 to f16 at a time, rounding to nearest even.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f32_to_f16_f16c(src: &[f32], dst: &mut [f16]) {
    use std::arch::x86_64::{
        _mm256_cvtps_ph, _mm256_loadu_ps, _mm_storeu_si128, _MM_FROUND_TO_NEAREST_INT,
    };
    let n = dst.len().min(src.len());
    let body = n / 8 * 8;
    let mut k = 0;
    while k < body {
        // SAFETY: k + 8 <= n: 8 floats read and 8 halves (16 bytes) written are in bounds.
        unsafe {
            let v = _mm256_loadu_ps(src.as_ptr().add(k));
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            _mm_storeu_si128(dst.as_mut_ptr().add(k).cast(), h);
        }
        k += 8;
    }
    for k in body..n {
        dst[k] = f16::from_f32(src[k]);
    }
}

/// Averages one tensor. `inputs[i]` holds member i's stored bytes (all of `in_dtype`),
/// `weights` sum to one, `base` is the member the sum is formed around.
pub fn average<O: OutElem>(
    inputs: &[&[u8]],
    in_dtype: FloatDType,
    weights: &[f32],
    base: usize,
    out: &mut [O],
) -> TensorSums {
    let m = inputs.len();
    let size = in_dtype.size_in_bytes();
    debug_assert!(inputs.iter().all(|x| x.len() == out.len() * size));
    debug_assert_eq!(weights.len(), m);
    let run = |start: usize, out: &mut [O]| {
        let slices: Vec<&[u8]> = inputs
            .iter()
            .map(|x| &x[start * size..(start + out.len()) * size])
            .collect();
        average_chunk(&slices, in_dtype, weights, base, out)
    };
    if out.len() < PARALLEL_MIN {
        return run(0, out);
    }
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .map(|(c, chunk)| run(c * CHUNK, chunk))
        .reduce(|| TensorSums::zero(m), TensorSums::merge)
}

fn average_chunk<O: OutElem>(
    inputs: &[&[u8]],
    in_dtype: FloatDType,
    weights: &[f32],
    base: usize,
    out: &mut [O],
) -> TensorSums {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512() {
            // SAFETY: the CPU supports AVX-512 F/BW/VL, checked just above.
            return unsafe { average_chunk_avx512(inputs, in_dtype, weights, base, out) };
        }
        if has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { average_chunk_avx2(inputs, in_dtype, weights, base, out) };
        }
    }
    average_chunk_portable::<O, 4>(inputs, in_dtype, weights, base, out)
}

/// AVX2 with FMA: the FMAs are written out in the statistics only (Rust never contracts
/// the averages' multiplies and adds into FMAs, so their bits do not change).
#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
}

/// The same code compiled for AVX-512: 16-lane widening, sums and rounding. Still no FMA
/// (Rust never contracts a multiply and an add), so the averages are the same bits as on
/// any other x86_64 CPU; only the statistics' summation order differs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn average_chunk_avx512<O: OutElem>(
    inputs: &[&[u8]],
    in_dtype: FloatDType,
    weights: &[f32],
    base: usize,
    out: &mut [O],
) -> TensorSums {
    average_chunk_portable::<O, 16>(inputs, in_dtype, weights, base, out)
}

/// The same code compiled for AVX2: 8-lane vectors for the sums and conversions. FMAs only
/// where the statistics write them out, never in the averages, so those are the same bits
/// on every x86_64 CPU.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn average_chunk_avx2<O: OutElem>(
    inputs: &[&[u8]],
    in_dtype: FloatDType,
    weights: &[f32],
    base: usize,
    out: &mut [O],
) -> TensorSums {
    average_chunk_portable::<O, 8>(inputs, in_dtype, weights, base, out)
}

/// The pass compiled into each instruction set's function, `L` lanes per step: up to four
/// members in one pass with the statistics from their Gram matrix (gram.rs), more in
/// groups with per-member statistics.
#[inline(always)]
fn average_chunk_portable<O: OutElem, const L: usize>(
    inputs: &[&[u8]],
    in_dtype: FloatDType,
    weights: &[f32],
    base: usize,
    out: &mut [O],
) -> TensorSums {
    match inputs.len() {
        1 => average_chunk_gram::<O, 0, L>(inputs, in_dtype, weights, base, out),
        2 => average_chunk_gram::<O, 1, L>(inputs, in_dtype, weights, base, out),
        3 => average_chunk_gram::<O, 2, L>(inputs, in_dtype, weights, base, out),
        4 => average_chunk_gram::<O, 3, L>(inputs, in_dtype, weights, base, out),
        _ => average_chunk_grouped(inputs, in_dtype, weights, base, out),
    }
}

/// Aligned little-endian f32 members as f32 slices, borrowed from the map.
fn mapped_f32<'a>(inputs: &[&'a [u8]], in_dtype: FloatDType) -> Option<Vec<&'a [f32]>> {
    match in_dtype {
        FloatDType::F32 if cfg!(target_endian = "little") => inputs
            .iter()
            .map(|x| bytemuck::try_cast_slice::<u8, f32>(x).ok())
            .collect(),
        _ => None,
    }
}

/// K + 1 members in one pass (gram.rs): bf16 and aligned f32 members read straight from
/// the map, f16 (and misaligned f32) widened into rows block by block first.
#[inline(always)]
fn average_chunk_gram<O: OutElem, const K: usize, const L: usize>(
    inputs: &[&[u8]],
    in_dtype: FloatDType,
    weights: &[f32],
    base: usize,
    out: &mut [O],
) -> TensorSums {
    let m = K + 1;
    let mut order = (0..m).filter(|&i| i != base);
    let others: [usize; K] = std::array::from_fn(|_| order.next().unwrap_or(base));
    let ws = others.map(|i| weights[i]);
    let mut gram = Gram::<L>::default();
    let mut acc = [0f32; BLOCK];
    let n = out.len();
    let mut blocks = |pass: &mut dyn FnMut(usize, &mut [f32], &mut Gram<L>)| {
        for start in (0..n).step_by(BLOCK) {
            let len = BLOCK.min(n - start);
            pass(start, &mut acc[..len], &mut gram);
            O::encode(&acc[..len], &mut out[start..start + len]);
        }
    };
    if in_dtype == FloatDType::BF16 {
        let row = |i: usize| Bf16Bytes(inputs[i]);
        blocks(&mut |start, acc, gram| {
            average_block::<_, K, L>(row(base), others.map(row), ws, start, acc, gram)
        });
    } else if let Some(maps) = mapped_f32(inputs, in_dtype) {
        let row = |i: usize| maps[i];
        blocks(&mut |start, acc, gram| {
            average_block::<_, K, L>(row(base), others.map(row), ws, start, acc, gram)
        });
    } else {
        let size = in_dtype.size_in_bytes();
        let mut scratch = [[0f32; BLOCK]; gram::MAX_MEMBERS];
        blocks(&mut |start, acc, gram| {
            let len = acc.len();
            for (input, row) in inputs.iter().zip(scratch.iter_mut()) {
                decode(
                    in_dtype,
                    &input[start * size..(start + len) * size],
                    &mut row[..len],
                );
            }
            let row = |i: usize| &scratch[i][..len];
            average_block::<_, K, L>(row(base), others.map(row), ws, 0, acc, gram)
        });
    }
    let members = gram.member_sums(m, base);
    let suspect = members.iter().map(|s| !s.is_finite()).collect();
    TensorSums { members, suspect }
}

/// Any number of members: widened into rows block by block (f32 borrowed from the map),
/// added to the average in groups, and each member's statistics in a pass of its own.
#[inline(always)]
fn average_chunk_grouped<O: OutElem>(
    inputs: &[&[u8]],
    in_dtype: FloatDType,
    weights: &[f32],
    base: usize,
    out: &mut [O],
) -> TensorSums {
    let m = inputs.len();
    let size = in_dtype.size_in_bytes();
    let others = (m - 1) as f32;
    let mut sums = TensorSums::zero(m);
    // Member rows, the average and the member total, side by side in one buffer.
    let mut work = vec![0f32; (m + 2) * BLOCK];
    let (scratch, rest) = work.split_at_mut(m * BLOCK);
    let (acc, total) = rest.split_at_mut(BLOCK);
    // Aligned little-endian f32 members are read straight from the map, else widened into
    // scratch block by block.
    let mapped = mapped_f32(inputs, in_dtype);
    let others_in_order: Vec<usize> = (0..m).filter(|&i| i != base).collect();
    let mut start = 0;
    while start < out.len() {
        let len = BLOCK.min(out.len() - start);
        if mapped.is_none() {
            for (input, row) in inputs.iter().zip(scratch.chunks_exact_mut(BLOCK)) {
                decode(
                    in_dtype,
                    &input[start * size..(start + len) * size],
                    &mut row[..len],
                );
            }
        }
        let rows: &[f32] = scratch;
        let view = |i: usize| -> &[f32] {
            match &mapped {
                Some(maps) => &maps[i][start..start + len],
                None => &rows[i * BLOCK..i * BLOCK + len],
            }
        };
        let xb = view(base);
        let acc = &mut acc[..len];
        let total = &mut total[..len];
        // The other members in groups of up to three per pass over the block: the average
        // and the total are loaded and stored once per group instead of once per member.
        // The additions happen in the same order, so the bits are the same.
        for (g, group) in others_in_order.chunks(3).enumerate() {
            let first = g == 0;
            let weight = |i: usize| weights[i];
            match *group {
                [i] => add_members(first, acc, total, xb, [i].map(view), [i].map(weight)),
                [i, j] => add_members(first, acc, total, xb, [i, j].map(view), [i, j].map(weight)),
                [i, j, k] => {
                    let ids = [i, j, k];
                    add_members(first, acc, total, xb, ids.map(view), ids.map(weight))
                }
                _ => unreachable!("groups hold one to three members"),
            }
        }
        if others_in_order.is_empty() {
            acc.copy_from_slice(xb);
            total.copy_from_slice(xb);
        }
        for i in 0..m {
            let [sq, dot_rest, rest_sq, dev_sq] = member_block_sums(view(i), total, others);
            if !(sq.is_finite()
                && dot_rest.is_finite()
                && rest_sq.is_finite()
                && dev_sq.is_finite())
            {
                sums.suspect[i] = true;
            }
            let s = &mut sums.members[i];
            s.sq += f64::from(sq);
            s.dot_rest += f64::from(dot_rest);
            s.rest_sq += f64::from(rest_sq);
            s.dev_sq += f64::from(dev_sq);
        }
        O::encode(acc, &mut out[start..start + len]);
        start += len;
    }
    sums
}

/// Adds N members to the block's weighted sum around the base member b and to its total:
/// acc += w_j (x_j - b) and total += x_j for j in order; the first group starts both at b.
#[inline(always)]
fn add_members<const N: usize>(
    first: bool,
    acc: &mut [f32],
    total: &mut [f32],
    base: &[f32],
    xs: [&[f32]; N],
    ws: [f32; N],
) {
    if first {
        add_members_from::<N, true>(acc, total, base, xs, ws);
    } else {
        add_members_from::<N, false>(acc, total, base, xs, ws);
    }
}

#[inline(always)]
fn add_members_from<const N: usize, const FIRST: bool>(
    acc: &mut [f32],
    total: &mut [f32],
    base: &[f32],
    xs: [&[f32]; N],
    ws: [f32; N],
) {
    let len = acc.len();
    let (total, base) = (&mut total[..len], &base[..len]);
    let xs = xs.map(|x| &x[..len]);
    for k in 0..len {
        let b = base[k];
        let (mut a, mut t) = if FIRST { (b, b) } else { (acc[k], total[k]) };
        for j in 0..N {
            let v = xs[j][k];
            a += ws[j] * (v - b);
            t += v;
        }
        acc[k] = a;
        total[k] = t;
    }
}

/// The four [`MemberSums`] of one member over one block, given the block's member total:
/// with r = t - x and d = (M-1) x - r, the sums of x*x, x*r, r*r and d*d. One pass with
/// AVX2 where the CPU has it (these four accumulators defeat the auto-vectorizer).
#[inline(always)]
fn member_block_sums(x: &[f32], total: &[f32], others: f32) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512() {
            // SAFETY: the CPU supports AVX-512 F, checked just above.
            return unsafe { member_block_sums_avx512(x, total, others) };
        }
        if has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { member_block_sums_avx2(x, total, others) };
        }
    }
    member_block_sums_scalar(x, total, others)
}

fn member_block_sums_scalar(x: &[f32], total: &[f32], others: f32) -> [f32; 4] {
    let mut s = [0f32; 4];
    for (&v, &t) in x.iter().zip(total) {
        let r = t - v;
        let d = others * v - r;
        s[0] += v * v;
        s[1] += v * r;
        s[2] += r * r;
        s[3] += d * d;
    }
    s
}

/// The vector loop of [`member_block_sums_scalar`] for one instruction set: the two
/// widths differ only in the intrinsics' names, so one body is written for both. Two
/// vectors per step into two sets of accumulators, with FMAs: a single set left every
/// step waiting on the latency of the previous step's adds (the statistics are sums, so
/// their order may differ from the scalar path's; the averages are not touched here).
macro_rules! member_block_sums_simd {
    ($name:ident, $feature:literal, $lanes:literal, $set1:ident, $zero:ident, $load:ident,
     $sub:ident, $fmadd:ident, $fmsub:ident, $add:ident, $sum:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        unsafe fn $name(x: &[f32], total: &[f32], others: f32) -> [f32; 4] {
            use std::arch::x86_64::*;
            let n = x.len().min(total.len());
            let body = n / (2 * $lanes) * (2 * $lanes);
            let o = $set1(others);
            let mut acc = [[$zero(); 4]; 2];
            let mut k = 0;
            while k < body {
                for (half, a) in acc.iter_mut().enumerate() {
                    let at = k + half * $lanes;
                    // SAFETY: at + lanes <= body <= n, within both slices; loads are
                    // unaligned.
                    let (v, t) =
                        unsafe { ($load(x.as_ptr().add(at)), $load(total.as_ptr().add(at))) };
                    let r = $sub(t, v);
                    let d = $fmsub(o, v, r);
                    a[0] = $fmadd(v, v, a[0]);
                    a[1] = $fmadd(v, r, a[1]);
                    a[2] = $fmadd(r, r, a[2]);
                    a[3] = $fmadd(d, d, a[3]);
                }
                k += 2 * $lanes;
            }
            let sum = $sum;
            let tail = member_block_sums_scalar(&x[body..n], &total[body..n], others);
            let mut out = [0f32; 4];
            for (q, o) in out.iter_mut().enumerate() {
                *o = sum($add(acc[0][q], acc[1][q])) + tail[q];
            }
            out
        }
    };
}

member_block_sums_simd!(
    member_block_sums_avx2,
    "avx2,fma",
    8,
    _mm256_set1_ps,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_sub_ps,
    _mm256_fmadd_ps,
    _mm256_fmsub_ps,
    _mm256_add_ps,
    |v: __m256| {
        let mut a = [0f32; 8];
        // SAFETY: `a` holds exactly 8 f32.
        unsafe { _mm256_storeu_ps(a.as_mut_ptr(), v) };
        a.iter().sum::<f32>()
    }
);

member_block_sums_simd!(
    member_block_sums_avx512,
    "avx512f",
    16,
    _mm512_set1_ps,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_sub_ps,
    _mm512_fmadd_ps,
    _mm512_fmsub_ps,
    _mm512_add_ps,
    |v: __m512| _mm512_reduce_add_ps(v)
);

/// The exact f64 sums for one tensor, used when the fast pass saw a non-finite block sum
/// that was an overflow rather than a NaN or Inf in the data.
pub fn exact_sums(inputs: &[&[u8]], in_dtype: FloatDType) -> Vec<MemberSums> {
    let m = inputs.len();
    let n = inputs[0].len() / in_dtype.size_in_bytes();
    let widen = |i: usize| {
        let mut v = vec![0f32; n];
        decode(in_dtype, inputs[i], &mut v);
        v
    };
    let values: Vec<Vec<f32>> = (0..m).map(widen).collect();
    let others = (m - 1) as f64;
    let mut sums = vec![MemberSums::default(); m];
    for k in 0..n {
        let total: f64 = values.iter().map(|v| f64::from(v[k])).sum();
        for (i, s) in sums.iter_mut().enumerate() {
            let v = f64::from(values[i][k]);
            let r = total - v;
            let d = others * v - r;
            s.sq += v * v;
            s.dot_rest += v * r;
            s.rest_sq += r * r;
            s.dev_sq += d * d;
        }
    }
    sums
}

/// The first non-finite element of a stored tensor and how many there are.
pub fn find_non_finite(bytes: &[u8], dtype: FloatDType) -> Option<(usize, f32, usize)> {
    let n = bytes.len() / dtype.size_in_bytes();
    let mut values = vec![0f32; n];
    decode(dtype, bytes, &mut values);
    let mut bad = values.iter().enumerate().filter(|(_, v)| !v.is_finite());
    let (first, &value) = bad.next()?;
    Some((first, value, 1 + bad.count()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift), so the tests need no extra crate.
    struct Rng(u64);
    impl Rng {
        fn next_f32(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    fn encode_members(dtype: FloatDType, values: &[Vec<f32>]) -> Vec<Vec<u8>> {
        values
            .iter()
            .map(|v| match dtype {
                FloatDType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                FloatDType::F16 => v
                    .iter()
                    .flat_map(|x| f16::from_f32(*x).to_bits().to_le_bytes())
                    .collect(),
                FloatDType::BF16 => v
                    .iter()
                    .flat_map(|x| bf16::from_f32(*x).to_bits().to_le_bytes())
                    .collect(),
            })
            .collect()
    }

    /// Members close to a shared init, like fine-tuned models, in `dtype`'s precision.
    fn members(m: usize, n: usize, dtype: FloatDType, seed: u64) -> (Vec<Vec<u8>>, Vec<Vec<f64>>) {
        let mut rng = Rng(seed);
        let init: Vec<f32> = (0..n).map(|_| rng.next_f32() * 0.5).collect();
        let raw: Vec<Vec<f32>> = (0..m)
            .map(|_| init.iter().map(|x| x + 0.01 * rng.next_f32()).collect())
            .collect();
        let bytes = encode_members(dtype, &raw);
        let stored: Vec<Vec<f64>> = bytes
            .iter()
            .map(|b| {
                let mut v = vec![0f32; n];
                decode(dtype, b, &mut v);
                v.into_iter().map(f64::from).collect()
            })
            .collect();
        (bytes, stored)
    }

    /// Each of the four sums within `rel` of the wanted one, relatively.
    fn assert_sums_close(got: &MemberSums, want: &MemberSums, rel: f64, label: &str) {
        for (x, y) in [
            (got.sq, want.sq),
            (got.dot_rest, want.dot_rest),
            (got.rest_sq, want.rest_sq),
            (got.dev_sq, want.dev_sq),
        ] {
            assert!((x - y).abs() <= rel * y.abs(), "{label}: {x} vs {y}");
        }
    }

    fn normalized(w: &[f64]) -> Vec<f64> {
        let s: f64 = w.iter().sum();
        w.iter().map(|x| x / s).collect()
    }

    /// The straightforward reference: an f64 weighted sum (rounded once by the caller), and
    /// the sum of the terms' magnitudes, which bounds the error of any f32 accumulation.
    fn reference(stored: &[Vec<f64>], w: &[f64]) -> Vec<(f64, f64)> {
        (0..stored[0].len())
            .map(|k| {
                let sum = stored.iter().zip(w).map(|(v, w)| v[k] * w).sum();
                let magnitude = stored.iter().zip(w).map(|(v, w)| (v[k] * w).abs()).sum();
                (sum, magnitude)
            })
            .collect()
    }

    /// The reference rounded once to the output type, and one unit in the last place there.
    fn rounded_and_ulp(dtype: FloatDType, want: f64) -> (f32, f64) {
        let (rounded, mantissa_bits, min_exp) = match dtype {
            FloatDType::F32 => (want as f32, 23, -126),
            FloatDType::F16 => (f16::from_f64(want).to_f32(), 10, -14),
            FloatDType::BF16 => (bf16::from_f64(want).to_f32(), 7, -126),
        };
        let exp = (want.abs().log2().floor() as i32).max(min_exp);
        (rounded, 2f64.powi(exp - mantissa_bits))
    }

    fn check<O: OutElem>(in_dtype: FloatDType, m: usize, n: usize, w: &[f64]) {
        // With weights that are exact in binary the f64 and f32 sums see the same ties.
        let dyadic = normalized(w).iter().all(|x| (x * 1024.0).fract() == 0.0);
        let (bytes, stored) = members(m, n, in_dtype, 0x9e37_79b9 + n as u64 * 31 + m as u64);
        let wn = normalized(w);
        let wf: Vec<f32> = wn.iter().map(|&x| x as f32).collect();
        let base = (0..m).max_by(|&a, &b| wf[a].total_cmp(&wf[b])).unwrap();
        let inputs: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
        let mut out = vec![O::default(); n];
        let sums = average(&inputs, in_dtype, &wf, base, &mut out);
        assert!(sums.suspect.iter().all(|s| !s));
        let want = reference(&stored, &wn);
        let mut exact = 0;
        for (k, (&g, &(r, magnitude))) in out.iter().zip(&want).enumerate() {
            let (rounded, ulp) = rounded_and_ulp(O::DTYPE, r);
            let g = g.to_f32();
            // One rounding to the output type, plus the f32 accumulation error bound (a few
            // f32 epsilons of the terms' magnitude, which matters only under cancellation).
            let bound = ulp + 4.0 * f64::from(f32::EPSILON) * magnitude;
            assert!(
                (f64::from(g) - r).abs() <= bound,
                "{in_dtype}->{:?} m={m} n={n} element {k}: {g} vs {r}",
                O::DTYPE
            );
            exact += usize::from(g == rounded);
        }
        // f32 accumulation rounds differently from f64 only right at a rounding boundary.
        if O::DTYPE != FloatDType::F32 && dyadic {
            assert!(
                exact as f64 >= 0.995 * n as f64,
                "{in_dtype}->{:?} m={m} n={n} w={w:?}: only {exact} of {n} exact",
                O::DTYPE
            );
        }
    }

    #[test]
    fn matches_f64_reference_for_every_dtype_uniform_and_weighted() {
        for n in [1, 7, 1000, 1031, 3 * BLOCK + 5, PARALLEL_MIN + 77] {
            for (m, w) in [
                (2, vec![1.0, 1.0]),
                (3, vec![1.0, 1.0, 1.0]),
                (4, vec![0.1, 0.2, 0.3, 0.4]),
                (4, vec![1.0, 1.0, 2.0, 4.0]),
                (3, vec![5.0, 0.0, 2.5]),
                // Members beyond the first group of three others.
                (5, vec![1.0, 2.0, 3.0, 4.0, 5.0]),
                (8, vec![1.0; 8]),
            ] {
                check::<f32>(FloatDType::F32, m, n, &w);
                check::<f16>(FloatDType::F16, m, n, &w);
                check::<bf16>(FloatDType::BF16, m, n, &w);
                check::<f32>(FloatDType::BF16, m, n, &w);
                check::<bf16>(FloatDType::F32, m, n, &w);
            }
        }
    }

    /// AVX-512, AVX2 and portable code paths give the same averages bit for bit, and
    /// statistics equal up to summation order.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        fn paths<O: OutElem>(dtype: FloatDType) {
            let n = 3 * BLOCK + 21;
            let (bytes, _) = members(4, n, dtype, 9);
            let inputs: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
            let w = [0.1, 0.2, 0.3, 0.4];
            let mut portable = vec![O::default(); n];
            let want = average_chunk_portable::<O, 4>(&inputs, dtype, &w, 3, &mut portable);
            let mut runs = Vec::new();
            if has_avx2_fma() {
                let mut out = vec![O::default(); n];
                // SAFETY: AVX2 and FMA checked just above.
                let sums = unsafe { average_chunk_avx2(&inputs, dtype, &w, 3, &mut out) };
                runs.push(("avx2", out, sums));
            }
            if has_avx512() {
                let mut out = vec![O::default(); n];
                // SAFETY: AVX-512 checked just above.
                let sums = unsafe { average_chunk_avx512(&inputs, dtype, &w, 3, &mut out) };
                runs.push(("avx512", out, sums));
            }
            for (name, out, sums) in runs {
                let same =
                    bytemuck::cast_slice::<O, u8>(&out) == bytemuck::cast_slice::<O, u8>(&portable);
                assert!(
                    same,
                    "{name} {dtype}: averages differ from the portable path"
                );
                for (a, b) in sums.members.iter().zip(&want.members) {
                    assert!((a.sq - b.sq).abs() <= 1e-5 * b.sq.abs(), "{name} {dtype}");
                    assert!(
                        (a.dev_sq - b.dev_sq).abs() <= 1e-4 * b.dev_sq.abs(),
                        "{name}"
                    );
                }
            }
        }
        paths::<f32>(FloatDType::F32);
        paths::<f16>(FloatDType::F16);
        paths::<bf16>(FloatDType::BF16);
        paths::<bf16>(FloatDType::F32);
    }

    /// The one-pass path for up to four members (statistics from the Gram matrix) and the
    /// general path give the same averages bit for bit and the same statistics up to
    /// rounding, for every input type, base and member count, on lengths that end in a
    /// partial step and a partial block.
    #[test]
    fn the_gram_pass_matches_the_general_pass() {
        fn compare<O: OutElem>(dtype: FloatDType) {
            let n = 2 * BLOCK + 13;
            for m in 1..=gram::MAX_MEMBERS {
                let (bytes, _) = members(m, n, dtype, 40 + m as u64);
                let inputs: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
                let w = normalized(&(1..=m).map(|i| i as f64).collect::<Vec<_>>());
                let w: Vec<f32> = w.iter().map(|&x| x as f32).collect();
                for base in 0..m {
                    let mut general = vec![O::default(); n];
                    let want = average_chunk_grouped(&inputs, dtype, &w, base, &mut general);
                    let mut fast = vec![O::default(); n];
                    let got = average_chunk_portable::<O, 4>(&inputs, dtype, &w, base, &mut fast);
                    let label = format!("{dtype}->{:?} m={m} base={base}", O::DTYPE);
                    assert!(
                        bytemuck::cast_slice::<O, u8>(&fast)
                            == bytemuck::cast_slice::<O, u8>(&general),
                        "{label}: averages differ"
                    );
                    assert_eq!(got.suspect, vec![false; m], "{label}");
                    for (a, b) in got.members.iter().zip(&want.members) {
                        assert_sums_close(a, b, 1e-5, &label);
                    }
                }
            }
        }
        compare::<f32>(FloatDType::F32);
        compare::<bf16>(FloatDType::F32);
        compare::<f16>(FloatDType::F16);
        compare::<bf16>(FloatDType::BF16);
        compare::<f32>(FloatDType::BF16);
    }

    /// The deviation of a member from the others is formed from the members' differences
    /// to the base, so it keeps its precision when they are far closer than their size
    /// (the general pass, which forms it from the members' total, is off by 3e-4 here).
    #[test]
    fn deviations_of_close_members_are_accurate() {
        let n = 3 * BLOCK + 5;
        let mut rng = Rng(77);
        let init: Vec<f32> = (0..n).map(|_| rng.next_f32()).collect();
        let raw: Vec<Vec<f32>> = (0..4)
            .map(|_| init.iter().map(|x| x + 1e-5 * rng.next_f32()).collect())
            .collect();
        let bytes = encode_members(FloatDType::F32, &raw);
        let inputs: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
        let mut out = vec![0f32; n];
        let fast = average(&inputs, FloatDType::F32, &[0.25; 4], 2, &mut out);
        let exact = exact_sums(&inputs, FloatDType::F32);
        for (f, e) in fast.members.iter().zip(&exact) {
            assert!(e.dev_sq > 0.0 && e.dev_sq < 1e-8 * e.sq);
            assert!(
                (f.dev_sq - e.dev_sq).abs() <= 1e-4 * e.dev_sq,
                "{} vs {}",
                f.dev_sq,
                e.dev_sq
            );
        }
    }

    /// Finite values whose squares overflow f32 make the statistics non-finite, in the
    /// one-pass and in the general pass alike, so that the caller sums them again in f64.
    #[test]
    fn squares_that_overflow_f32_make_members_suspect() {
        for m in [3usize, 5] {
            let n = BLOCK + 7;
            let raw: Vec<Vec<f32>> = (0..m)
                .map(|i| {
                    (0..n)
                        .map(|k| {
                            if k == 100 {
                                3e19
                            } else {
                                0.01 * (k + i) as f32
                            }
                        })
                        .collect()
                })
                .collect();
            let bytes = encode_members(FloatDType::F32, &raw);
            let inputs: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
            let mut out = vec![0f32; n];
            let sums = average(
                &inputs,
                FloatDType::F32,
                &vec![1.0 / m as f32; m],
                0,
                &mut out,
            );
            assert!(sums.suspect.iter().all(|&s| s), "m={m}: {:?}", sums.suspect);
            assert!(out.iter().all(|v| v.is_finite()), "m={m}");
            let exact = exact_sums(&inputs, FloatDType::F32);
            assert!(
                exact.iter().all(|s| s.sq.is_finite() && s.sq > 8e38),
                "m={m}"
            );
        }
    }

    /// f32 members that are not 4-byte aligned in their files (a safetensors header whose
    /// length is not a multiple of 4) are widened instead of borrowed: same bits, same sums.
    #[test]
    fn misaligned_f32_members_give_the_same_result_as_aligned_ones() {
        let n = 3 * BLOCK + 21;
        let (bytes, _) = members(3, n, FloatDType::F32, 5);
        let shifted: Vec<Vec<u8>> = bytes
            .iter()
            .map(|b| std::iter::once(0u8).chain(b.iter().copied()).collect())
            .collect();
        let aligned: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
        let misaligned: Vec<&[u8]> = shifted.iter().map(|b| &b[1..]).collect();
        assert!(misaligned
            .iter()
            .any(|b| bytemuck::try_cast_slice::<u8, f32>(b).is_err()));
        let w = [0.5f32, 0.25, 0.25];
        let mut want = vec![0f32; n];
        let mut got = vec![0f32; n];
        let want_sums = average(&aligned, FloatDType::F32, &w, 0, &mut want);
        let got_sums = average(&misaligned, FloatDType::F32, &w, 0, &mut got);
        assert_eq!(want, got);
        assert_eq!(want_sums, got_sums);
    }

    #[test]
    fn a_model_fused_with_itself_is_returned_bit_for_bit() {
        let n = PARALLEL_MIN + 3;
        for dtype in [FloatDType::F32, FloatDType::F16, FloatDType::BF16] {
            let (bytes, _) = members(1, n, dtype, 7);
            for m in [2usize, 3, 5] {
                let inputs: Vec<&[u8]> = (0..m).map(|_| bytes[0].as_slice()).collect();
                let w = vec![1.0 / m as f32; m];
                let same = |out: Vec<u8>| assert!(out == bytes[0], "{dtype} m={m}");
                match dtype {
                    FloatDType::F32 => {
                        let mut out = vec![0f32; n];
                        average(&inputs, dtype, &w, 0, &mut out);
                        same(bytemuck::cast_slice(&out).to_vec());
                    }
                    FloatDType::F16 => {
                        let mut out = vec![f16::ZERO; n];
                        average(&inputs, dtype, &w, 0, &mut out);
                        same(bytemuck::cast_slice(&out).to_vec());
                    }
                    FloatDType::BF16 => {
                        let mut out = vec![bf16::ZERO; n];
                        average(&inputs, dtype, &w, 0, &mut out);
                        same(bytemuck::cast_slice(&out).to_vec());
                    }
                }
            }
        }
    }

    #[test]
    fn sums_match_the_exact_computation() {
        let n = PARALLEL_MIN + 1001;
        let (bytes, _) = members(3, n, FloatDType::F32, 11);
        let inputs: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
        let mut out = vec![0f32; n];
        let fast = average(&inputs, FloatDType::F32, &[1.0 / 3.0; 3], 0, &mut out);
        let exact = exact_sums(&inputs, FloatDType::F32);
        for (f, e) in fast.members.iter().zip(&exact) {
            assert_sums_close(f, e, 1e-5, "fast vs exact");
        }
    }

    #[test]
    fn non_finite_values_make_a_member_suspect_and_are_found() {
        let (mut bytes, _) = members(2, 5000, FloatDType::BF16, 3);
        let nan = bf16::NAN.to_bits().to_le_bytes();
        bytes[1][2 * 4321..2 * 4321 + 2].copy_from_slice(&nan);
        let inputs: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
        let mut out = vec![bf16::ZERO; 5000];
        let sums = average(&inputs, FloatDType::BF16, &[0.5, 0.5], 0, &mut out);
        assert!(sums.suspect[1]);
        let (first, value, count) = find_non_finite(&bytes[1], FloatDType::BF16).unwrap();
        assert_eq!((first, count), (4321, 1));
        assert!(value.is_nan());
        assert_eq!(find_non_finite(&bytes[0], FloatDType::BF16), None);
    }

    #[test]
    fn eight_lane_f16_conversions_match_half_bit_for_bit() {
        // Ties, subnormals, overflow, infinities, NaN, and a tail that is not a multiple of 8.
        let mut values: Vec<f32> = vec![
            1.0,
            -2.5,
            f32::from_bits(0x3f80_1000),
            6.1e-5,
            5.96e-8,
            2.98e-8,
            65504.0,
            65520.0,
            1e6,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
        ];
        let mut rng = Rng(99);
        values.extend((0..1001).map(|_| rng.next_f32() * 3.0));
        let mut ours = vec![f16::ZERO; values.len()];
        <f16 as OutElem>::encode(&values, &mut ours);
        for (v, o) in values.iter().zip(&ours) {
            assert_eq!(o.to_bits(), f16::from_f32(*v).to_bits(), "{v}");
        }
        let mut bytes: Vec<u8> = ours
            .iter()
            .flat_map(|h| h.to_bits().to_le_bytes())
            .collect();
        bytes.extend(f16::NAN.to_bits().to_le_bytes());
        let mut back = vec![0f32; ours.len() + 1];
        decode(FloatDType::F16, &bytes, &mut back);
        for (h, b) in ours.iter().zip(&back) {
            assert_eq!(b.to_bits(), h.to_f32().to_bits());
        }
        assert!(back[ours.len()].is_nan());
    }

    #[test]
    fn bf16_rounding_is_nearest_even() {
        for x in [
            1.0f32,
            -2.5,
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            3.0e38,
            1e-40,
            f32::INFINITY,
            f32::NAN,
        ] {
            let want = bf16::from_f32(x);
            let got = bf16::from_bits(f32_to_bf16_bits(x));
            assert!(
                got == want || (got.is_nan() && want.is_nan()),
                "{x}: {got} vs {want}"
            );
        }
    }
}
