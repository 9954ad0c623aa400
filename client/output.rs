//! Standard output for data: buffered, flushed per batch, and quiet about a
//! reader that went away.
//!
//! `gpuwatch-client snapshot --json | head -1` must not print a panic or an
//! error: a broken pipe ends the command quietly, with the exit code the
//! hosts earned. Any other write failure (a full disk) is reported once.

use std::io::{self, BufWriter, Stdout, Write};

use serde::Serialize;

/// Standard output went away, or could not be written.
#[derive(Debug)]
pub enum OutputClosed {
    /// The reader closed the pipe: not an error.
    BrokenPipe,
    /// Anything else.
    Failed(io::Error),
}

impl OutputClosed {
    fn from_io(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::BrokenPipe {
            OutputClosed::BrokenPipe
        } else {
            OutputClosed::Failed(e)
        }
    }

    /// Says so on stderr when it is worth saying; true if it was an error.
    pub fn report(&self) -> bool {
        match self {
            OutputClosed::BrokenPipe => false,
            OutputClosed::Failed(e) => {
                eprintln!("gpuwatch-client: cannot write to standard output: {e}");
                true
            }
        }
    }
}

/// Buffered standard output.
#[derive(Debug)]
pub struct Output {
    out: BufWriter<Stdout>,
}

impl Default for Output {
    fn default() -> Self {
        Self::new()
    }
}

impl Output {
    pub fn new() -> Self {
        Self {
            out: BufWriter::with_capacity(64 * 1024, io::stdout()),
        }
    }

    /// Writes one line (a newline is added).
    pub fn line(&mut self, text: &str) -> Result<(), OutputClosed> {
        self.out
            .write_all(text.as_bytes())
            .and_then(|()| self.out.write_all(b"\n"))
            .map_err(OutputClosed::from_io)
    }

    /// Writes one JSON object on its own line.
    pub fn json<T: Serialize>(&mut self, value: &T) -> Result<(), OutputClosed> {
        serde_json::to_writer(&mut self.out, value).map_err(|e| {
            let e: io::Error = e.into();
            OutputClosed::from_io(e)
        })?;
        self.out.write_all(b"\n").map_err(OutputClosed::from_io)
    }

    pub fn flush(&mut self) -> Result<(), OutputClosed> {
        self.out.flush().map_err(OutputClosed::from_io)
    }
}
