//! e^x and tanh in f32 written so that the compiler vectorizes loops over them (libm's
//! `expf` and `tanhf` are scalar calls per element): Cephes' single-precision polynomials,
//! within 2 ulp; and the Horner evaluation they share with the GELU's erf.

const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two, so that `x - n ln2` loses nothing for |n| <= 127.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Degree-6 polynomial for e^r on |r| <= ln2 / 2, highest power first (Cephes expf).
const EXP_POLY: [f32; 6] = [
    1.987_569_2e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// The polynomial with these coefficients, highest power first, at `x` (Horner's rule).
#[inline(always)]
pub fn horner<'a>(x: f32, highest_first: impl IntoIterator<Item = &'a f32>) -> f32 {
    let mut coefficients = highest_first.into_iter();
    let first = coefficients.next().copied().unwrap_or(0.0);
    coefficients.fold(first, |p, &c| p * x + c)
}

/// e^x for x clamped to [-87, 88], where the result stays a normal float (no subnormal
/// results, which slow down whatever multiplies them).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2_E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let y = horner(r, &EXP_POLY) * r * r + r + 1.0;
    // 2^n from its exponent bits; n is in [-125, 127] after the clamp. Adding 2^23 puts
    // the integer n + 127 in the low mantissa bits, and the shift moves it into the
    // exponent: unlike `n as i32`, this vectorizes.
    let biased = (n + (127.0 + 8_388_608.0)).to_bits();
    y * f32::from_bits(biased << 23)
}

/// Odd polynomial for tanh on |x| < 0.625, in powers of x^2, highest first (Cephes tanhf).
const TANH_POLY: [f32; 5] = [
    -5.704_988_7e-3,
    2.063_909e-2,
    -5.373_971_6e-2,
    0.133_314_42,
    -0.333_332_8,
];

/// tanh(x). Near 0 a polynomial (1 - 2/(e^2x + 1) would lose digits to cancellation there);
/// elsewhere from e^2|x|, which saturates to +-1 through `exp`'s clamp. Both are computed
/// and one is picked, so that the loop over it has no branch.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let z = x.abs();
    let far = (1.0 - 2.0 / (exp(z + z) + 1.0)).copysign(x);
    let t = x * x;
    let near = horner(t, &TANH_POLY) * t * x + x;
    if z < 0.625 {
        near
    } else {
        far
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_2_ulp_where_the_result_is_normal() {
        let mut worst = 0f64;
        for i in -87_000..=88_000 {
            let x = i as f32 / 1000.0;
            let want = f64::from(x).exp();
            let rel = (f64::from(exp(x)) - want).abs() / want;
            worst = worst.max(rel);
        }
        // One ulp of f32 is 2^-23 = 1.19e-7 relative at most.
        assert!(worst < 2.4e-7, "{worst}");
        assert_eq!(exp(0.0), 1.0);
        // Clamped: finite and normal at both ends, NaN kept.
        assert!(exp(-1000.0).is_normal() && exp(1000.0).is_finite());
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn tanh_is_within_2_ulp() {
        let mut worst = 0f64;
        for i in -20_000..=20_000 {
            let x = i as f32 / 1000.0;
            let want = f64::from(x).tanh();
            let ulp = f64::from(f32::EPSILON) * want.abs().max(f64::from(f32::MIN_POSITIVE));
            worst = worst.max((f64::from(tanh(x)) - want).abs() / ulp);
        }
        assert!(worst <= 2.0, "{worst} ulp");
        assert_eq!(tanh(0.0), 0.0);
        assert_eq!((tanh(1e4), tanh(-1e4)), (1.0, -1.0));
        assert!(tanh(f32::NAN).is_nan());
    }
}
