//! What the package ships besides the binary, checked with the tools that
//! consume it: the systemd unit (`systemd-analyze verify`), the example
//! configuration (the parser `keyfence serve --config` uses), the manual
//! pages (`groff -man` with every warning on) and the completions (bash,
//! zsh and fish themselves).
//!
//! A missing tool fails the test with the Debian package to install.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const KF: &str = env!("CARGO_BIN_EXE_keyfence");

fn dist(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../dist")
        .join(name)
}

/// Run a tool, failing with an install hint when it is missing.
fn tool(cmd: &mut Command, package: &str) -> Output {
    let name = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {name} ({e}): install it with `apt-get install {package}` (scripts/install-deps.sh does)"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `keyfence man DIR`: DIR/man1 and DIR/man8, a MANPATH entry.
fn man_tree(root: &Path) -> Vec<PathBuf> {
    let out = Command::new(KF).arg("man").arg(root).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let pages: Vec<PathBuf> = text(&out.stdout).lines().map(PathBuf::from).collect();
    for p in &pages {
        let section = p.extension().unwrap().to_string_lossy().into_owned();
        assert_eq!(p.parent().unwrap(), root.join(format!("man{section}")));
    }
    pages
}

#[test]
fn unit_file_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(dist("keyfence.service")).unwrap();
    // What the rest of the package and the README rely on.
    for line in [
        "Type=notify",
        "ExecStart=/usr/bin/keyfence serve --config /etc/keyfence/keyfence.toml",
        "StateDirectory=keyfence",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/keyfence",
        "NoNewPrivileges=yes",
        "PrivateDevices=no",
        "DeviceAllow=block-* rw",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
    ] {
        assert!(unit.lines().any(|l| l == line), "unit lacks {line:?}");
    }
    assert!(unit.lines().any(|l| l.starts_with("WatchdogSec=")));

    // systemd-analyze verify needs ExecStart's binary to exist and the
    // Documentation= pages to be found by man: point it at the binary
    // under test and at the pages `keyfence man` writes.
    let dir = tempfile::tempdir().unwrap();
    man_tree(&dir.path().join("man"));
    let copy = dir.path().join("keyfence.service");
    std::fs::write(
        &copy,
        unit.replace("ExecStart=/usr/bin/keyfence ", &format!("ExecStart={KF} ")),
    )
    .unwrap();
    let out = tool(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .env("MANPATH", dir.path().join("man"))
            .env("SYSTEMD_LOG_COLOR", "0"),
        "systemd",
    );
    let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success() && report.trim().is_empty(),
        "systemd-analyze verify {} reported problems (exit {:?}):\n{report}",
        copy.display(),
        out.status.code()
    );

    // The hardening, as systemd scores it (0 best, 10 worst; the unit
    // scores 2.4 "OK"): fail if it ever gets above 3.0.
    let out = tool(
        Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--threshold=30", "--no-pager"])
            .arg(&copy),
        "systemd",
    );
    let report = text(&out.stdout);
    assert!(
        out.status.success(),
        "exposure above 3.0:\n{}",
        report
            .lines()
            .filter(|l| l.contains("Overall") || l.starts_with('\u{2717}'))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // And it does catch problems: the same check on a broken copy fails.
    std::fs::write(
        &copy,
        unit.replace("ProtectClock=yes", "ProtectClock=sometimes"),
    )
    .unwrap();
    let out = tool(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .env("MANPATH", dir.path().join("man")),
        "systemd",
    );
    assert!(
        text(&out.stderr).contains("Failed to parse boolean value"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn example_config_is_accepted_by_serve_config_parser() {
    // Config::load is what `keyfence serve --config FILE` calls.
    let cfg = keyfence_target::config::Config::load(&dist("keyfence.toml"))
        .unwrap_or_else(|e| panic!("dist/keyfence.toml: {e}"));
    assert_eq!(cfg.data_dir, Path::new("/var/lib/keyfence"));
    assert_eq!(cfg.targets.len(), 1);
    let t = &cfg.targets[0];
    // Loopback only until the administrator chooses a portal.
    assert_eq!(t.portals, vec!["127.0.0.1:3260".to_string()]);
    assert_eq!(t.luns.len(), 1);
    assert_eq!(
        t.luns[0].backing(&cfg.data_dir),
        keyfence_target::config::Backing::File {
            path: PathBuf::from("/var/lib/keyfence/lun0.img"),
            size: 1 << 30
        }
    );
}

#[test]
fn manual_pages_render_without_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let pages = man_tree(dir.path());
    let names: Vec<String> = pages
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [
        "keyfence.1",
        "keyfence-serve.1",
        "keyfence-persist.1",
        "keyfence-mpathpersist.1",
        "keyfence-takeover.1",
        "keyfence-pr-show.1",
        "keyfence-bench.1",
        "keyfence-fence.1",
        "keyfence-fence-check.1",
        "keyfence-fence-acquire.1",
        "keyfence-fence-race.1",
        "keyfence-install-links.1",
        "keyfence-man.1",
        "keyfence-completions.1",
        "fence_keyfence.8",
    ] {
        assert!(names.contains(&want.to_string()), "no {want} in {names:?}");
    }
    for page in &pages {
        let out = tool(
            Command::new("groff")
                .args(["-man", "-Tutf8", "-ww", "-P-cbou", "-rLL=80n"])
                .arg(page),
            "groff-base",
        );
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "groff on {}: {}",
            page.display(),
            text(&out.stderr)
        );
        let plain = text(&out.stdout);
        assert!(plain.contains("NAME"), "{}: {plain}", page.display());
    }
    // The pages say what the tools print: serve's options, sg_persist's
    // usage text, the agent's options.
    let read = |n: &str| std::fs::read_to_string(dir.path().join("man1").join(n)).unwrap();
    assert!(read("keyfence-serve.1").contains("listen"));
    assert!(read("keyfence-persist.1").contains("Usage: sg_persist [OPTIONS] [DEVICE]"));
    assert!(read("keyfence-persist.1").contains("DIFFERENCES FROM SG_PERSIST"));
    let agent = std::fs::read_to_string(dir.path().join("man8/fence_keyfence.8")).unwrap();
    assert!(agent.contains("devices"), "{agent}");
}

fn completions(shell: &str) -> String {
    let out = Command::new(KF)
        .args(["completions", shell])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "completions {shell}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

#[test]
fn completions_work_in_bash_zsh_and_fish() {
    let dir = tempfile::tempdir().unwrap();

    // bash: load the script and ask it to complete `keyfence serve --li`
    // and `keyfence persist --reg`.
    let bash = dir.path().join("keyfence.bash");
    std::fs::write(&bash, completions("bash")).unwrap();
    let script = format!(
        r#"source {}
ask() {{ COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); COMP_LINE="$*"; COMP_POINT=${{#COMP_LINE}}; COMPREPLY=(); _keyfence keyfence "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"; printf '%s\n' "${{COMPREPLY[@]}}"; }}
ask keyfence se
echo ==
ask keyfence serve --li
echo ==
ask keyfence persist --register-i
"#,
        bash.display()
    );
    let out = tool(Command::new("bash").args(["-c", &script]), "bash");
    let got = text(&out.stdout);
    assert!(out.status.success(), "{got}{}", text(&out.stderr));
    let parts: Vec<&str> = got.split("==\n").collect();
    assert_eq!(parts.len(), 3, "{got}");
    assert!(parts[0].lines().any(|l| l.trim() == "serve"), "{got}");
    assert!(parts[1].lines().any(|l| l.trim() == "--listen"), "{got}");
    assert!(
        parts[2].lines().any(|l| l.trim() == "--register-ignore"),
        "{got}"
    );

    // fish: its own `complete -C` answers from the script.
    let fish = dir.path().join("keyfence.fish");
    std::fs::write(&fish, completions("fish")).unwrap();
    let out = tool(
        Command::new("fish").args([
            "--no-config",
            "-c",
            &format!(
                "source {}; complete -C 'keyfence serve --li'; echo ==; complete -C 'keyfence fence ac'",
                fish.display()
            ),
        ]),
        "fish",
    );
    let got = text(&out.stdout);
    assert!(out.status.success(), "{got}{}", text(&out.stderr));
    let parts: Vec<&str> = got.split("==\n").collect();
    assert!(parts[0].lines().any(|l| l.starts_with("--listen")), "{got}");
    assert!(parts[1].lines().any(|l| l.starts_with("acquire")), "{got}");

    // zsh: the script must parse and define the completion function.
    let zsh_dir = dir.path().join("zsh");
    std::fs::create_dir_all(&zsh_dir).unwrap();
    std::fs::write(zsh_dir.join("_keyfence"), completions("zsh")).unwrap();
    let out = tool(
        Command::new("zsh").args([
            "-f",
            "-c",
            &format!(
                "fpath=({} $fpath); autoload -U compinit; compinit -u -D; autoload -U +X _keyfence && whence -w _keyfence",
                zsh_dir.display()
            ),
        ]),
        "zsh",
    );
    let got = text(&out.stdout);
    assert!(
        out.status.success() && got.contains("_keyfence: function"),
        "{got}{}",
        text(&out.stderr)
    );
    let out = tool(
        Command::new("zsh").arg("-n").arg(zsh_dir.join("_keyfence")),
        "zsh",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
}
