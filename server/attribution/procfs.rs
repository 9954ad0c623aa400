//! Reads what `/proc` says about one process: the few small files
//! attribution needs (`stat` for the start time, `comm`, `status` for the
//! real uid, `cmdline`, `cgroup`), and the passwd file for uid → user name.
//!
//! Owns the rules that protect callers from what those files carry:
//! command lines are only read when configured, bounded on a char
//! boundary, and in `redacted` mode the values of well-known secret
//! arguments are replaced before anything leaves this module. Owns the
//! words for failures too ([`ProcError`]): a pid that has gone is not the
//! same problem as a file the daemon may not read.
//!
//! Four small reads by hand rather than the `procfs` crate: the files and
//! fields needed are few and stable, and the root must be a fixture tree
//! in tests.

use std::{
    collections::HashMap,
    fs, io,
    io::Read,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use super::CommandLines;

/// Why a file under `/proc/<pid>` could not be had.
#[derive(Debug)]
pub enum ProcError {
    /// The process has exited (its directory is gone, or the kernel says
    /// so while reading). `dir` is the `/proc/<pid>` looked for: a daemon in
    /// another pid namespace than NVML's (a container without `hostPID`)
    /// sees every GPU process this way.
    Gone { pid: u32, dir: PathBuf },
    /// The file exists (or should) but cannot be read: permissions,
    /// `ProtectProc`, another pid namespace, a broken fixture.
    Unreadable { path: PathBuf, error: io::Error },
    /// The file was read but does not say what it must.
    Malformed { path: PathBuf, what: &'static str },
}

impl ProcError {
    /// The reason in words, naming the path and the error.
    pub fn reason(&self) -> String {
        match self {
            Self::Gone { pid, dir } => format!(
                "no {}: process {pid} has exited, or is hidden from this daemon (another pid namespace, or hidepid / ProtectProc)",
                dir.display()
            ),
            Self::Unreadable { path, error } => format!("cannot read {}: {error}", path.display()),
            Self::Malformed { path, what } => format!("{} is malformed: {what}", path.display()),
        }
    }

    /// One key per distinct kind of problem, for logging it once: the file
    /// (not the pid) and the error kind.
    pub fn kind_key(&self) -> String {
        let file = |p: &Path| {
            p.file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        match self {
            Self::Gone { .. } => "gone".to_owned(),
            Self::Unreadable { path, error } => {
                format!("unreadable {} {:?}", file(path), error.kind())
            }
            Self::Malformed { path, what } => format!("malformed {} {what}", file(path)),
        }
    }
}

impl std::fmt::Display for ProcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason())
    }
}

