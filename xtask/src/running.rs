//! A long-running lab (`cargo xtask demo`, `cargo xtask cluster`) recorded
//! in a state file under /run, so that `--down` from another terminal stops
//! it, or cleans up after one that was killed.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// One kind of lab's state file.
pub struct Running {
    /// `demo`, `cluster`: names the file (/run/weft-NAME.json) and the command.
    pub name: &'static str,
}

impl Running {
    fn file(&self) -> PathBuf {
        PathBuf::from(format!("/run/weft-{}.json", self.name))
    }

    fn read(&self) -> Option<Result<Value>> {
        let text = std::fs::read_to_string(self.file()).ok()?;
        Some(
            serde_json::from_str(&text)
                .with_context(|| format!("reading {}", self.file().display())),
        )
    }

    /// Refuses to start over a live lab of this kind, cleans up after a dead
    /// one (`clean`, given its record), then records this one (`record`,
    /// which gets this process's pid added).
    pub fn claim(&self, mut record: Value, clean: impl Fn(&Value)) -> Result<()> {
        if let Some(old) = self.read() {
            let old = old.unwrap_or_default();
            let pid = old["pid"].as_i64().unwrap_or(0) as i32;
            // SAFETY: kill with signal 0 only checks the process exists.
            if pid > 0 && unsafe { libc::kill(pid, 0) } == 0 {
                bail!(
                    "a {} is already running (pid {pid}); stop it with `cargo xtask {} --down`",
                    self.name,
                    self.name
                );
            }
            clean(&old);
        }
        record["pid"] = serde_json::json!(std::process::id());
        std::fs::write(self.file(), record.to_string())
            .with_context(|| format!("writing {}", self.file().display()))
    }

    /// Forgets this lab (it has torn itself down).
    pub fn release(&self) {
        let _ = std::fs::remove_file(self.file());
    }

    /// `--down`: asks the running lab to tear down (SIGTERM) and waits up to
    /// `wait`; if it is gone without having done so, `clean` removes what it
    /// left. `say` tells the user which happened.
    pub fn down(&self, wait: Duration, clean: impl Fn(&Value), say: impl Fn(&str)) -> Result<()> {
        let Some(record) = self.read() else {
            say(&format!("no {} is running", self.name));
            return Ok(());
        };
        let record = record?;
        let pid = record["pid"].as_i64().unwrap_or(0) as i32;
        // SAFETY: kill(2) with our own stored pid.
        if pid > 0 && unsafe { libc::kill(pid, libc::SIGTERM) } == 0 {
            say(&format!("asked the {} (pid {pid}) to tear down", self.name));
            let deadline = std::time::Instant::now() + wait;
            while std::time::Instant::now() < deadline {
                // SAFETY: as above; signal 0 checks existence.
                if unsafe { libc::kill(pid, 0) } != 0 {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        clean(&record);
        self.release();
        say(&format!("cleaned up what the last {} left", self.name));
        Ok(())
    }
}
