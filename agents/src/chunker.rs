//! Cuts a stream of LLM text into pieces worth synthesizing: whole
//! sentences, and the first phrase early so that the agent starts speaking
//! before its first sentence is finished.

/// The first piece may end at a comma once it has this many words (or the
/// first phrase's, when that is fewer).
const FIRST_CLAUSE_WORDS: usize = 3;
/// Words a first phrase may add to its minimum so as not to end on a word
/// that leans on the next.
const FIRST_PHRASE_SLACK: usize = 2;
/// A piece never grows past this many characters (cut at a space).
const MAX_CHARS: usize = 160;

/// Words a phrase starts with: a cut before one of them falls where a
/// speaker could breathe.
const PHRASE_OPENERS: &[&str] = &[
    "to", "with", "for", "and", "or", "but", "so", "because", "if", "when", "while", "at", "in", "on", "from", "by", "that", "which", "who", "where", "until", "before", "after", "as",
];

/// Words that lean on the word after them: a phrase is not cut after one.
const LEANING: &[&str] = &[
    "a", "an", "the", "of", "our", "your", "my", "their", "its", "his", "her", "this", "these", "those", "is", "are", "was", "were", "per", "to",
];

/// A piece of the reply to synthesize. `continues` is true when the piece
/// ends inside a sentence (a phrase cut): it is then spoken with the
/// rising, unfinished intonation of a comma, not a full stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub text: String,
    pub continues: bool,
}

impl Piece {
    /// A text spoken as it stands (a greeting, a last line).
    pub fn whole(text: &str) -> Piece {
        Piece { text: text.to_string(), continues: false }
    }
}

/// Without a comma, the first piece ends before a word that opens a phrase
/// ("to", "with", "and"...) once it has `first_words` words, or after
/// `first_words` + [`FIRST_PHRASE_SLACK`] (fewer when the last of them
/// leans on the next: "the", "of", "our"...): the caller waits in silence
/// for the first piece, its words are written one token at a time, and its
/// synthesis takes as long as its audio.
pub struct SentenceChunker {
    buf: String,
    emitted: usize,
    first_words: usize,
}

impl SentenceChunker {
    /// A chunker whose first phrase has at least `first_words` words (1 or more).
    pub fn new(first_words: usize) -> SentenceChunker {
        SentenceChunker { buf: String::new(), emitted: 0, first_words: first_words.max(1) }
    }

