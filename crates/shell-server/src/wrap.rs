//! The remembering shell, as text: how a command is wrapped so that it runs exactly once in
//! the directory and environment the agent's previous command left behind, and how the new
//! directory and environment are read back from its output.
//!
//! Every call is one `sh -c` of a small script: restore the remembered state, `eval` the
//! command (quoted, so its text never mixes with the script's), then print a trailer after
//! a per-request random marker — `pwd`, the environment before, the environment after — and
//! exit with the command's own status. Nothing runs twice and no second exec is needed; the
//! trailer is cut off the output (also while streaming) before anyone sees it. When the
//! trailer is missing (the command called `exit`, was killed, or its output overflowed the
//! cap) the remembered state simply stays as it was.
//!
//! Variables are remembered as the shell's own `export -p` statements, so their quoting is
//! the shell's, never ours; only those that differ from the base environment of the exec are
//! kept.

use std::collections::BTreeMap;

/// Output bytes reserved for the trailer on top of the caller's cap.
pub const TRAILER_ROOM: usize = 32 * 1024;

/// Remembered exports larger than this (all statements together) are not kept.
pub const MAX_EXPORTS_BYTES: usize = 16 * 1024;
/// Nor more than this many variables.
pub const MAX_EXPORTS: usize = 128;

/// Names never remembered: the shell maintains them itself.
fn ignored(name: &str) -> bool {
    matches!(name, "PWD" | "OLDPWD" | "SHLVL" | "_") || name.starts_with("__tether")
}

/// `s` as one single-quoted shell word: `'` becomes `'\''`.
pub fn sh_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// What to restore before the command.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Restore {
    /// `cd` here first (absent: start where the exec starts).
    pub cwd: Option<String>,
    /// `export` statements, by name.
    pub exports: BTreeMap<String, String>,
    pub unset: Vec<String>,
}

/// A wrapped command: the script to run under `sh -c` and its marker.
#[derive(Clone, Debug)]
pub struct Wrapped {
    pub script: String,
    pub marker: String,
    pub remember_env: bool,
}

impl Wrapped {
    /// The line that starts the trailer in stdout (the `\n` before it is ours too).
    pub fn trailer_start(&self) -> String {
        format!("\n{}:cwd\n", self.marker)
    }
}

/// Wraps `command` so it runs once after `restore`, then reports its directory and (when
/// `remember_env`) its environment after a fresh random marker.
pub fn wrap(command: &str, restore: &Restore, remember_env: bool) -> Wrapped {
    let marker = format!("__tether_{}", uuid::Uuid::new_v4().simple());
    let mut s = String::with_capacity(command.len() + 512);
    if remember_env {
        s.push_str("__tether_env0=$(export -p)\n");
    }
    if let Some(cwd) = &restore.cwd {
        let q = sh_quote(cwd);
        s.push_str(&format!(
            "cd {q} 2>/dev/null || printf 'tether: the remembered directory %s is gone; running in %s\\n' {q} \"$PWD\" >&2\n"
        ));
    }
    if remember_env {
        for name in &restore.unset {
            if is_name(name) {
                s.push_str(&format!("unset {name}\n"));
            }
        }
        for (name, stmt) in &restore.exports {
            if is_name(name) {
                s.push_str(stmt);
                s.push('\n');
            }
        }
    }
    s.push_str("eval ");
    s.push_str(&sh_quote(command));
    s.push('\n');
    s.push_str("__tether_rc=$?\n");
    s.push_str(&format!("printf '\\n%s\\n' '{marker}:cwd'\npwd\n"));
    if remember_env {
        s.push_str(&format!(
            "printf '%s\\n' '{marker}:env0' \"$__tether_env0\" '{marker}:env1'\nexport -p\n"
        ));
    }
    s.push_str("exit \"$__tether_rc\"\n");
    Wrapped {
        script: s,
        marker,
        remember_env,
    }
}

/// A shell variable name.
pub fn is_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
        && s.len() <= 256
}

/// What the trailer said.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trailer {
    /// The directory the command ended in (absent when `pwd` printed nothing).
    pub cwd: Option<String>,
    /// Exported-variable changes against the exec's base environment (when remembered).
    pub env: Option<(BTreeMap<String, String>, Vec<String>)>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Splits stdout into the command's own output and the trailer. `None` as trailer: it was
