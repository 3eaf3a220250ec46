//! What the agent tells about itself: `--help`/`-o manpage` text and the
//! XML metadata Pacemaker reads (`-o metadata`).

use super::options::{DEFAULT_CMAPCTL, DEFAULT_STORE, DEFAULT_TIMEOUT_S, OPTIONS};

pub fn usage() -> String {
    let mut s = String::from(
        "Usage: fence_keyfence [options]   (or options as name=value lines on stdin)\n\
         Fence agent for SCSI-3 persistent reservations on iSCSI LUNs.\nOptions:\n",
    );
    for (name, short, takes, desc) in OPTIONS {
        let head = match (short, takes) {
            (Some(c), true) => format!("  -{c}, --{name}=VALUE"),
            (Some(c), false) => format!("  -{c}, --{name}"),
            (None, true) => format!("      --{name}=VALUE"),
            (None, false) => format!("      --{name}"),
        };
        s.push_str(&format!("{head:<34} {desc}\n"));
    }
    s.push_str("Exit status: 0 success (status: on), 1 failure, 2 status off.\n");
    s
}

/// The XML Pacemaker reads (`-o metadata`).
pub fn metadata() -> String {
    let mut s = String::new();
    s.push_str("<?xml version=\"1.0\" ?>\n");
    s.push_str("<resource-agent name=\"fence_keyfence\" shortdesc=\"Fence agent for SCSI-3 persistent reservations on iSCSI LUNs (keyfence)\" >\n");
    s.push_str("<longdesc>fence_keyfence is an I/O fencing agent that uses SCSI-3 persistent reservations on iSCSI logical units, reached by its own iSCSI initiator. Every node registers its key (derived from the cluster and node names like fence_scsi, or given) on every device and one node creates a \"write exclusive, registrants only\" reservation, so only registered nodes may write. Fencing a node removes its key with PREEMPT AND ABORT, which also aborts its outstanding commands; it succeeds when a majority of the devices confirm. Unfencing (on) runs automatically on the node itself.</longdesc>\n");
    s.push_str("<vendor-url>https://github.com/keyfence/keyfence</vendor-url>\n<parameters>\n");
    for (name, short, takes, desc) in OPTIONS {
        let pname = name.replace('-', "_");
        let required = matches!(*name, "action" | "plug");
        let mixed = match (short, takes) {
            (Some(c), true) => format!("-{c}, --{name}=[{pname}]"),
            (Some(c), false) => format!("-{c}, --{name}"),
            (None, true) => format!("--{name}=[{pname}]"),
            (None, false) => format!("--{name}"),
        };
        let extra = match *name {
            "port" => " deprecated=\"1\"",
            "plug" => " obsoletes=\"port\"",
            _ => "",
        };
        let content = match *name {
            "action" => "<content type=\"string\" default=\"off\" />".to_string(),
            "key-value" => "<content type=\"select\" default=\"id\"><option value=\"id\" /><option value=\"hash\" /></content>".to_string(),
            "timeout" | "power-timeout" => format!("<content type=\"second\" default=\"{DEFAULT_TIMEOUT_S}\" />"),
            "delay" => "<content type=\"second\" default=\"0\" />".to_string(),
            "corosync-cmap-path" => format!("<content type=\"string\" default=\"{DEFAULT_CMAPCTL}\" />"),
            "store-path" => format!("<content type=\"string\" default=\"{DEFAULT_STORE}\" />"),
            _ if !takes => "<content type=\"boolean\" />".to_string(),
            _ => "<content type=\"string\" />".to_string(),
        };
        s.push_str(&format!(
            "\t<parameter name=\"{pname}\" unique=\"0\" required=\"{}\"{extra}>\n\t\t<getopt mixed=\"{}\" />\n\t\t{content}\n\t\t<shortdesc lang=\"en\">{}</shortdesc>\n\t</parameter>\n",
            u8::from(required),
            xml_escape(&mixed),
            xml_escape(desc)
        ));
    }
    s.push_str("</parameters>\n<actions>\n");
    s.push_str("\t<action name=\"on\" on_target=\"1\" automatic=\"1\"/>\n");
    for a in [
        "off",
        "reboot",
        "status",
        "list",
        "monitor",
        "metadata",
        "manpage",
        "validate-all",
    ] {
        s.push_str(&format!("\t<action name=\"{a}\" />\n"));
    }
    s.push_str("</actions>\n</resource-agent>\n");
    s
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_declares_automatic_unfencing() {
        let m = metadata();
        assert!(m.contains("<action name=\"on\" on_target=\"1\" automatic=\"1\"/>"));
        assert!(m.contains("<parameter name=\"devices\""));
        assert!(
            m.contains("<parameter name=\"plug\" unique=\"0\" required=\"1\" obsoletes=\"port\">")
        );
        assert!(m.starts_with("<?xml"));
    }
}
