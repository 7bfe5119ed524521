//! Exact scaling by powers of two: how the solve keeps extreme but finite
//! inputs away from overflow and underflow without changing their bits.

/// `x · 2^e`, in steps that cannot overflow or underflow on the way (a
/// single `2^e` is not representable for |e| > 1023).
pub fn ldexp(mut x: f64, mut e: i32) -> f64 {
    while e > 1000 {
        x *= 2f64.powi(1000);
        e -= 1000;
    }
    while e < -1000 {
        x *= 2f64.powi(-1000);
        e += 1000;
    }
    x * 2f64.powi(e)
}

/// `⌊log₂ |x|⌋` for a finite non-zero `x` (denormals included), else 0.
pub fn exponent(x: f64) -> i32 {
    if x == 0.0 || !x.is_finite() {
        return 0;
    }
    let bits = x.abs().to_bits();
    let biased = (bits >> 52) as i32;
    if biased > 0 {
        biased - 1023
    } else {
        // Denormal: the leading one of the mantissa gives the exponent.
        -1011 - (bits.leading_zeros() as i32)
    }
}
