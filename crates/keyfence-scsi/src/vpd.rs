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

/// Why a VPD page 83h could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VpdError {
    #[error("shorter than its 4-byte header")]
    Short,
    #[error("page code 0x{0:02x}")]
    PageCode(u8),
    #[error("designator at offset {0} overruns the page")]
    Overrun(usize),
}

/// One identification descriptor of VPD page 83h (SPC-4 7.8.6), as
/// [`push_designator`] writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Designator {
    pub protocol_identifier: Option<u8>,
    pub code_set: u8,
    /// 0 = logical unit, 1 = target port, 2 = target device.
    pub association: u8,
    pub designator_type: u8,
    pub value: Vec<u8>,
}

impl Designator {
    pub fn type_name(&self) -> &'static str {
        match self.designator_type {
            0 => "vendor specific",
            1 => "T10 vendor ID",
            2 => "EUI-64",
            3 => "NAA",
            4 => "relative target port",
            5 => "target port group",
            6 => "logical unit group",
            7 => "MD5 logical unit",
            8 => "SCSI name string",
            9 => "protocol specific port",
            10 => "UUID",
            _ => "reserved",
        }
    }

    pub fn association_name(&self) -> &'static str {
        match self.association {
            0 => "logical unit",
            1 => "target port",
            2 => "target device",
            _ => "reserved",
        }
    }

    /// Relative target port identifier (type 4), if this is one.
    pub fn relative_target_port(&self) -> Option<u16> {
        (self.designator_type == 4 && self.value.len() >= 4)
            .then(|| u16::from_be_bytes([self.value[2], self.value[3]]))
    }

    /// The value as text (code sets 2 = ASCII, 3 = UTF-8; trailing spaces
    /// and NULs dropped) or hex.
    pub fn value_string(&self) -> String {
        if matches!(self.code_set, 2 | 3) {
            String::from_utf8_lossy(&self.value)
                .trim_end_matches([' ', '\0'])
                .to_string()
        } else {
            self.value.iter().map(|b| format!("{b:02x}")).collect()
        }
    }
}

/// Decode VPD page 83h (Device Identification): the inverse of a page
/// built with [`push_designator`]. A PAGE LENGTH beyond the data is cut to
/// the data (the allocation length may have truncated the page).
pub fn decode_device_identification(d: &[u8]) -> Result<Vec<Designator>, VpdError> {
    if d.len() < 4 {
        return Err(VpdError::Short);
    }
    if d[1] != DEVICE_IDENTIFICATION {
        return Err(VpdError::PageCode(d[1]));
    }
    let page_len = usize::from(u16::from_be_bytes([d[2], d[3]]));
    let body = d.get(4..).unwrap_or(&[]);
    let body = &body[..page_len.min(body.len())];
    let mut out = Vec::new();
    let mut off = 0usize;
    while off + 4 <= body.len() {
        let h = &body[off..off + 4];
        let len = usize::from(h[3]);
        let start = off + 4;
        let end = start + len;
        let value = body.get(start..end).ok_or(VpdError::Overrun(off + 4))?;
        let piv = h[1] & 0x80 != 0;
        let association = (h[1] >> 4) & 0x03;
        out.push(Designator {
            protocol_identifier: (piv && association != 0).then_some(h[0] >> 4),
            code_set: h[0] & 0x0f,
            association,
            designator_type: h[1] & 0x0f,
            value: value.to_vec(),
        });
        off = end;
    }
    Ok(out)
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

    #[test]
    fn decodes_what_push_designator_encodes() {
        let mut body = Vec::new();
        push_designator(
            &mut body,
            CodeSet::Binary,
            Association::LogicalUnit,
            DesignatorType::Naa,
            &[0x60; 16],
        );
        push_designator(
            &mut body,
            CodeSet::Binary,
            Association::TargetPort,
            DesignatorType::RelativeTargetPort,
            &[0, 0, 0, 2],
        );
        let mut page = vec![0, DEVICE_IDENTIFICATION];
        page.extend_from_slice(&(body.len() as u16).to_be_bytes());
        page.extend_from_slice(&body);
        let d = decode_device_identification(&page).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!((d[0].association, d[0].designator_type), (0, 3));
        assert_eq!(d[0].value, vec![0x60; 16]);
        assert_eq!(d[0].protocol_identifier, None);
        assert_eq!(d[1].relative_target_port(), Some(2));
        assert_eq!(d[1].protocol_identifier, Some(PROTOCOL_ISCSI));
        assert_eq!(
            decode_device_identification(&page[..3]),
            Err(VpdError::Short)
        );
        let mut other = page.clone();
        other[1] = 0x80;
        assert_eq!(
            decode_device_identification(&other),
            Err(VpdError::PageCode(0x80))
        );
        let mut cut = page[..page.len() - 2].to_vec();
        cut[3] = (body.len() + 4) as u8;
        assert_eq!(
            decode_device_identification(&cut),
            Err(VpdError::Overrun(24))
        );
    }
}
