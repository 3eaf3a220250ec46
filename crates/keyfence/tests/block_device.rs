//! A LUN on a real block device (a loop device over a file): writes reach
//! the device and are durable after a flush, the device is opened
//! `O_EXCL` so a second writer, a mounted file system or a second
//! `keyfence serve` is refused with a precise error, and it is free again
//! once the first holder closes it. A `direct = true` LUN on a device is
//! all that and uncached, at the backend and through `keyfence serve`.
//!
//! Attaching loop devices needs root, so these tests are ignored by a
//! plain `cargo test`; `scripts/test.sh` runs them with `--ignored` when
//! it runs as root and `losetup` can attach a device, and says so when it
//! cannot. Run them by hand with
//! `cargo test -p keyfence --test block_device -- --ignored`.

mod initiator_support;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use keyfence_initiator::Bytes;
use keyfence_lu::backend::{BackendError, BlockBackend, FileBackend};
use keyfence_testkit::{code, opened_direct, run_bounded, text};

const KF: &str = env!("CARGO_BIN_EXE_keyfence");
const SIZE: u64 = 16 << 20;
const WAIT: Duration = Duration::from_secs(30);

/// A loop device over a file, detached on drop.
struct Loop {
    dev: PathBuf,
    image: PathBuf,
    _dir: tempfile::TempDir,
}

impl Loop {
    fn attach() -> Loop {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(SIZE).unwrap();
        f.write_all_at(b"before", 1 << 20).unwrap();
        f.sync_all().unwrap();
        let o = run_bounded(
            Command::new("losetup")
                .args(["--find", "--show"])
                .arg(&image),
            None,
            WAIT,
        );
        assert_eq!(
            code(&o),
            0,
            "losetup --find --show failed (these tests need root and loop devices): {}",
            text(&o.stderr)
        );
        let dev = PathBuf::from(text(&o.stdout).trim());
        Loop {
            dev,
            image,
            _dir: dir,
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = run_bounded(Command::new("losetup").arg("-d").arg(&self.dev), None, WAIT);
    }
}

fn assert_busy(r: Result<FileBackend, BackendError>, what: &str) {
    match r {
        Err(BackendError::DeviceBusy { .. }) => {}
        other => panic!("{what}: want DeviceBusy, got {other:?}"),
    }
}

#[test]
#[ignore = "needs root and a loop device; scripts/test.sh runs it where it can"]
fn block_device_lun_is_exclusive_and_durable() {
    let lp = Loop::attach();
    let b = FileBackend::open(&lp.dev, None, false).expect("open the loop device");
    assert_eq!(b.len(), SIZE, "a device keeps its own size");

    let mut got = [0u8; 6];
    b.read_at(&mut got, 1 << 20).unwrap();
    assert_eq!(&got, b"before");

    // A second writer, and a reader alongside the writer, are refused.
    assert_busy(
        FileBackend::open(&lp.dev, None, false),
        "second writable open",
    );
    match FileBackend::open(&lp.dev, None, true) {
        Err(BackendError::Locked { .. }) => {}
        other => panic!("read-only open beside a writer: want Locked, got {other:?}"),
    }

    // A write is on the file under the loop device once flushed.
    let block = vec![0x5au8; 4096];
    b.write_at(&block, 2 << 20).unwrap();
    b.flush().unwrap();
    drop(b);
    let f = std::fs::File::open(&lp.image).unwrap();
    let mut back = vec![0u8; 4096];
    f.read_exact_at(&mut back, 2 << 20).unwrap();
    assert_eq!(
        back, block,
        "the flushed write is not on the device's backing file"
    );

    // Closed, the device can be opened again.
    let again = FileBackend::open(&lp.dev, None, false).expect("reopen after close");
    drop(again);
}

fn mount(dev: &Path, at: &Path) {
    for cmd in [
        Command::new("mkfs.ext4").args(["-q", "-F"]).arg(dev),
        Command::new("mount").arg(dev).arg(at),
    ] {
        let o = run_bounded(cmd, None, WAIT);
        assert_eq!(code(&o), 0, "{cmd:?}: {}", text(&o.stderr));
    }
}

#[test]
#[ignore = "needs root and a loop device; scripts/test.sh runs it where it can"]
fn mounted_block_device_is_refused() {
    let lp = Loop::attach();
    let at = tempfile::tempdir().unwrap();
    mount(&lp.dev, at.path());
    let r = FileBackend::open(&lp.dev, None, false);
    let o = run_bounded(Command::new("umount").arg(at.path()), None, WAIT);
    assert_eq!(code(&o), 0, "umount: {}", text(&o.stderr));
    assert_busy(r, "writable open of a mounted device");
    // Unmounted, it can be served.
    FileBackend::open(&lp.dev, None, false).expect("open after umount");
}

/// A configuration file in `dir` with one open target whose LUN 0 is the
/// block device `dev`, uncached when `direct`.
fn device_config(dir: &Path, dev: &Path, direct: bool) -> PathBuf {
    let cfg = dir.join("keyfence.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[target]]\nname = \"iqn.2026-11.io.keyfence:blockdev\"\nportals = [\"127.0.0.1:0\"]\nopen = true\n\n\
             [[target.lun]]\nid = 0\ndevice = \"{}\"\ndirect = {direct}\n",
            dev.display()
        ),
    )
    .unwrap();
    cfg
}

