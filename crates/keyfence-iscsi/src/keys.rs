//! Text key=value encoding (RFC 7143 §6.1): pairs separated by NUL bytes,
//! key names of at most 63 characters from `[A-Za-z0-9.+@_-]`, UTF-8
//! values. Parsing is strict and bounded; building is infallible for
//! well-formed keys.

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

/// Longest key name allowed (RFC 7143 §6.1).
pub const MAX_KEY_LEN: usize = 63;
/// Longest value accepted: the largest binary value (e.g. CHAP_C) in hex
/// with its 0x prefix is 2 * 1024 + 2; standard values are at most 255 but
/// are checked per key where they are interpreted.
pub const MAX_VALUE_LEN: usize = 8192;
/// Most pairs accepted in one text exchange.
pub const MAX_PAIRS: usize = 256;
/// Largest assembled text (all PDUs of one request or response sequence).
pub const MAX_TEXT_LEN: usize = 64 * 1024;

/// Malformed text data.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyError {
    #[error("text pair without '='")]
    MissingEquals,
    #[error("empty key name")]
    EmptyKey,
    #[error("key name longer than {MAX_KEY_LEN} bytes")]
    KeyTooLong,
    #[error("invalid character in key name")]
    BadKeyChar,
    #[error("value of {key} longer than {max} bytes")]
    ValueTooLong { key: String, max: usize },
    #[error("value of {0} is not UTF-8")]
    BadUtf8(String),
    #[error("more than {MAX_PAIRS} text pairs")]
    TooManyPairs,
    #[error("text longer than {MAX_TEXT_LEN} bytes")]
    TextTooLong,
    #[error("key {0} sent twice")]
    Duplicate(String),
}

/// True for a byte allowed in a key name.
fn key_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'+' | b'@' | b'_')
}

/// Validates a key name.
pub fn check_key(key: &str) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::EmptyKey);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::KeyTooLong);
    }
    if !key.bytes().all(key_char) {
        return Err(KeyError::BadKeyChar);
    }
    Ok(())
}

/// Parses a complete text data area into pairs, in order. Empty strings
/// between NULs (padding some initiators send) are skipped; a missing
/// final NUL is accepted. Duplicate keys are an error.
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, KeyError> {
    if data.len() > MAX_TEXT_LEN {
        return Err(KeyError::TextTooLong);
    }
    let mut out: Vec<(String, String)> = Vec::new();
    for item in data.split(|&b| b == 0) {
        if item.is_empty() {
            continue;
        }
        if out.len() == MAX_PAIRS {
            return Err(KeyError::TooManyPairs);
        }
        let eq = item
            .iter()
            .position(|&b| b == b'=')
            .ok_or(KeyError::MissingEquals)?;
        let (k, v) = (&item[..eq], &item[eq + 1..]);
        let key = std::str::from_utf8(k).map_err(|_| KeyError::BadKeyChar)?;
        check_key(key)?;
        if v.len() > MAX_VALUE_LEN {
            return Err(KeyError::ValueTooLong {
                key: key.to_owned(),
                max: MAX_VALUE_LEN,
            });
        }
        let value = std::str::from_utf8(v).map_err(|_| KeyError::BadUtf8(key.to_owned()))?;
        if out.iter().any(|(ek, _)| ek == key) {
            return Err(KeyError::Duplicate(key.to_owned()));
        }
        out.push((key.to_owned(), value.to_owned()));
    }
    Ok(out)
}

/// Finds a key's value.
pub fn get<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Builds NUL-terminated key=value text.
#[derive(Debug, Default, Clone)]
pub struct TextBuilder {
    buf: BytesMut,
}

impl TextBuilder {
    pub fn new() -> TextBuilder {
        TextBuilder::default()
    }
    /// Appends `key=value\0`.
    pub fn push(&mut self, key: &str, value: &str) -> &mut Self {
        self.buf.reserve(key.len() + value.len() + 2);
        self.buf.extend_from_slice(key.as_bytes());
        self.buf.put_u8(b'=');
        self.buf.extend_from_slice(value.as_bytes());
        self.buf.put_u8(0);
        self
    }
    /// Appends every pair.
    pub fn extend<'a, I: IntoIterator<Item = &'a (String, String)>>(
        &mut self,
        pairs: I,
    ) -> &mut Self {
        for (k, v) in pairs {
            self.push(k, v);
        }
        self
    }
    /// Appends already built (NUL-terminated) text.
    pub fn push_text(&mut self, text: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(text);
        self
    }
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    pub fn finish(self) -> Bytes {
        self.buf.freeze()
    }
}

/// Encodes pairs as text.
pub fn build(pairs: &[(String, String)]) -> Bytes {
    let mut b = TextBuilder::new();
    b.extend(pairs);
    b.finish()
}

/// Splits `text` into chunks of at most `max` bytes (`max` >= 1) for
/// sending over several PDUs with the C bit. A pair may be split across
/// PDUs (RFC 7143 §6.1 allows it).
pub fn chunks(text: &Bytes, max: usize) -> Vec<Bytes> {
    let max = max.max(1);
    if text.is_empty() {
        return vec![Bytes::new()];
    }
    let mut out = Vec::with_capacity(text.len().div_ceil(max));
    let mut off = 0;
    while off < text.len() {
        let end = (off + max).min(text.len());
        out.push(text.slice(off..end));
        off = end;
    }
    out
}

