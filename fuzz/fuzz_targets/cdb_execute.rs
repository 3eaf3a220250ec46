//! Arbitrary CDBs with arbitrary data-out executed by a logical unit over an
//! in-memory backend, from two nexuses: every input must end in a status
//! (GOOD, CHECK CONDITION with sense, RESERVATION CONFLICT ...), never a panic.
#![no_main]

use std::sync::{Arc, OnceLock};

use keyfence_lu::backend::MemBackend;
use keyfence_lu::{CommandRequest, LogicalUnit, LuConfig, TargetLuns};
use keyfence_scsi::{InitiatorPort, Nexus, ScsiStatus, TargetPort};
use libfuzzer_sys::fuzz_target;

struct Fixture {
    lu: LogicalUnit,
    nexus: [Nexus; 2],
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let name = "iqn.2026-11.io.keyfence:fuzz";
        let ports = vec![TargetPort::new(name, 1, 1), TargetPort::new(name, 2, 2)];
        let cfg = LuConfig::new(name, 0, ports.clone(), Arc::new(TargetLuns::new(vec![0])));
        let lu = LogicalUnit::new(cfg, Arc::new(MemBackend::new(4 << 20))).expect("lu");
        let nexus = [
            Nexus::new(
                InitiatorPort::new("iqn.2026-11.io.keyfence:a", 1),
                ports[0].clone(),
            ),
            Nexus::new(
                InitiatorPort::new("iqn.2026-11.io.keyfence:b", 2),
                ports[1].clone(),
            ),
        ];
        Fixture { lu, nexus }
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let f = fixture();
    let nexus = &f.nexus[usize::from(data[0] & 1)];
    let cdb_len = usize::from(data[1] % 33).min(data.len() - 2);
    let (cdb, data_out) = data[2..].split_at(cdb_len);
    let out = f.lu.execute(&CommandRequest {
        nexus,
        cdb,
        data_out,
        read_only: false,
        luns: None,
    });
    if out.status == ScsiStatus::CheckCondition {
        assert!(out.sense.is_some(), "CHECK CONDITION without sense");
    }
});
