//! (under construction)
use std::ffi::OsString;
use std::process::ExitCode;

pub fn run(_args: &[OsString]) -> ExitCode {
    eprintln!("not yet implemented");
    ExitCode::from(1)
}
