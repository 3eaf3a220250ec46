//! What every clap-parsed subcommand shares: parsing its arguments under
//! its own name, with help and version on stdout (exit 0) and a usage error
//! on stderr with the command's own exit status for bad arguments.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;

/// Parse `args` (without the program name) as the arguments of `name`;
/// on `--help`/`--version` or a usage error, print and return the exit
/// status to end with (0, or `usage_status`).
pub fn parse<T: Parser>(name: &str, args: &[OsString], usage_status: u8) -> Result<T, ExitCode> {
    let argv = std::iter::once(OsString::from(name)).chain(args.iter().cloned());
    T::try_parse_from(argv).map_err(|e| {
        let _ = e.print();
        ExitCode::from(if e.use_stderr() { usage_status } else { 0 })
    })
}

/// Turn a library error into the one-line message the fence commands
/// print (their helpers collect errors as text).
pub trait Msg<T> {
    fn msg(self) -> Result<T, String>;
}

impl<T, E: std::fmt::Display> Msg<T> for Result<T, E> {
    fn msg(self) -> Result<T, String> {
        self.map_err(|e| e.to_string())
    }
}
