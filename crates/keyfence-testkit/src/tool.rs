//! External tools the tests talk to. [`require`] finds one or fails the
//! test with the Debian package that provides it.

use std::path::{Path, PathBuf};

/// Tool name -> Debian package providing it.
const PACKAGES: &[(&str, &str)] = &[
    ("tgtd", "tgt"),
    ("tgtadm", "tgt"),
    ("iscsi-ls", "libiscsi-bin"),
    ("iscsi-inq", "libiscsi-bin"),
    ("iscsi-readcapacity16", "libiscsi-bin"),
    ("iscsi-test-cu", "libiscsi-bin"),
    ("iscsi-perf", "libiscsi-bin"),
    ("sg_persist", "sg3-utils"),
    ("mpathpersist", "multipath-tools"),
    ("etcd", "etcd-server"),
    ("promtool", "prometheus"),
];

/// The Debian package that provides `tool`, when known.
pub fn package_of(tool: &str) -> Option<&'static str> {
    PACKAGES.iter().find(|(t, _)| *t == tool).map(|(_, p)| *p)
}

/// `tool` on `PATH`, or in the sbin directories (tgtd lives there and they
/// are not on every user's `PATH`).
pub fn find(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// How to get `tool`, for the failure message.
pub fn install_hint(tool: &str) -> String {
    match package_of(tool) {
        Some(pkg) => format!("apt-get install {pkg} (scripts/install-deps.sh installs it)"),
        None => format!("install {tool} and put it on PATH"),
    }
}

/// The path of `tool`. Panics (failing the test) when it is not installed,
/// saying how to install it: a test never passes because its tool is absent.
pub fn require(tool: &str) -> PathBuf {
    find(tool).unwrap_or_else(|| panic!("{tool} not found: {}", install_hint(tool)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_fails_with_install_hint() {
        let e = std::panic::catch_unwind(|| require("tgtd-that-does-not-exist")).unwrap_err();
        let msg = e.downcast_ref::<String>().unwrap();
        assert!(
            msg.starts_with("tgtd-that-does-not-exist not found: install"),
            "{msg}"
        );
        assert_eq!(package_of("tgtd"), Some("tgt"));
        assert!(install_hint("iscsi-ls").starts_with("apt-get install libiscsi-bin"));
    }

    #[test]
    fn finds_a_standard_program() {
        assert!(find("sh").is_some());
    }
}