    /// Adds `text`; returns the pieces it completed.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        while let Some((end, continues)) = self.boundary() {
            let piece: String = self.buf.drain(..end).collect();
            if let Some(text) = speakable(&piece) {
                out.push(Piece { text, continues });
                self.emitted += 1;
            }
        }
        out
    }

    /// What is left when the stream ends.
    pub fn finish(&mut self) -> Option<Piece> {
        let rest = std::mem::take(&mut self.buf);
        speakable(&rest).as_deref().map(Piece::whole)
    }

    /// Where the next piece ends, and whether it ends inside a sentence.
    fn boundary(&self) -> Option<(usize, bool)> {
        if let Some(end) = self.punctuation() {
            return Some((end, false));
        }
        if self.emitted == 0 {
            if let Some(end) = self.first_phrase() {
                return Some((end, true));
            }
        }
        if self.buf.len() > MAX_CHARS {
            return self.buf[..MAX_CHARS].rfind(' ').filter(|&p| p > 0).map(|p| (p, true));
        }
        None
    }

    /// The end of the first phrase of a sentence still without a comma:
    /// before the first phrase opener once `first_words` words are said,
    /// else after `first_words` + [`FIRST_PHRASE_SLACK`] words less those at
    /// the end that lean on the next. Only whole words count (a word is
    /// whole once the space after it has arrived).
    fn first_phrase(&self) -> Option<usize> {
        // (end, leans on the next word) of each whole word.
        let mut words: Vec<(usize, bool)> = Vec::new();
        let mut word_start = None;
        for (pos, c) in self.buf.char_indices() {
            if c.is_whitespace() {
                if let Some(start) = word_start.take() {
                    let word = self.buf[start..pos].trim_matches(|c: char| !c.is_alphanumeric()).to_lowercase();
                    if words.len() >= self.first_words && PHRASE_OPENERS.contains(&word.as_str()) {
                        return Some(start);
                    }
                    words.push((pos, LEANING.contains(&word.as_str())));
                    if words.len() >= self.first_words + FIRST_PHRASE_SLACK {
                        let keep = words.iter().rposition(|w| !w.1).map_or(0, |i| i + 1).max(self.first_words);
                        return Some(words[keep - 1].0);
                    }
                }
            } else if word_start.is_none() {
                word_start = Some(pos);
            }
        }
        None
    }

    /// The end of the first sentence (or, for the first piece, clause)
    /// whose punctuation has arrived.
    fn punctuation(&self) -> Option<usize> {
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
            if self.emitted == 0 && matches!(c, ',' | ';' | ':') && next.is_whitespace() && words(&self.buf[..end]) >= FIRST_CLAUSE_WORDS.min(self.first_words) {
                return Some(end);
            }
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

    fn pieces(tokens: &[&str]) -> Vec<Piece> {
        let mut c = SentenceChunker::new(4);
        let mut out: Vec<Piece> = tokens.iter().flat_map(|t| c.push(t)).collect();
        out.extend(c.finish());
        out
    }

    fn feed(tokens: &[&str]) -> Vec<String> {
        pieces(tokens).into_iter().map(|p| p.text).collect()
    }

    fn words_of(text: &str) -> Vec<String> {
        text.split_inclusive(' ').map(str::to_string).collect()
    }

    #[test]
    fn a_long_first_sentence_is_cut_before_a_phrase_and_the_rest_kept_whole() {
        let text = "We're happy to assist you with any questions or concerns. If you need a time, ask.";
        let out = pieces(&words_of(text).iter().map(String::as_str).collect::<Vec<_>>());
        let expected = [("We're happy to assist you", true), ("with any questions or concerns.", false), ("If you need a time, ask.", false)];
        assert_eq!(out, expected.map(|(t, c)| Piece { text: t.into(), continues: c }));
    }

    #[test]
    fn a_first_sentence_without_a_phrase_opener_is_cut_after_six_words() {
        let text = "Yes absolutely we certainly do welcome brand new patients every day.";
        let out = pieces(&words_of(text).iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(out[0], Piece { text: "Yes absolutely we certainly do welcome".into(), continues: true });
        assert_eq!(out[1].text, "brand new patients every day.");
    }

    #[test]
    fn the_first_phrase_does_not_end_on_a_word_that_leans_on_the_next() {
        let first = |text: &str| pieces(&words_of(text).iter().map(String::as_str).collect::<Vec<_>>()).remove(0).text;
        assert_eq!(first("We're now in the process of opening our own clinic here."), "We're now in the process");
        assert_eq!(first("We can offer two appointments per day to you."), "We can offer two appointments");
        assert_eq!(first("We think that this is the best place."), "We think that this", "never fewer than four words");
        // An opener still cuts first, once four words are said.
        assert_eq!(first("We're currently open on Saturdays and Sundays."), "We're currently open on Saturdays");
    }

    #[test]
    fn a_shorter_first_phrase_is_cut_sooner_and_the_rest_is_unchanged() {
        let text = "We're happy to assist you with any questions or concerns. If you need a time, ask.";
        let mut c = SentenceChunker::new(2);
        let mut out: Vec<Piece> = words_of(text).iter().flat_map(|t| c.push(t)).collect();
        out.extend(c.finish());
        let expected = [("We're happy", true), ("to assist you with any questions or concerns.", false), ("If you need a time, ask.", false)];
        assert_eq!(out, expected.map(|(t, c)| Piece { text: t.into(), continues: c }));
        let first = |text: &str| {
            let mut c = SentenceChunker::new(2);
            words_of(text).iter().flat_map(|t| c.push(t)).next().unwrap().text
        };
        assert_eq!(first("Yes absolutely we certainly do welcome them."), "Yes absolutely we certainly");
        assert_eq!(first("Yes we are the best clinic."), "Yes we", "not ending on \"are the\"");
        assert_eq!(first("Sure, we open at nine."), "Sure, we open", "a one-word clause is not a piece");
        assert_eq!(first("Yes, we do, at nine."), "Yes, we do,");
    }

    #[test]
    fn short_sentences_are_not_cut_and_a_word_is_judged_whole() {
        // Four words and the opener, but the sentence ends first.
        assert_eq!(feed(&["We", " are", " open", " until", " nine."]), vec!["We are open until nine."]);
        // "to" is not yet a word: it may still become "today".
        let mut c = SentenceChunker::new(4);
        assert!(c.push("Sure thing we can see to").is_empty());
        assert_eq!(c.push("day at nine."), vec![Piece { text: "Sure thing we can see today".into(), continues: true }]);
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
