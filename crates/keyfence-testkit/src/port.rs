//! Port numbers for programs that must be told their port up front.
//!
//! Whatever can bind `127.0.0.1:0` and report the port it got should do
//! that (`keyfence serve` and the in-process server do). tgtd cannot: it
//! needs a number on its command line. A number picked by binding port 0
//! and closing the socket can be taken by someone else before the program
//! binds it, so [`with_free_port`] lets the caller report that and tries
//! another number.

use std::net::TcpListener;

/// Attempts before [`with_free_port`] gives up.
pub const ATTEMPTS: usize = 10;

/// Call `start` with a free loopback port until it succeeds. `start`
/// returns `Err(reason)` when it could not use the port (bind failed, the
/// program exited); after [`ATTEMPTS`] failures the test fails with the
/// reasons.
pub fn with_free_port<T>(what: &str, mut start: impl FnMut(u16) -> Result<T, String>) -> T {
    with_free_ports(1, what, |p| start(p[0]))
}

/// [`with_free_port`] for `n` distinct ports at once.
pub fn with_free_ports<T>(
    n: usize,
    what: &str,
    mut start: impl FnMut(&[u16]) -> Result<T, String>,
) -> T {
    let mut errors = Vec::new();
    for _ in 0..ATTEMPTS {
        // Hold all listeners until every port is chosen, so they differ.
        let held: Vec<TcpListener> = (0..n)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
            .collect();
        let ports: Vec<u16> = held
            .iter()
            .map(|l| l.local_addr().expect("local addr").port())
            .collect();
        drop(held);
        match start(&ports) {
            Ok(t) => return t,
            Err(e) => errors.push(format!("ports {ports:?}: {e}")),
        }
    }
    panic!(
        "could not start {what} after {ATTEMPTS} attempts:\n  {}",
        errors.join("\n  ")
    )
}

/// A loopback port where nothing listens, reserved for as long as the
/// value lives: a TCP socket is bound to it but never listens, so
/// connections are refused and no other program can take the port.
pub struct ClosedPort {
    /// Holds the port; closed on drop.
    _socket: std::os::fd::OwnedFd,
    port: u16,
}

impl ClosedPort {
    pub fn new() -> ClosedPort {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2)/bind(2)/getsockname(2) calls on a socket
        // this function owns; every pointer refers to a live local of the
        // size passed with it.
        unsafe {
            let raw = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(raw >= 0, "socket: {}", std::io::Error::last_os_error());
            let fd = std::os::fd::OwnedFd::from_raw_fd(raw);
            let mut sa: libc::sockaddr_in = std::mem::zeroed();
            sa.sin_family = libc::AF_INET as libc::sa_family_t;
            sa.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let rc = libc::bind(raw, (&sa as *const libc::sockaddr_in).cast(), len);
            assert_eq!(
                rc,
                0,
                "bind 127.0.0.1:0: {}",
                std::io::Error::last_os_error()
            );
            let mut len = len;
            let rc = libc::getsockname(raw, (&mut sa as *mut libc::sockaddr_in).cast(), &mut len);
            assert_eq!(rc, 0, "getsockname: {}", std::io::Error::last_os_error());
            ClosedPort {
                _socket: fd,
                port: u16::from_be(sa.sin_port),
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Default for ClosedPort {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn closed_port_refuses_connections() {
        let c = ClosedPort::new();
        let e = std::net::TcpStream::connect(("127.0.0.1", c.port())).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
        assert!(TcpListener::bind(("127.0.0.1", c.port())).is_err());
    }

    use super::*;

    #[test]
    fn retries_until_the_port_can_be_bound() {
        let mut tries = 0;
        let l = with_free_port("a listener", |p| {
            tries += 1;
            if tries < 3 {
                return Err("pretend it was taken".into());
            }
            TcpListener::bind(("127.0.0.1", p)).map_err(|e| e.to_string())
        });
        assert_eq!(tries, 3);
        assert!(l.local_addr().unwrap().port() > 0);
    }

    #[test]
    fn gives_up_with_the_reasons() {
        let r = std::panic::catch_unwind(|| with_free_port::<()>("nothing", |_| Err("no".into())));
        let msg = r.unwrap_err();
        let msg = msg.downcast_ref::<String>().unwrap();
        assert!(
            msg.contains("could not start nothing after 10 attempts"),
            "{msg}"
        );
    }

    #[test]
    fn distinct_ports() {
        let ports = with_free_ports(3, "three", |p| Ok(p.to_vec()));
        assert!(ports[0] != ports[1] && ports[1] != ports[2] && ports[0] != ports[2]);
    }
}