impl std::error::Error for ProcError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Unreadable { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// The files of one `/proc` tree (the host's, or a fixture).
#[derive(Debug, Clone)]
pub struct ProcFs {
    root: PathBuf,
}

/// Reads past this many bytes of `cmdline` are never needed: the output
/// is cut far sooner.
const CMDLINE_READ_CAP: u64 = 256 * 1024;

impl ProcFs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, pid: u32, file: &str) -> PathBuf {
        self.root.join(pid.to_string()).join(file)
    }

    /// Reads a file into `buf` (cleared first), up to `cap` bytes.
    fn read_into(
        &self,
        pid: u32,
        file: &str,
        cap: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), ProcError> {
        let path = self.path(pid, file);
        buf.clear();
        let result = fs::File::open(&path).and_then(|f| f.take(cap).read_to_end(buf));
        match result {
            Ok(_) => Ok(()),
            Err(error) => Err(self.classify(pid, path, error)),
        }
    }

    fn read_string(&self, pid: u32, file: &str) -> Result<String, ProcError> {
        let mut buf = Vec::new();
        self.read_into(pid, file, 64 * 1024, &mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// A missing file is a gone process when the pid's directory is gone
    /// too; ESRCH is the kernel saying the task exited mid-read.
    fn classify(&self, pid: u32, path: PathBuf, error: io::Error) -> ProcError {
        const ESRCH: i32 = 3;
        let gone = error.raw_os_error() == Some(ESRCH)
            || (error.kind() == io::ErrorKind::NotFound
                && !self.root.join(pid.to_string()).exists());
        if gone {
            ProcError::Gone {
                pid,
                dir: self.root.join(pid.to_string()),
            }
        } else {
            ProcError::Unreadable { path, error }
        }
    }

    /// The process's start time, `stat` field 22 (clock ticks after boot):
    /// with the pid, it names one process across pid reuse. This is the one
    /// read a cached process costs each tick, so it is one `read()` into
    /// the caller's reused buffer (a `stat` line is far shorter than it:
    /// the name is at most 15 bytes) rather than reading until EOF.
    pub fn start_time(&self, pid: u32, buf: &mut Vec<u8>) -> Result<u64, ProcError> {
        const STAT_BUF: usize = 4096;
        let path = self.path(pid, "stat");
        buf.clear();
        buf.resize(STAT_BUF, 0);
        let read = fs::File::open(&path).and_then(|mut f| f.read(buf));
        match read {
            Ok(n) => buf.truncate(n),
            Err(error) => return Err(self.classify(pid, path, error)),
        }
        parse_start_time(buf).ok_or(ProcError::Malformed {
            path,
            what: "no start time (field 22)",
        })
    }

    /// `comm`, without its newline.
    pub fn comm(&self, pid: u32) -> Result<String, ProcError> {
        let mut comm = self.read_string(pid, "comm")?;
        if comm.ends_with('\n') {
            comm.pop();
        }
        Ok(comm)
    }

    /// The real uid, the first number of `status`'s `Uid:` line.
    pub fn real_uid(&self, pid: u32) -> Result<u32, ProcError> {
        let status = self.read_string(pid, "status")?;
        parse_real_uid(&status).ok_or_else(|| ProcError::Malformed {
            path: self.path(pid, "status"),
            what: "no Uid: line",
        })
    }

    /// The command line as configured: `Ok(None)` when command lines are
    /// off (the file is not even opened) or empty (kernel threads,
    /// zombies).
    pub fn command_line(
        &self,
        pid: u32,
        mode: CommandLines,
        max_bytes: usize,
    ) -> Result<Option<String>, ProcError> {
        if mode == CommandLines::Off {
            return Ok(None);
        }
        let mut buf = Vec::new();
        let cap = CMDLINE_READ_CAP.max(max_bytes as u64 * 2);
        self.read_into(pid, "cmdline", cap, &mut buf)?;
        Ok(render_command_line(&buf, mode, max_bytes))
    }

    /// The text of `cgroup`.
    pub fn cgroup(&self, pid: u32) -> Result<String, ProcError> {
        self.read_string(pid, "cgroup")
    }

    /// Whether this tree is the kernel's procfs (it has the `self` link a
    /// fixture tree lacks): only there does a held file say when its
    /// process is gone (see [`ProcFs::open_handle`]).
    pub fn is_kernel_procfs(&self) -> bool {
        self.root.join("self").is_symlink()
    }

    /// Opens `/proc/<pid>/comm` to be held: on the kernel's procfs the open
    /// file stays bound to that one process, and reading it fails with
    /// ESRCH once the process is reaped, even if the pid is reused. So a
    /// held handle is a same-process check of one `pread` with no file
    /// generated (a `stat` read is an open, a read of ~50 computed fields,
    /// and a close).
    pub fn open_handle(&self, pid: u32) -> io::Result<fs::File> {
        fs::File::open(self.path(pid, "comm"))
    }

    /// Whether the process a handle was opened on still exists.
    pub fn handle_alive(handle: &fs::File) -> bool {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 64];
        handle.read_at(&mut buf, 0).is_ok()
    }

    /// Whether `/proc/<pid>` exists.
    pub fn exists(&self, pid: u32) -> bool {
        self.root.join(pid.to_string()).exists()
    }
}

