//! IPA phonemes from espeak-ng kept running: a process reads a line of
//! text and writes one line of phonemes per clause, so a piece does not pay
//! for starting the program and loading its voice (~13 ms a piece here,
//! against ~3 ms asked of a running one). The program is run, not linked
//! (libespeak-ng is GPL).
//!
//! espeak-ng ends a clause at every line end and writes nothing that says
//! a text is done, so each text is followed by a line of its own, the
//! sentinel, whose phonemes (read once when the process starts) end the
//! answer. A text that holds the sentinel's words, or a process that fails,
//! is answered by a one-off run instead.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Mutex, MutexGuard};

use super::espeak::{not_run, succeeded};
use crate::error::AgentError;

/// Words no reply is expected to say as a clause of its own.
const SENTINEL: &str = "voxgate sentinel";

/// espeak-ng processes for one voice, one per synthesis that may run at once.
pub struct Phonemizer {
    voice: String,
    running: Vec<Mutex<Option<Running>>>,
}

struct Running {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// The sentinel's phonemes from this process.
    sentinel: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Phonemizer {
    /// Processes are started when first needed; `instances` at most.
    pub fn new(voice: &str, instances: usize) -> Self {
        Phonemizer { voice: voice.to_string(), running: (0..instances.max(1)).map(|_| Mutex::new(None)).collect() }
    }

    /// The phonemes of `text`, one entry per clause as espeak-ng splits it.
    /// Blocking.
    pub fn phonemize(&self, text: &str) -> Result<Vec<String>, AgentError> {
        let line = one_line(text);
        if line.to_lowercase().contains(SENTINEL) {
            return self.one_off(&line);
        }
        let mut slot = self.slot();
        if slot.is_none() {
            *slot = Some(self.start()?);
        }
        let running = slot.as_mut().expect("started above");
        match ask(running, &line) {
            Ok(lines) => Ok(lines),
            Err(e) => {
                // Killed with its answer half read: the next text starts a
                // fresh process rather than read the rest of this one.
                *slot = None;
                tracing::warn!(error = %e, "espeak-ng stopped answering; running it once for this text");
                self.one_off(&line)
            }
        }
    }

    fn slot(&self) -> MutexGuard<'_, Option<Running>> {
        for r in &self.running {
            if let Ok(guard) = r.try_lock() {
                return guard;
            }
        }
        // All busy: wait for the first (the inference pool bounds how many wait).
        self.running[0].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn start(&self) -> Result<Running, AgentError> {
        let mut child = Command::new("espeak-ng")
            .args(["-q", "--ipa", "-v", &self.voice])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(not_run)?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            return Err(AgentError::Inference("espeak-ng: no pipes".into()));
        };
        let mut running = Running { child, stdin, stdout: BufReader::new(stdout), sentinel: String::new() };
        writeln!(running.stdin, "{SENTINEL}").and_then(|()| running.stdin.flush()).map_err(not_run)?;
        let mut sentinel = String::new();
        running.stdout.read_line(&mut sentinel).map_err(not_run)?;
        running.sentinel = sentinel.trim().to_string();
        if running.sentinel.is_empty() {
            return Err(AgentError::Inference(format!("espeak-ng -v {} gave no phonemes", self.voice)));
        }
        Ok(running)
    }

    fn one_off(&self, text: &str) -> Result<Vec<String>, AgentError> {
        let out = succeeded(Command::new("espeak-ng").args(["-q", "--ipa", "-v", &self.voice, "--", text]).output().map_err(not_run)?)?;
        Ok(clauses(String::from_utf8_lossy(&out.stdout).lines()))
    }
}

/// `text` as one line: a line end inside would end a clause there.
fn one_line(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// The non-empty lines, trimmed.
fn clauses<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<String> {
    lines.map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect()
}

/// `line`'s clauses from a running process: every line it writes up to the
/// sentinel's.
fn ask(running: &mut Running, line: &str) -> std::io::Result<Vec<String>> {
    write!(running.stdin, "{line}\n{SENTINEL}\n")?;
    running.stdin.flush()?;
    let mut lines = Vec::new();
    let mut buf = String::new();
    loop {
        buf.clear();
        if running.stdout.read_line(&mut buf)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "espeak-ng exited"));
        }
        let l = buf.trim();
        if l == running.sentinel {
            return Ok(lines);
        }
        if !l.is_empty() {
            lines.push(l.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_process_answers_as_a_run_per_text_does() {
        let p = Phonemizer::new("en-us", 1);
        let texts = [
            "Hello there, we open at nine. What can I do?",
            "We're happy to assist you,",
            "Mr. Smith went to St.",
            "I live at 3.",
            "The price is $3.50",
            "",
            "...",
            "it's 10:30 am",
            "Call 555-1234.",
            "(paren",
            "two\nlines",
            "the voxgate sentinel said so",
            "émigré café",
        ];
        for text in texts {
            assert_eq!(p.phonemize(text).unwrap(), p.one_off(&one_line(text)).unwrap(), "{text:?}");
        }
        assert!(!p.phonemize("zebra").unwrap().is_empty());
    }

    #[test]
    fn a_process_that_died_is_started_again() {
        let p = Phonemizer::new("en-us", 1);
        let first = p.phonemize("We open at nine.").unwrap();
        {
            let mut slot = p.running[0].lock().unwrap();
            let running = slot.as_mut().unwrap();
            running.child.kill().unwrap();
            running.child.wait().unwrap();
        }
        assert_eq!(p.phonemize("We open at nine.").unwrap(), first, "answered once by a one-off run");
        assert_eq!(p.phonemize("We open at nine.").unwrap(), first, "then by a new process");
        assert!(p.running[0].lock().unwrap().is_some());
    }
}
