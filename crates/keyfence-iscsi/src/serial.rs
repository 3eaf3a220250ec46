//! Serial number arithmetic (RFC 1982 with SERIAL_BITS = 32), used for
//! CmdSN, StatSN, DataSN and R2TSN comparisons (RFC 7143 §4.2.2.1).
//!
//! Two numbers exactly 2^31 apart are incomparable: every predicate is false.

/// `a < b` in serial arithmetic.
#[inline]
pub fn lt(a: u32, b: u32) -> bool {
    a != b && (b.wrapping_sub(a) as i32) > 0
}

/// `a > b` in serial arithmetic.
#[inline]
pub fn gt(a: u32, b: u32) -> bool {
    lt(b, a)
}

/// `a <= b` in serial arithmetic.
#[inline]
pub fn le(a: u32, b: u32) -> bool {
    a == b || lt(a, b)
}

/// `a >= b` in serial arithmetic.
#[inline]
pub fn ge(a: u32, b: u32) -> bool {
    a == b || gt(a, b)
}

/// `lo <= sn <= hi` in serial arithmetic: the command window test
/// ExpCmdSN <= CmdSN <= MaxCmdSN.
#[inline]
pub fn in_window(sn: u32, lo: u32, hi: u32) -> bool {
    le(lo, sn) && le(sn, hi)
}

/// True when the window [exp_cmd_sn, max_cmd_sn] is empty, i.e.
/// MaxCmdSN = ExpCmdSN - 1 (RFC 7143 §4.2.2.1).
#[inline]
pub fn window_closed(exp_cmd_sn: u32, max_cmd_sn: u32) -> bool {
    max_cmd_sn.wrapping_add(1) == exp_cmd_sn
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordering_and_wrap() {
        assert!(lt(1, 2));
        assert!(!lt(2, 1));
        assert!(!lt(5, 5));
        assert!(lt(u32::MAX, 0));
        assert!(gt(0, u32::MAX));
        assert!(lt(0xffff_fff0, 0x10));
        assert!(le(7, 7) && ge(7, 7));
        // exactly 2^31 apart: undefined, all false
        assert!(!lt(0, 0x8000_0000) && !gt(0, 0x8000_0000));
        assert!(lt(0, 0x7fff_ffff));
        assert!(gt(0, 0x8000_0001));
    }

    #[test]
    fn window() {
        assert!(in_window(10, 10, 20));
        assert!(in_window(20, 10, 20));
        assert!(!in_window(21, 10, 20));
        assert!(!in_window(9, 10, 20));
        assert!(in_window(2, u32::MAX - 3, 5));
        assert!(!in_window(6, u32::MAX - 3, 5));
        assert!(window_closed(10, 9));
        assert!(window_closed(0, u32::MAX));
        assert!(!window_closed(10, 10));
    }
}
