//! A server-sent-events parser (the WHATWG event-stream format) reduced to what chat streams
//! use: `data:` lines joined by `\n` into one event, dispatched at a blank line; comments
//! (`:`), `event:`, `id:` and `retry:` ignored; `\n`, `\r\n` and `\r` line ends. Bytes may
//! arrive split anywhere, even inside a UTF-8 character.

use std::collections::VecDeque;

#[derive(Default)]
pub struct SseParser {
    pending: Vec<u8>,
    data: Option<String>,
    events: VecDeque<String>,
    /// The last byte seen was `\r` (a following `\n` belongs to the same line end).
    after_cr: bool,
}

impl SseParser {
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' => self.line(),
                b'\r' => {
                    self.after_cr = true;
                    self.line();
                }
                _ => self.pending.push(b),
            }
        }
    }

    /// The body ended: an event without its closing blank line still counts.
    pub fn finish(&mut self) {
        if !self.pending.is_empty() {
            self.line();
        }
        self.dispatch();
    }

    pub fn next_event(&mut self) -> Option<String> {
        self.events.pop_front()
    }

    fn line(&mut self) {
        let line = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        if line.is_empty() {
            self.dispatch();
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_str(), ""),
        };
        if field == "data" {
            match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            }
        }
    }

    fn dispatch(&mut self) {
        if let Some(d) = self.data.take() {
            self.events.push_back(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(p: &mut SseParser) -> Vec<String> {
        std::iter::from_fn(|| p.next_event()).collect()
    }

    #[test]
    fn parses_split_events() {
        let src = "data: {\"a\":1}\n\n: keep-alive\n\nevent: x\r\ndata: {\"b\":\r\ndata: 2}\r\n\r\ndata: [DONE]\n\n";
        let mut p = SseParser::default();
        for b in src.as_bytes().chunks(3) {
            p.feed(b);
        }
        assert_eq!(all(&mut p), vec!["{\"a\":1}", "{\"b\":\n2}", "[DONE]"]);
    }

    #[test]
    fn utf8_split_inside_a_character_and_unterminated_last_event() {
        let src = "data: héllo\n\ndata:tail".as_bytes();
        let mut p = SseParser::default();
        for b in src.chunks(1) {
            p.feed(b);
        }
        assert_eq!(all(&mut p), vec!["héllo"]);
        p.finish();
        assert_eq!(all(&mut p), vec!["tail"]);
    }
}