/// Parses a numeric value: decimal, or hex with 0x (RFC 7143 §6.1 numerical values).
pub fn parse_number(v: &str) -> Option<u64> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if h.is_empty() || h.len() > 16 {
            return None;
        }
        u64::from_str_radix(h, 16).ok()
    } else {
        if v.is_empty() || v.len() > 20 || !v.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        v.parse().ok()
    }
}

/// Decodes a binary value: `0x` hex or `0b` base64 (RFC 7143 §6.1).
pub fn decode_binary(v: &str) -> Option<Vec<u8>> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        let h = h.as_bytes();
        if h.is_empty() {
            return None;
        }
        // An odd number of digits has an implied leading zero.
        let mut out = Vec::with_capacity(h.len().div_ceil(2));
        let mut i = 0;
        if h.len() & 1 == 1 {
            out.push(hex_val(h[0])?);
            i = 1;
        }
        while i + 1 < h.len() {
            out.push((hex_val(h[i])? << 4) | hex_val(h[i + 1])?);
            i += 2;
        }
        Some(out)
    } else if let Some(b) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        base64_decode(b.as_bytes())
    } else {
        None
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Encodes a binary value as `0x` lowercase hex.
pub fn encode_hex(bytes: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    for b in bytes {
        s.push(D[usize::from(b >> 4)] as char);
        s.push(D[usize::from(b & 15)] as char);
    }
    s
}

fn base64_decode(s: &[u8]) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        })
    }
    if s.is_empty() || s.len() & 3 != 0 {
        return None;
    }
    let pad = s.iter().rev().take_while(|&&c| c == b'=').count();
    if pad > 2 {
        return None;
    }
    let body = &s[..s.len() - pad];
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0;
    for &c in body {
        acc = (acc << 6) | val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_build_roundtrip() {
        let pairs = vec![
            (
                "InitiatorName".to_string(),
                "iqn.1993-08.org.debian:01:abc".to_string(),
            ),
            ("SessionType".to_string(), "Normal".to_string()),
            ("X-com.example.k".to_string(), "".to_string()),
        ];
        let text = build(&pairs);
        assert_eq!(text.last(), Some(&0));
        assert_eq!(parse(&text).unwrap(), pairs);
        assert_eq!(get(&pairs, "SessionType"), Some("Normal"));
        assert_eq!(get(&pairs, "Nope"), None);
    }

    #[test]
    fn parse_lenient_on_padding_strict_on_form() {
        assert_eq!(parse(b"A=1\0\0\0\0").unwrap().len(), 1);
        assert_eq!(parse(b"A=1").unwrap()[0].1, "1");
        assert_eq!(parse(b"A=1=2\0").unwrap()[0].1, "1=2");
        assert_eq!(parse(b"A\0"), Err(KeyError::MissingEquals));
        assert_eq!(parse(b"=1\0"), Err(KeyError::EmptyKey));
        assert_eq!(parse(b"A B=1\0"), Err(KeyError::BadKeyChar));
        assert_eq!(parse(b"A=\xff\0"), Err(KeyError::BadUtf8("A".into())));
        assert_eq!(parse(b"A=1\0A=2\0"), Err(KeyError::Duplicate("A".into())));
        let long_key = format!("{}=1", "K".repeat(64));
        assert_eq!(parse(long_key.as_bytes()), Err(KeyError::KeyTooLong));
        let long_val = format!("K={}", "v".repeat(MAX_VALUE_LEN + 1));
        assert!(matches!(
            parse(long_val.as_bytes()),
            Err(KeyError::ValueTooLong { .. })
        ));
        let many: String = (0..=MAX_PAIRS).map(|i| format!("K{i}=1\0")).collect();
        assert_eq!(parse(many.as_bytes()), Err(KeyError::TooManyPairs));
    }

    #[test]
    fn numbers_and_binary() {
        assert_eq!(parse_number("8192"), Some(8192));
        assert_eq!(parse_number("0x2000"), Some(8192));
        assert_eq!(parse_number(""), None);
        assert_eq!(parse_number("-1"), None);
        assert_eq!(parse_number("12a"), None);
        assert_eq!(decode_binary("0x0a0B"), Some(vec![0x0a, 0x0b]));
        assert_eq!(decode_binary("0xabc"), Some(vec![0x0a, 0xbc]));
        assert_eq!(decode_binary("0x"), None);
        assert_eq!(decode_binary("0xzz"), None);
        assert_eq!(decode_binary("0bAQID"), Some(vec![1, 2, 3]));
        assert_eq!(decode_binary("0bAQI="), Some(vec![1, 2]));
        assert_eq!(decode_binary("0bAQ=="), Some(vec![1]));
        assert_eq!(decode_binary("0bAQ="), None);
        assert_eq!(decode_binary("12"), None);
        assert_eq!(encode_hex(&[0, 0xff, 0x1a]), "0x00ff1a");
    }

    #[test]
    fn chunking() {
        let t = Bytes::from_static(b"abcdefghij");
        let c = chunks(&t, 4);
        assert_eq!(c.len(), 3);
        assert_eq!(&c[2][..], b"ij");
        assert_eq!(chunks(&Bytes::new(), 4).len(), 1);
    }
}
