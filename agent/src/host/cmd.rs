//! Runs a program: only the masquerade ruleset's transaction
//! ([`crate::host::masq`]) does, once at start. Everything else reaches the
//! kernel in-process.

use std::{
    io::{self, Write},
    process::{Command, Stdio},
};

/// A command that failed, with what it printed.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("could not run `{cmd}`: {source} (is `{program}` installed, and on PATH?)")]
    Spawn {
        program: String,
        cmd: String,
        source: io::Error,
    },
    #[error("`{cmd}` failed: {stderr}")]
    Failed { cmd: String, stderr: String },
}

/// Runs `PROGRAM ARGS…` and returns its stdout.
pub fn run(program: &str, args: &[&str]) -> Result<String, CmdError> {
    run_with_input(program, args, None)
}

/// Runs `PROGRAM ARGS…` with `input` on its stdin (none: stdin closed) and
/// returns its stdout.
pub fn run_with_input(
    program: &str,
    args: &[&str],
    input: Option<&str>,
) -> Result<String, CmdError> {
    let cmd = format!("{program} {}", args.join(" "));
    let spawn_err = |source| CmdError::Spawn {
        program: program.to_string(),
        cmd: cmd.clone(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        // A write error shows as the program's own failure below.
        let _ = stdin.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        return Err(CmdError::Failed {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
