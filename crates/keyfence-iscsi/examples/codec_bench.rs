//! Rough codec throughput: encodes and decodes Data-In PDUs in memory.
//!
//! `cargo run --release -p iscsi --example codec_bench [payload-bytes] [count]`

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use keyfence_iscsi::pdu::{DataIn, Lun, Residual, RESERVED_TAG};
use keyfence_iscsi::PduCodec;

fn main() {
    let mut args = std::env::args().skip(1);
    let size: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(262_144);
    let count: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let payload = Bytes::from(vec![0x5au8; size]);
    for (hd, dd) in [(false, false), (true, false), (true, true)] {
        let mut c = PduCodec::new();
        c.set_header_digest(hd);
        c.set_data_digest(dd);
        c.set_max_recv_data_segment_length(size as u32);
        c.set_max_send_data_segment_length(size as u32);
        let mut wire = BytesMut::with_capacity(c.encoded_len(0, size) * 2);
        let start = Instant::now();
        let mut bytes = 0usize;
        for i in 0..count {
            let d = DataIn {
                final_bit: true,
                ack: false,
                status: Some(0),
                residual: Residual::None,
                lun: Lun::default(),
                itt: i as u32,
                ttt: RESERVED_TAG,
                stat_sn: i as u32,
                exp_cmd_sn: 0,
                max_cmd_sn: 0,
                data_sn: 0,
                buffer_offset: 0,
                data: payload.clone(),
            };
            // zero-copy style: header into the buffer, payload appended
            c.encode_header(&d.header(), &[], size, &mut wire).unwrap();
            wire.extend_from_slice(&payload);
            let (t, n) = c.data_trailer(&payload);
            wire.extend_from_slice(&t[..n]);
            let p = c.decode(&mut wire).unwrap().unwrap();
            bytes += p.data.len();
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "hd={hd:5} dd={dd:5} payload={size:>7}: {:>8.0} PDU/s {:>7.2} GB/s",
            count as f64 / secs,
            bytes as f64 / secs / 1e9
        );
    }
}