/// not there (or not whole); the whole stdout is then the command's.
pub fn split_trailer(stdout: &str, w: &Wrapped) -> (usize, Option<Trailer>) {
    let bytes = stdout.as_bytes();
    let start = w.trailer_start();
    let Some(pos) = find(bytes, start.as_bytes()) else {
        return (stdout.len(), None);
    };
    let rest = &stdout[pos + start.len()..];
    let (cwd_part, env_part) = if w.remember_env {
        let env0 = format!("{}:env0\n", w.marker);
        let Some(i) = find(rest.as_bytes(), env0.as_bytes()) else {
            return (pos, None);
        };
        (&rest[..i], Some(&rest[i + env0.len()..]))
    } else {
        (rest, None)
    };
    let cwd = cwd_part.strip_suffix('\n').unwrap_or(cwd_part);
    let cwd = (!cwd.is_empty() && cwd.starts_with('/')).then(|| cwd.to_string());
    let env = match env_part {
        None => None,
        Some(e) => {
            let env1 = format!("\n{}:env1\n", w.marker);
            let Some(i) = find(e.as_bytes(), env1.as_bytes()) else {
                return (pos, None);
            };
            let before = parse_exports(&e[..i]);
            let after = parse_exports(&e[i + env1.len()..]);
            Some(env_changes(&before, &after))
        }
    };
    (pos, Some(Trailer { cwd, env }))
}

/// Parses `export -p` output (`export NAME='v'`, bash's `declare -x NAME="v"`, possibly
/// spanning lines inside quotes) into `export …` statements by name.
pub fn parse_exports(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stmt = String::new();
    #[derive(PartialEq)]
    enum Q {
        None,
        Single,
        Double,
    }
    let mut q = Q::None;
    let mut escaped = false;
    let mut take = |stmt: &mut String| {
        let s = stmt.trim();
        let rest = s
            .strip_prefix("export ")
            .or_else(|| s.strip_prefix("declare -x "))
            .map(str::trim_start);
        if let Some(rest) = rest {
            let name: String = rest.chars().take_while(|c| *c != '=').collect();
            if is_name(&name) && !ignored(&name) {
                out.insert(name, format!("export {rest}"));
            }
        }
        stmt.clear();
    };
    for c in text.chars() {
        if escaped {
            escaped = false;
            stmt.push(c);
            continue;
        }
        match (&q, c) {
            (Q::None, '\n') => {
                take(&mut stmt);
                continue;
            }
            (Q::None, '\'') => q = Q::Single,
            (Q::Single, '\'') => q = Q::None,
            (Q::None, '"') => q = Q::Double,
            (Q::Double, '"') => q = Q::None,
            (Q::None | Q::Double, '\\') => escaped = true,
            _ => {}
        }
        stmt.push(c);
    }
    if q == Q::None {
        take(&mut stmt);
    }
    out
}

/// Exports in `after` that differ from `before`, and names of `before` gone from `after`.
pub fn env_changes(
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
) -> (BTreeMap<String, String>, Vec<String>) {
    let changed: BTreeMap<String, String> = after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let unset = before
        .keys()
        .filter(|k| !after.contains_key(*k))
        .cloned()
        .collect();
    (changed, unset)
}

/// Whether remembered exports stay within bounds.
pub fn exports_fit(exports: &BTreeMap<String, String>, unset: &[String]) -> bool {
    let bytes: usize = exports
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum::<usize>()
        + unset.iter().map(String::len).sum::<usize>();
    exports.len() + unset.len() <= MAX_EXPORTS && bytes <= MAX_EXPORTS_BYTES
}

/// Cuts the trailer out of streamed stdout: passes everything before the trailer's first
/// line, holding back only as many bytes as could be the start of that line.
#[derive(Debug)]
pub struct StreamFilter {
    needle: Vec<u8>,
    held: Vec<u8>,
    done: bool,
}

