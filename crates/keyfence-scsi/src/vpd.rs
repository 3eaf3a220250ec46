//! VPD page codes and designation descriptors (SPC-4 7.8).

pub const SUPPORTED_PAGES: u8 = 0x00;
pub const UNIT_SERIAL_NUMBER: u8 = 0x80;
pub const DEVICE_IDENTIFICATION: u8 = 0x83;
pub const EXTENDED_INQUIRY: u8 = 0x86;
pub const BLOCK_LIMITS: u8 = 0xb0;
pub const BLOCK_DEVICE_CHARACTERISTICS: u8 = 0xb1;
pub const LOGICAL_BLOCK_PROVISIONING: u8 = 0xb2;

/// PROTOCOL IDENTIFIER for iSCSI (SPC-4 table 362).
pub const PROTOCOL_ISCSI: u8 = 0x5;

/// CODE SET values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CodeSet {
    Binary = 1,
    Ascii = 2,
    Utf8 = 3,
}

/// ASSOCIATION values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Association {
    LogicalUnit = 0,
    TargetPort = 1,
    TargetDevice = 2,
}

/// DESIGNATOR TYPE values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DesignatorType {
    T10VendorId = 1,
    Naa = 3,
    RelativeTargetPort = 4,
    TargetPortGroup = 5,
    ScsiNameString = 8,
}

/// Append one designation descriptor to `out`. Target-port and
/// target-device designators carry the iSCSI protocol identifier (PIV=1).
/// A SCSI name string is NUL terminated and padded to a multiple of four
/// bytes, as SPC-4 7.8.6.11 requires. Designators longer than 255 bytes are
/// cut to fit the one-byte length.
pub fn push_designator(
    out: &mut Vec<u8>,
    code_set: CodeSet,
    association: Association,
    kind: DesignatorType,
    designator: &[u8],
) {
    let piv = association != Association::LogicalUnit;
    let proto = if piv { PROTOCOL_ISCSI << 4 } else { 0 };
    out.push(proto | code_set as u8);
    out.push(if piv { 0x80 } else { 0 } | (association as u8) << 4 | kind as u8);
    out.push(0);
    if kind == DesignatorType::ScsiNameString {
        let n = (designator.len() + 1).div_ceil(4) * 4;
        let n = n.min(252);
        out.push(n as u8);
        let take = designator.len().min(n - 1);
        out.extend_from_slice(&designator[..take]);
        out.resize(out.len() + (n - take), 0);
    } else {
        let take = designator.len().min(255);
        out.push(take as u8);
        out.extend_from_slice(&designator[..take]);
    }
}

/// Copy `s` into a space-padded ASCII field of `n` bytes.
pub fn ascii_field(out: &mut Vec<u8>, s: &str, n: usize) {
    let b = s.as_bytes();
    let take = b.len().min(n);
    out.extend_from_slice(&b[..take]);
    out.resize(out.len() + (n - take), b' ');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scsi_name_string_is_padded_and_terminated() {
        let mut v = Vec::new();
        push_designator(
            &mut v,
            CodeSet::Utf8,
            Association::TargetPort,
            DesignatorType::ScsiNameString,
            b"iqn.x,t,0x0001",
        );
        assert_eq!(v[0], 0x53);
        assert_eq!(v[1], 0x98);
        assert_eq!(v[3], 16);
        assert_eq!(v.len(), 20);
        assert_eq!(&v[4..18], b"iqn.x,t,0x0001");
        assert_eq!(&v[18..], &[0, 0]);
    }

    #[test]
    fn naa_has_no_piv() {
        let mut v = Vec::new();
        push_designator(
            &mut v,
            CodeSet::Binary,
            Association::LogicalUnit,
            DesignatorType::Naa,
            &[0x60; 16],
        );
        assert_eq!(&v[..4], &[0x01, 0x03, 0, 16]);
    }

    #[test]
    fn ascii_pads() {
        let mut v = Vec::new();
        ascii_field(&mut v, "AB", 4);
        assert_eq!(v, b"AB  ");
    }
}