/// Field 22 of `/proc/<pid>/stat`. The second field (the name, in
/// parentheses) may hold spaces and parentheses, so fields are counted
/// after the last `)`: that is field 3 onwards.
pub fn parse_start_time(stat: &[u8]) -> Option<u64> {
    let close = stat.iter().rposition(|b| *b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    rest.split_ascii_whitespace().nth(22 - 3)?.parse().ok()
}

/// The real uid from `status` text.
pub fn parse_real_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The mask put where a secret was.
pub const REDACTED: &str = "***";

/// NUL-separated `cmdline` bytes → space-joined, redacted as `mode` says,
/// cut to `max_bytes` on a char boundary. Redaction comes first, so a cut
/// never exposes part of a secret.
pub fn render_command_line(raw: &[u8], mode: CommandLines, max_bytes: usize) -> Option<String> {
    if mode == CommandLines::Off {
        return None;
    }
    let text = String::from_utf8_lossy(raw);
    let args: Vec<&str> = text.trim_end_matches('\0').split('\0').collect();
    if args.iter().all(|a| a.is_empty()) {
        return None;
    }
    let mut line = match mode {
        CommandLines::Redacted => redact_args(&args).join(" "),
        _ => args.join(" "),
    };
    truncate_on_char_boundary(&mut line, max_bytes);
    Some(line)
}

/// Cuts `s` to at most `max_bytes`, on a char boundary.
pub fn truncate_on_char_boundary(s: &mut String, max_bytes: usize) {
    if s.len() > max_bytes {
        let mut cut = max_bytes;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

/// Replaces the values of secret-looking arguments:
/// `--token=x` and `--password x` (a flag whose name has a secret word:
/// token, password, passwd, secret, credential(s), auth, apikey, or ends in
/// api-key / access-key / secret-key / private-key; but not names ending
/// in file, path or dir, whose value is a path), `KEY=VALUE` where KEY has
/// such a word (`HF_TOKEN=…`, `AWS_SECRET_ACCESS_KEY=…`), and the password
/// of a URL's userinfo (`https://user:***@host`). Single-letter flags are
/// left alone: `-p` is a port as often as a password.
pub fn redact_args(args: &[&str]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut redact_next = false;
    for arg in args {
        if redact_next && !arg.starts_with('-') {
            out.push(REDACTED.to_owned());
            redact_next = false;
            continue;
        }
        redact_next = false;
        if let Some(flag) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) {
            let (name, value) = match flag.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (flag, None),
            };
            if name.chars().count() > 1 && is_secret_name(name) {
                match value {
                    Some(_) => {
                        let prefix_len = arg.len() - flag.len() + name.len() + 1;
                        out.push(format!("{}{REDACTED}", &arg[..prefix_len]));
                    }
                    None => {
                        out.push((*arg).to_owned());
                        redact_next = true;
                    }
                }
                continue;
            }
        } else if let Some((key, _)) = arg.split_once('=')
            && is_env_key(key)
            && is_secret_name(key)
        {
            out.push(format!("{key}={REDACTED}"));
            continue;
        }
        out.push(redact_url_password(arg));
    }
    out
}

fn is_env_key(key: &str) -> bool {
    let mut chars = key.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Whether a flag or variable name names a secret (see [`redact_args`]).
pub fn is_secret_name(name: &str) -> bool {
    let norm = name.to_ascii_lowercase().replace(['_', '.'], "-");
    let words: Vec<&str> = norm.split('-').filter(|w| !w.is_empty()).collect();
    if matches!(words.last(), Some(&("file" | "path" | "dir"))) {
        return false;
    }
    const WORDS: &[&str] = &[
        "token",
        "password",
        "passwd",
        "secret",
        "credential",
        "credentials",
        "auth",
        "apikey",
    ];
    const TAILS: &[&str] = &["api-key", "access-key", "secret-key", "private-key"];
    words.iter().any(|w| WORDS.contains(w)) || TAILS.iter().any(|t| norm.ends_with(t))
}

/// `scheme://user:pass@host…` → `scheme://user:***@host…`, anywhere in
/// the argument (for `--url=https://…`).
fn redact_url_password(arg: &str) -> String {
    let Some(scheme_end) = arg.find("://") else {
        return arg.to_owned();
    };
    let authority_start = scheme_end + 3;
    let rest = &arg[authority_start..];
    let authority_len = rest.find(['/', '?', '#', ' ']).unwrap_or(rest.len());
    let authority = &rest[..authority_len];
    let Some(at) = authority.rfind('@') else {
        return arg.to_owned();
    };
    let Some(colon) = authority[..at].find(':') else {
        return arg.to_owned();
    };
    format!(
        "{}{}{REDACTED}{}",
        &arg[..authority_start],
        &authority[..=colon],
        &arg[authority_start + at..]
    )
}

/// uid → user name from a passwd file, parsed once and parsed again when
/// the file changes (its mtime or length), checked at most every
/// `recheck`.
#[derive(Debug)]
pub struct Passwd {
    path: PathBuf,
    recheck: Duration,
    checked_at: Option<Instant>,
    stamp: Option<(SystemTime, u64)>,
    users: HashMap<u32, String>,
    generation: u64,
    error: Option<String>,
}

impl Passwd {
    pub fn new(path: impl Into<PathBuf>, recheck: Duration) -> Self {
        Self {
            path: path.into(),
            recheck,
            checked_at: None,
            stamp: None,
            users: HashMap::new(),
            generation: 0,
            error: None,
        }
    }

    /// Re-reads the file if it is due for a check and has changed;
    /// whether it was due.
    pub fn refresh(&mut self, now: Instant) -> bool {
        if self
            .checked_at
            .is_some_and(|t| now.duration_since(t) < self.recheck)
        {
            return false;
        }
        self.checked_at = Some(now);
        let stamp = fs::metadata(&self.path).and_then(|m| Ok((m.modified()?, m.len())));
        match stamp {
            Ok(stamp) if Some(stamp) == self.stamp => {}
            Ok(stamp) => match fs::read_to_string(&self.path) {
                Ok(text) => {
                    self.users = parse_passwd(&text);
                    self.stamp = Some(stamp);
                    self.generation += 1;
                    self.error = None;
                }
                Err(e) => self.fail(format!("cannot read {}: {e}", self.path.display())),
            },
            Err(e) => self.fail(format!("cannot read {}: {e}", self.path.display())),
        }
        true
    }

    fn fail(&mut self, reason: String) {
        if !self.users.is_empty() || self.stamp.is_some() {
            self.generation += 1;
        }
        self.users.clear();
        self.stamp = None;
        self.error = Some(reason);
    }

    pub fn user(&self, uid: u32) -> Option<&str> {
        self.users.get(&uid).map(String::as_str)
    }

    /// Bumped each time the table changes, so cached names can be redone.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Why the file could not be read, on the last check.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }
}

/// `name:pw:uid:gid:gecos:home:shell` lines; the first name for a uid wins.
pub fn parse_passwd(text: &str) -> HashMap<u32, String> {
    let mut users = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let mut fields = line.split(':');
        let (Some(name), Some(_), Some(uid)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        if let (false, Ok(uid)) = (name.is_empty(), uid.parse::<u32>()) {
            users.entry(uid).or_insert_with(|| name.to_owned());
        }
    }
    users
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redacted(args: &[&str]) -> String {
        redact_args(args).join(" ")
    }

    #[test]
    fn start_time_is_field_22_even_with_spaces_and_parens_in_the_name() {
        let stat = b"4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 1 0 987654 12345678 300 18446744073709551615";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time(b"4242 (x) S 1 2"), None);
        assert_eq!(parse_start_time(b"garbage"), None);
    }

    #[test]
    fn real_uid_is_the_first_uid_field() {
        let status = "Name:\tpython\nUmask:\t0022\nUid:\t1000\t0\t0\t0\nGid:\t100\t100\t100\t100\n";
        assert_eq!(parse_real_uid(status), Some(1000));
        assert_eq!(parse_real_uid("Name:\tx\n"), None);
    }

    #[test]
    fn secret_flags_have_their_values_replaced_in_both_spellings() {
        assert_eq!(
            redacted(&[
                "train",
                "--token=abc",
                "--password",
                "hunter2",
                "--epochs",
                "3"
            ]),
            "train --token=*** --password *** --epochs 3"
        );
        assert_eq!(
            redacted(&[
                "x",
                "--api-key=k1",
                "--apikey",
                "k2",
                "--aws-secret-access-key",
                "k3",
                "-auth=t"
            ]),
            "x --api-key=*** --apikey *** --aws-secret-access-key *** -auth=***"
        );
        assert_eq!(
            redacted(&[
                "x",
                "--hf_token",
                "t",
                "--db-passwd=p",
                "--client-secret",
                "s",
                "--credentials",
                "c"
            ]),
            "x --hf_token *** --db-passwd=*** --client-secret *** --credentials ***"
        );
    }

    #[test]
    fn ordinary_flags_and_lookalikes_are_kept() {
        let args = [
            "x",
            "-p",
            "8080",
            "--key",
            "/etc/tls.key",
            "--max-tokens",
            "512",
            "--author",
            "me",
            "--tokenizer=bpe",
            "--token-file",
            "/run/token",
            "--monkey",
            "3",
        ];
        assert_eq!(redacted(&args), args.join(" "));
    }

    #[test]
    fn a_secret_flag_followed_by_a_flag_is_a_switch_not_a_value() {
        assert_eq!(
            redacted(&["x", "--auth", "--verbose", "y"]),
            "x --auth --verbose y"
        );
    }

    #[test]
    fn env_style_secrets_are_replaced() {
        assert_eq!(
            redacted(&[
                "env",
                "HF_TOKEN=hf_abc",
                "AWS_SECRET_ACCESS_KEY=zz",
                "MAX_TOKENS=5",
                "PATH=/bin",
                "DB_PASSWORD=p=q"
            ]),
            "env HF_TOKEN=*** AWS_SECRET_ACCESS_KEY=*** MAX_TOKENS=5 PATH=/bin DB_PASSWORD=***"
        );
    }

    #[test]
    fn url_passwords_are_replaced_wherever_the_url_is() {
        assert_eq!(
            redacted(&[
                "git",
                "clone",
                "https://bob:s3cret@git.example.com/repo.git",
                "--mirror=s3://ak:sk@bucket/x",
                "https://plain.example.com/a:b@c",
                "https://bob@host/x",
            ]),
            "git clone https://bob:***@git.example.com/repo.git --mirror=s3://ak:***@bucket/x https://plain.example.com/a:b@c https://bob@host/x"
        );
    }

    #[test]
    fn command_lines_are_joined_bounded_on_a_char_boundary_and_off_by_default() {
        let raw = b"python\0train.py\0--name\0caf\xc3\xa9\0";
        assert_eq!(
            render_command_line(raw, CommandLines::Full, 256).as_deref(),
            Some("python train.py --name café")
        );
        // "python train.py --name caf" is 26 bytes; é is 2 bytes: 27 cuts inside it.
        assert_eq!(
            render_command_line(raw, CommandLines::Full, 27).as_deref(),
            Some("python train.py --name caf")
        );
        assert_eq!(render_command_line(raw, CommandLines::Off, 256), None);
        assert_eq!(render_command_line(b"", CommandLines::Full, 256), None);
        assert_eq!(
            render_command_line(b"x\0--token\0abcdefgh\0", CommandLines::Redacted, 12).as_deref(),
            Some("x --token **")
        );
        assert_eq!(
            render_command_line(b"x\0--token\0abcdefgh\0", CommandLines::Full, 256).as_deref(),
            Some("x --token abcdefgh")
        );
    }

    #[test]
    fn passwd_is_parsed_and_reread_when_it_changes() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("passwd");
        fs::write(
            &path,
            "# comment\nroot:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\nalias:x:1000:1000::/:/bin/sh\nbroken\n",
        )?;
        let mut passwd = Passwd::new(&path, Duration::ZERO);
        passwd.refresh(Instant::now());
        assert_eq!(passwd.user(0), Some("root"));
        assert_eq!(passwd.user(1000), Some("alice"));
        assert_eq!(passwd.user(1001), None);
        let generation = passwd.generation();
        passwd.refresh(Instant::now());
        assert_eq!(
            passwd.generation(),
            generation,
            "unchanged file is not re-parsed"
        );
        fs::write(
            &path,
            "root:x:0:0:root:/root:/bin/sh\nbob:x:1001:1001::/home/bob:/bin/sh\n",
        )?;
        passwd.refresh(Instant::now());
        assert_eq!(passwd.user(1000), None);
        assert_eq!(passwd.user(1001), Some("bob"));
        assert!(passwd.generation() > generation);
        fs::remove_file(&path)?;
        passwd.refresh(Instant::now());
        assert_eq!(passwd.user(1001), None);
        assert!(passwd.error().is_some_and(|e| e.contains("passwd")));
        Ok(())
    }

    #[test]
    fn passwd_is_not_rechecked_before_its_interval() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("passwd");
        fs::write(&path, "alice:x:1000:1000::/:/bin/sh\n")?;
        let mut passwd = Passwd::new(&path, Duration::from_secs(3600));
        let now = Instant::now();
        passwd.refresh(now);
        fs::write(&path, "bob:x:1000:1000::/:/bin/sh\n")?;
        passwd.refresh(now);
        assert_eq!(passwd.user(1000), Some("alice"));
        passwd.refresh(now + Duration::from_secs(3601));
        assert_eq!(passwd.user(1000), Some("bob"));
        Ok(())
    }
}