impl StreamFilter {
    pub fn new(w: &Wrapped) -> Self {
        Self {
            needle: w.trailer_start().into_bytes(),
            held: Vec::new(),
            done: false,
        }
    }

    /// Bytes of `chunk` (and earlier held ones) that are safe to pass on now.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        if self.done {
            return Vec::new();
        }
        self.held.extend_from_slice(chunk);
        if let Some(pos) = find(&self.held, &self.needle) {
            self.done = true;
            self.held.truncate(pos);
            return std::mem::take(&mut self.held);
        }
        // Hold back only the longest tail that could still grow into the trailer line
        // (usually nothing, or one `\n`), so output streams without delay.
        let max = self.needle.len().saturating_sub(1).min(self.held.len());
        let keep = (1..=max)
            .rev()
            .find(|&k| self.held[self.held.len() - k..] == self.needle[..k])
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_vec();
        self.held.drain(..cut);
        out
    }

    /// What is still held when the output ends without a trailer.
    pub fn finish(&mut self) -> Vec<u8> {
        if self.done {
            return Vec::new();
        }
        self.done = true;
        std::mem::take(&mut self.held)
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn cut_str(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut end = max;
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
}

/// Fits stdout and stderr together into `cap` bytes; true when anything was cut. The shorter
/// stream keeps what it can up to half; the rest goes to the other.
pub fn fit(stdout: &mut String, stderr: &mut String, cap: usize) -> bool {
    let (a, b) = (stdout.len(), stderr.len());
    if a + b <= cap {
        return false;
    }
    let half = cap / 2;
    let (max_a, max_b) = if b <= half {
        (cap - b, b)
    } else if a <= half {
        (a, cap - a)
    } else {
        (half, cap - half)
    };
    cut_str(stdout, max_a);
    cut_str(stderr, max_b);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn run(script: &str, shell: &str) -> (String, String, i32) {
        let out = Command::new(shell)
            .arg("-c")
            .arg(script)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("BASE", "b")
            .output()
            .expect("run shell");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            out.status.code().unwrap_or(-1),
        )
    }

    fn shells() -> Vec<&'static str> {
        ["/bin/sh", "/bin/busybox", "/bin/bash"]
            .into_iter()
            .filter(|s| std::path::Path::new(s).exists())
            .collect()
    }

    /// A whole round: wrap, run, split, apply, run again.
    fn session(shell: &str, cmds: &[&str]) -> Vec<(String, i32)> {
        let mut restore = Restore::default();
        let mut outs = Vec::new();
        for c in cmds {
            let w = wrap(c, &restore, true);
            let script = if shell.ends_with("busybox") {
                // busybox runs its `sh` applet when called as `busybox sh -c …`
                format!("exec /bin/busybox sh -c {}", sh_quote(&w.script))
            } else {
                w.script.clone()
            };
            let sh = if shell.ends_with("busybox") {
                "/bin/sh"
            } else {
                shell
            };
            let (out, _err, rc) = run(&script, sh);
            let (end, t) = split_trailer(&out, &w);
            outs.push((out[..end].to_string(), rc));
            if let Some(t) = t {
                if let Some(cwd) = t.cwd {
                    restore.cwd = Some(cwd);
                }
                if let Some((e, u)) = t.env {
                    restore.exports = e;
                    restore.unset = u;
                }
            }
        }
        outs
    }

    #[test]
    fn quoting_survives_every_byte() {
        for s in [
            "plain",
            "it's",
            "'",
            "a b\nc",
            "$(rm -rf /)",
            "`x`",
            "\\",
            "\"q\"",
        ] {
            let (out, _, rc) = run(&format!("printf %s {}", sh_quote(s)), "/bin/sh");
            assert_eq!((out.as_str(), rc), (s, 0), "{s:?}");
        }
    }

    #[test]
    fn cwd_and_exports_persist_and_commands_run_once() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path().join("it's a \"dir\"");
        std::fs::create_dir(&d).expect("mkdir");
        let dq = sh_quote(d.to_str().expect("utf8"));
        for shell in shells() {
            let f = d.join("f");
            let _ = std::fs::remove_file(&f);
            let outs = session(
                shell,
                &[
                    &format!("cd {dq} && echo x >> f"),
                    "pwd",
                    "export FOO='a b'\"'\"'c' ; unset BASE",
                    "echo \"$FOO|${BASE-gone}\"",
                    "exit 3",
                    "pwd; echo no-newline | tr -d '\\n'",
                ],
            );
            assert_eq!(outs[0], (String::new(), 0), "{shell}");
            assert_eq!(outs[1].0.trim_end(), d.to_str().expect("utf8"), "{shell}");
            assert_eq!(outs[3].0, "a b'c|gone\n", "{shell}");
            assert_eq!(outs[4].1, 3, "{shell}: exit code kept");
            assert!(
                outs[5].0.ends_with("no-newline"),
                "{shell}: {:?}",
                outs[5].0
            );
            let lines = std::fs::read_to_string(&f).expect("f");
            assert_eq!(lines, "x\n", "{shell}: the command ran exactly once");
        }
    }

    #[test]
    fn exit_status_and_syntax_errors() {
        let w = wrap("false", &Restore::default(), false);
        let (out, _, rc) = run(&w.script, "/bin/sh");
        assert_eq!(rc, 1);
        let (end, t) = split_trailer(&out, &w);
        assert_eq!(end, 0);
        assert!(t.expect("trailer").cwd.is_some());
        // A syntax error ends the shell: no trailer, the state simply stays.
        let w = wrap("if", &Restore::default(), true);
        let (out, _, rc) = run(&w.script, "/bin/sh");
        assert_ne!(rc, 0);
        assert_eq!(split_trailer(&out, &w).1, None);
    }

    #[test]
    fn parses_export_formats() {
        let text = "export A='x'\nexport B='multi\nline'\ndeclare -x C=\"q\\\"uote\"\nexport D\nexport PWD='/x'\nexport E='it'\"'\"'s'\nnoise\n";
        let m = parse_exports(text);
        assert_eq!(m["A"], "export A='x'");
        assert_eq!(m["B"], "export B='multi\nline'");
        assert_eq!(m["C"], "export C=\"q\\\"uote\"");
        assert_eq!(m["D"], "export D");
        assert_eq!(m["E"], "export E='it'\"'\"'s'");
        assert!(!m.contains_key("PWD"));
        assert_eq!(m.len(), 5);
        let before = parse_exports("export A='x'\nexport G='1'\n");
        let (ch, unset) = env_changes(&before, &m);
        assert!(!ch.contains_key("A"));
        assert!(ch.contains_key("B"));
        assert_eq!(unset, vec!["G".to_string()]);
    }

    #[test]
    fn stream_filter_cuts_the_trailer_across_chunks() {
        let w = wrap("x", &Restore::default(), true);
        let full = format!("hello\nworld{}{}\n/tmp\nrest", w.trailer_start(), "");
        for size in [1, 2, 3, 7, 64, 4096] {
            let mut f = StreamFilter::new(&w);
            let mut got = Vec::new();
            for chunk in full.as_bytes().chunks(size) {
                got.extend(f.push(chunk));
            }
            got.extend(f.finish());
            assert_eq!(
                String::from_utf8(got).expect("utf8"),
                "hello\nworld",
                "{size}"
            );
        }
        // Output streams at once: at most a trailing newline waits for the next chunk.
        let mut f = StreamFilter::new(&w);
        assert_eq!(f.push(b"one\n"), b"one");
        assert_eq!(f.push(b"two"), b"\ntwo");
        let mut f = StreamFilter::new(&w);
        let mut got = f.push(b"no trailer at all");
        got.extend(f.finish());
        assert_eq!(got, b"no trailer at all");
    }

    #[test]
    fn fit_keeps_the_cap() {
        let (mut a, mut b) = ("a".repeat(100), "b".repeat(10));
        assert!(fit(&mut a, &mut b, 50));
        assert_eq!((a.len(), b.len()), (40, 10));
        let (mut a, mut b) = ("é".repeat(10), String::new());
        assert!(fit(&mut a, &mut b, 5));
        assert_eq!(a, "éé");
        let (mut a, mut b) = ("x".to_string(), "y".to_string());
        assert!(!fit(&mut a, &mut b, 2));
    }
}
