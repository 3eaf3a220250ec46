//! Operational parameters (RFC 7143 §13) and their negotiated values.

/// The negotiated operational parameters of a session/connection, with the
/// RFC 7143 defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionParams {
    /// HeaderDigest=CRC32C negotiated.
    pub header_digest: bool,
    /// DataDigest=CRC32C negotiated.
    pub data_digest: bool,
    pub max_connections: u16,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    /// The MaxRecvDataSegmentLength we declared: the most we accept per PDU.
    pub max_recv_data_segment_length: u32,
    /// The MaxRecvDataSegmentLength the peer declared: the most we may send per PDU.
    pub max_send_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub default_time2wait: u16,
    pub default_time2retain: u16,
    pub max_outstanding_r2t: u16,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub error_recovery_level: u8,
}

impl Default for SessionParams {
    fn default() -> Self {
        SessionParams {
            header_digest: false,
            data_digest: false,
            max_connections: 1,
            initial_r2t: true,
            immediate_data: true,
            max_recv_data_segment_length: 8192,
            max_send_data_segment_length: 8192,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            default_time2wait: 2,
            default_time2retain: 20,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
        }
    }
}
