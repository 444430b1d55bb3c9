//! Model-name globs: `*` matches any run of characters (`/` and `:` included, since model
//! names like `qwen2.5:7b` or `org/model` are flat names, not paths), `?` one character.
//! Everything else matches itself. Tiny on purpose: route patterns are a handful of names.

/// Whether `pattern` has a wildcard.
pub fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?'])
}

/// Whether `name` matches `pattern` in full.
pub fn matches(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Iterative matcher with one backtrack point (the last `*`): linear in practice.
    let (mut pi, mut ni) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(c) if *c == '?' || *c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(matches("llama*", "llama3.1:8b"));
        assert!(matches("*", ""));
        assert!(matches("*-embed", "nomic-embed"));
        assert!(matches("gpt-4?", "gpt-4o"));
        assert!(matches("a*b*c", "axxbyyc"));
        assert!(matches("org/*", "org/model"));
        assert!(!matches("gpt-4?", "gpt-4"));
        assert!(!matches("llama*", "qwen"));
        assert!(!matches("a*b", "ac"));
        assert!(matches("exact", "exact"));
        assert!(!matches("exact", "exactly"));
        assert!(is_glob("a*") && is_glob("a?") && !is_glob("a"));
    }
}
