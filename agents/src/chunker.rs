//! Cuts a stream of LLM text into pieces worth synthesizing: whole
//! sentences, and the first clause early so that the agent starts speaking
//! before its first sentence is finished.

/// The first piece may end at a comma once it has this many words.
const FIRST_CLAUSE_WORDS: usize = 4;
/// A piece never grows past this many characters (cut at a space).
const MAX_CHARS: usize = 160;

#[derive(Default)]
pub struct SentenceChunker {
    buf: String,
    emitted: usize,
}

impl SentenceChunker {
    /// Adds `text`; returns the pieces it completed.
    pub fn push(&mut self, text: &str) -> Vec<String> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        while let Some(end) = self.boundary() {
            let piece: String = self.buf.drain(..end).collect();
            if let Some(p) = speakable(&piece) {
                out.push(p);
                self.emitted += 1;
            }
        }
        out
    }

    /// What is left when the stream ends.
    pub fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.buf);
        speakable(&rest)
    }

    fn boundary(&self) -> Option<usize> {
        let chars: Vec<(usize, char)> = self.buf.char_indices().collect();
        for (i, &(pos, c)) in chars.iter().enumerate() {
            let next = chars.get(i + 1).map(|x| x.1);
            // A boundary needs the character after it, so "3." in "3.5" or
            // "Dr." followed by more text is judged with what follows.
            let Some(next) = next else { break };
            let end = pos + c.len_utf8();
            if matches!(c, '.' | '!' | '?') && next.is_whitespace() && words(&self.buf[..end]) >= 2 {
                return Some(end);
            }
            if c == '\n' && words(&self.buf[..end]) >= 1 {
                return Some(end);
            }
            if self.emitted == 0 && matches!(c, ',' | ';' | ':') && next.is_whitespace() && words(&self.buf[..end]) >= FIRST_CLAUSE_WORDS {
                return Some(end);
            }
        }
        if self.buf.len() > MAX_CHARS {
            return self.buf[..MAX_CHARS].rfind(' ').filter(|&p| p > 0);
        }
        None
    }
}

fn words(s: &str) -> usize {
    s.split_whitespace().count()
}

/// Text as it should be spoken: markdown and symbols a voice would read out
/// literally are dropped, whitespace collapsed; None when nothing is left.
pub fn speakable(text: &str) -> Option<String> {
    let cleaned: String = text.chars().filter(|c| !matches!(c, '*' | '#' | '_' | '`' | '~' | '|' | '<' | '>') && (c.is_alphanumeric() || c.is_ascii() || c.is_whitespace() || "’‘“”€£é".contains(*c))).collect();
    let s = cleaned.split_whitespace().map(spoken_word).collect::<Vec<_>>().join(" ");
    s.chars().any(char::is_alphanumeric).then_some(s)
}

/// Clock times and their markers as a voice should say them: "9:00" ->
/// "9", "AM" -> "a.m." (a voice reads "9:00 AM" as "nine zero zero am").
fn spoken_word(w: &str) -> String {
    let (core, tail) = w.split_at(w.trim_end_matches(|c: char| c.is_ascii_punctuation()).len());
    let spoken = match core {
        "AM" | "am" | "A.M" => "a.m.".to_string(),
        "PM" | "pm" | "P.M" => "p.m.".to_string(),
        _ => match core.split_once(':') {
            Some((h, "00")) if h.chars().all(|c| c.is_ascii_digit()) && !h.is_empty() => h.to_string(),
            Some((h, m)) if h.chars().all(|c| c.is_ascii_digit()) && m.len() == 2 && m.chars().all(|c| c.is_ascii_digit()) && !h.is_empty() => format!("{h} {m}"),
            _ => core.to_string(),
        },
    };
    if spoken.ends_with('.') && tail.starts_with('.') { format!("{spoken}{}", &tail[1..]) } else { format!("{spoken}{tail}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(tokens: &[&str]) -> Vec<String> {
        let mut c = SentenceChunker::default();
        let mut out: Vec<String> = tokens.iter().flat_map(|t| c.push(t)).collect();
        out.extend(c.finish());
        out
    }

    #[test]
    fn first_clause_then_sentences() {
        let out = feed(&["We", " are", " open", " every", " day,", " from", " nine", " to", " five.", " See", " you", " soon!"]);
        assert_eq!(out, vec!["We are open every day,", "from nine to five.", "See you soon!"]);
    }

    #[test]
    fn decimals_and_short_openers_stay_whole() {
        let out = feed(&["It", " costs", " 3.50", " dollars.", " Ok", " then"]);
        assert_eq!(out, vec!["It costs 3.50 dollars.", "Ok then"]);
    }

    #[test]
    fn clock_times_are_spoken() {
        assert_eq!(speakable("From 9:00 AM to 12:30 PM."), Some("From 9 a.m. to 12 30 p.m.".into()));
    }

    #[test]
    fn markdown_is_not_read_out() {
        assert_eq!(speakable("**Hours**: 9-5 #1"), Some("Hours: 9-5 1".into()));
        assert_eq!(speakable(" ** "), None);
    }

    #[test]
    fn long_text_without_punctuation_is_cut_at_a_space() {
        let long = "word ".repeat(60);
        let out = feed(&[&long]);
        assert!(out.len() >= 2 && out.iter().all(|p| p.len() <= MAX_CHARS));
    }
}