/// A second `keyfence serve` of `cfg` (data directory under `dir`) while a
/// first one serves the device `dev`: it fails at start-up with one line
/// that names the device as busy.
fn assert_second_serve_refused(cfg: &Path, dev: &Path, dir: &Path) {
    let o = run_bounded(
        Command::new(KF)
            .arg("serve")
            .arg("--config")
            .arg(cfg)
            .arg("--data-dir")
            .arg(dir.join("second"))
            .env_remove("KEYFENCE_CONFIG"),
        None,
        WAIT,
    );
    let err = text(&o.stderr);
    assert_ne!(code(&o), 0, "a second serve of {} started", dev.display());
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "want one line, got:\n{err}");
    assert!(
        lines[0].contains(&dev.display().to_string()) && lines[0].contains("busy"),
        "the error does not name the busy device: {err}"
    );
}

#[test]
#[ignore = "needs root and a loop device; scripts/test.sh runs it where it can"]
fn second_serve_of_a_device_fails_with_one_line() {
    let lp = Loop::attach();
    let dir = tempfile::tempdir().unwrap();
    let cfg = device_config(dir.path(), &lp.dev, false);
    let first = keyfence_testkit::Serve::builder(KF)
        .config(&cfg)
        .log_level("error")
        .start();
    assert_second_serve_refused(&cfg, &lp.dev, dir.path());
    drop(first);
}

#[test]
#[ignore = "needs root and a loop device; scripts/test.sh runs it where it can"]
fn direct_lun_on_a_block_device_bypasses_the_page_cache() {
    let lp = Loop::attach();
    let b = FileBackend::open_direct(&lp.dev, None, false).expect("open the loop device O_DIRECT");
    assert_eq!(b.len(), SIZE);
    assert!(
        !b.may_read_nowait(),
        "an uncached LU must not try page-cache reads"
    );

    // Still exclusive: a second open, cached or not, is refused.
    assert_busy(
        FileBackend::open_direct(&lp.dev, None, false),
        "second direct open",
    );
    assert_busy(
        FileBackend::open(&lp.dev, None, false),
        "cached open beside a direct one",
    );

    // Unaligned reads, as the LU issues them for 512-byte blocks.
    let mut got = [0u8; 6];
    b.read_at(&mut got, 1 << 20).unwrap();
    assert_eq!(&got, b"before");
    let mut odd = vec![0u8; 1000];
    b.read_at(&mut odd, (1 << 20) - 494).unwrap();
    assert_eq!(&odd[494..500], b"before");

    // Without a flush, the write has left the device's page cache: the
    // loop driver has already passed it to the image file. (A buffered
    // write would sit in /dev/loopN's cache until written back.)
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    b.write_at(&data, (3 << 20) + 512).unwrap();
    let f = std::fs::File::open(&lp.image).unwrap();
    let mut back = vec![0u8; data.len()];
    f.read_exact_at(&mut back, (3 << 20) + 512).unwrap();
    assert!(
        back == data,
        "an O_DIRECT write is not on the device's backing file before any flush"
    );
}

/// The test above through `keyfence serve`: a `direct = true` LUN on the
/// loop device, driven over iSCSI. serve holds the device `O_DIRECT`; a
/// WRITE, acknowledged with no SYNCHRONIZE CACHE sent, is already on the
/// device's backing file and reads back through the target; and the
/// device stays exclusive to serve (a second open, cached or not, and a
/// second serve are refused).
#[test]
#[ignore = "needs root and a loop device; scripts/test.sh runs it where it can"]
fn direct_lun_on_a_block_device_served_over_iscsi() {
    let lp = Loop::attach();
    let dir = tempfile::tempdir().unwrap();
    let cfg = device_config(dir.path(), &lp.dev, true);
    let serve = keyfence_testkit::Serve::builder(KF)
        .config(&cfg)
        .log_level("error")
        .start();
    let pid = serve.pid().expect("serve runs");
    assert!(
        opened_direct(pid, &lp.dev),
        "keyfence serve holds {} open cached (flags {:?}), not O_DIRECT",
        lp.dev.display(),
        keyfence_testkit::fdinfo::open_flags(pid, &lp.dev)
            .iter()
            .map(|f| format!("0{f:o}"))
            .collect::<Vec<_>>()
    );

    // Exclusive while served.
    assert_busy(
        FileBackend::open_direct(&lp.dev, None, false),
        "direct open beside keyfence serve",
    );
    assert_busy(
        FileBackend::open(&lp.dev, None, false),
        "cached open beside keyfence serve",
    );
    assert_second_serve_refused(&cfg, &lp.dev, dir.path());

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dev =
            initiator_support::login(&serve.url(0), "iqn.2026-11.test:blockdev", 0x23d0_0000_00b1)
                .await;
        let cap = dev.capacity().await.expect("READ CAPACITY");
        assert_eq!(
            (cap.block_size, cap.blocks()),
            (512, SIZE / 512),
            "the LUN has the device's size"
        );
        // Written to the image before the device was attached.
        let got = dev.read(2048, 1).await.expect("READ at 1 MiB");
        assert_eq!(&got[..6], b"before");

        // 16 blocks at an odd LBA (3 MiB + 512). Nothing below flushes.
        let lba = (3 << 20) / 512 + 1;
        let data = Bytes::from((0..8192u32).map(|i| (i % 253) as u8).collect::<Vec<u8>>());
        dev.write(lba, data.clone()).await.expect("WRITE");
        let f = std::fs::File::open(&lp.image).unwrap();
        let mut back = vec![0u8; data.len()];
        f.read_exact_at(&mut back, lba * 512).unwrap();
        assert!(
            back == data[..],
            "an acknowledged WRITE to a direct LUN is not on the device's backing file \
             before any SYNCHRONIZE CACHE ({} of {} bytes differ)",
            back.iter().zip(&data[..]).filter(|(a, b)| a != b).count(),
            data.len()
        );
        assert_eq!(
            dev.read(lba, 16).await.expect("READ back"),
            data,
            "the WRITE does not read back through the target"
        );
        dev.synchronize_cache().await.expect("SYNCHRONIZE CACHE");
        dev.close().await.expect("logout");
    });
}
