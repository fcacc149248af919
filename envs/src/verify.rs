//! Strict answer extraction and checking.
//!
//! MedS3's public evaluation takes the last `The answer is(.*)` and counts a
//! hit when the gold letter appears *anywhere* in it, case-insensitively, so
//! gold `A` matches `B. Ceftriaxone` (the `a` in "Ceftriaxone"). Here an answer counts only if
//! it names exactly one option, unambiguously: one letter, one option's exact
//! text, or a letter together with that same option's text.

use crate::problem::{Choice, Gold, Problem};

/// Phrases that introduce a final answer anywhere in a line (matched
/// case-insensitively, at word boundaries). MedS3 emits the first one.
const INLINE_MARKERS: [&str; 3] = ["the answer is", "the final answer is", "answer is:"];

/// Labels that introduce a final answer only at the start of a line (after
/// whitespace or markdown `*`/`#`), as in Alpaca/MedThink outputs
/// (`Answer: B`, `**Final answer:** B`). Restricted to line starts so that
/// ordinary prose such as "to reach an answer: first..." is not an answer.
const LINE_LABELS: [&str; 2] = ["answer:", "final answer:"];

/// The final answer stated in `text`, or `None` if it states none.
///
/// Finds the last occurrence of "The answer is", "The final answer is",
/// "answer is:" (all case-insensitive), or a line starting with "Answer:" /
/// "Final answer:", and returns the rest of that line with markdown `**`
/// removed, a leading colon and one trailing period stripped, and one pair of
/// enclosing parentheses removed: `The answer is **(B)**.` gives `B`.
///
/// The rest of the line is kept whole rather than cut at the first period,
/// because answers such as `B. Ceftriaxone`, `E. coli` or `4.6` contain
/// periods; a trailing explanation therefore stays in the answer and makes
/// it fail to resolve (see [`resolve_option`]). An empty remainder
/// (`The answer is` at the end of a line) is no answer.
pub fn extract_answer(text: &str) -> Option<String> {
    // ASCII lowercasing keeps byte offsets, so positions map back to `text`.
    let lower = text.to_ascii_lowercase();
    let start = last_marker_end(&lower)?;
    let rest = &text[start..];
    let line = rest.split('\n').next().unwrap_or_default();
    let cleaned = clean_answer(&line.replace("**", ""));
    (!cleaned.is_empty()).then_some(cleaned)
}

/// Byte offset just past the last answer marker in `lower`, if any.
fn last_marker_end(lower: &str) -> Option<usize> {
    let bytes = lower.as_bytes();
    let is_word = |i: usize| bytes.get(i).is_some_and(|b| b.is_ascii_alphanumeric());
    let inline = INLINE_MARKERS.iter().filter_map(|m| {
        lower
            .rmatch_indices(m)
            // "the answer isn't", "bathe answer is" are not markers.
            .find(|&(i, _)| {
                let ends_in_word = m.ends_with(|c: char| c.is_ascii_alphanumeric());
                (i == 0 || !is_word(i - 1)) && !(ends_in_word && is_word(i + m.len()))
            })
            .map(|(i, _)| i + m.len())
    });
    let labelled = LINE_LABELS.iter().filter_map(|m| {
        lower
            .rmatch_indices(m)
            .find(|&(i, _)| {
                let line_start = lower[..i].rfind('\n').map_or(0, |n| n + 1);
                lower[line_start..i]
                    .chars()
                    .all(|c| c.is_whitespace() || c == '*' || c == '#')
            })
            .map(|(i, _)| i + m.len())
    });
    inline.chain(labelled).max()
}

/// Strips the decoration around an extracted answer (see [`extract_answer`]).
fn clean_answer(raw: &str) -> String {
    let s = raw.trim();
    let s = s.strip_prefix(':').unwrap_or(s).trim();
    let s = s.strip_suffix('.').unwrap_or(s).trim_end();
    let s = match s.strip_prefix('(').and_then(|t| t.strip_suffix(')')) {
        Some(inner) if !inner.contains(['(', ')']) => inner.trim(),
        _ => s,
    };
    s.to_string()
}

/// Canonical form for comparing answer texts: lowercase, whitespace runs
/// collapsed to one space, trimmed, trailing `.,;:!?` removed.
pub fn normalize(s: &str) -> String {
    let collapsed = s
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase();
    collapsed
        .trim_end_matches(|c: char| {
            matches!(c, '.' | ',' | ';' | ':' | '!' | '?') || c.is_whitespace()
        })
        .to_string()
}

/// The outcome of checking one response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// What [`extract_answer`] found in the response.
    pub extracted: Option<String>,
    /// The option letter the extracted answer unambiguously names, if any.
    pub chosen: Option<String>,
    pub correct: bool,
}

/// Checks `response` against `problem`'s gold answer under the strict rule:
/// an option question is answered correctly only if the extracted answer
/// resolves (by [`resolve_option`]) to the gold letter; a free-text question
/// only if the normalised answer equals the normalised gold text.
pub fn verify(problem: &Problem, response: &str) -> Verdict {
    let extracted = extract_answer(response);
    let chosen = extracted
        .as_deref()
        .and_then(|a| resolve_option(&problem.options, a));
    let correct = match (&problem.gold, &extracted) {
        (Gold::Option(gold), _) => chosen.as_deref() == Some(gold.as_str()),
        (Gold::Text(gold), Some(answer)) => normalize(answer) == normalize(gold),
        (Gold::Text(_), None) => false,
    };
    Verdict {
        extracted,
        chosen,
        correct,
    }
}

/// The letter of the one option that `answer` names, or `None` if it names
/// none or more than one.
///
/// Accepted forms (letters case-insensitive, optionally preceded by
/// `option `): a bare letter `B`, `(B)`, `B)`, `B.`; the option's text alone;
/// `B. text`, `B) text` or `(B) text` where `text` is option B's own text.
/// Texts are compared after [`normalize`]. Everything else (`B or C`,
/// `A. <text of B>`, prose) names nothing.
///
/// Real option lists make some answers ambiguous, and those name nothing:
/// two options with the same text (MedMCQA has such items), or a lowercase
/// bare letter that is also another option's text (MedMCQA options
/// `A. a  B. c  C. bc`: is `c` option C or option B?). An uppercase bare
/// letter is always read as a letter, as MedS3 prompts ask for letters.
/// A text that merely looks like a letter form, such as `E. coli`, still
/// names the option whose text it is.
pub fn resolve_option(options: &[Choice], answer: &str) -> Option<String> {
    let answer = answer.trim();
    let by_letter = |l: char| {
        options
            .iter()
            .find(|c| c.letter.eq_ignore_ascii_case(l.encode_utf8(&mut [0; 4])))
    };
    let mut candidates: Vec<&Choice> = Vec::new();
    if let Some((letter, rest)) = letter_form(answer) {
        let rest = normalize(rest);
        match by_letter(letter) {
            Some(choice) if rest.is_empty() && letter.is_ascii_uppercase() => {
                return Some(choice.letter.clone());
            }
            Some(choice) if rest.is_empty() || normalize(&choice.text) == rest => {
                candidates.push(choice);
            }
            _ => {}
        }
    }
    let whole = normalize(answer);
    candidates.extend(options.iter().filter(|c| normalize(&c.text) == whole));
    let first = candidates.first()?;
    candidates
        .iter()
        .all(|c| c.letter == first.letter)
        .then(|| first.letter.clone())
}

/// Splits `B`, `(B)`, `B)`, `B.`, `option B`, `B. text`, `B) text`,
/// `(B) text` into the letter and the (untrimmed) text after it.
fn letter_form(s: &str) -> Option<(char, &str)> {
    let s = match s.get(..7) {
        Some(p) if p.eq_ignore_ascii_case("option ") => s[7..].trim_start(),
        _ => s,
    };
    let mut chars = s.chars();
    match (chars.next(), chars.next(), chars.next()) {
        (Some('('), Some(l), Some(')')) if l.is_ascii_alphabetic() => Some((l, &s[3..])),
        (Some(l), Some('.' | ')'), _) if l.is_ascii_alphabetic() => {
            let rest = &s[2..];
            // `B.5` or `B)x` is not a letter followed by a text.
            (rest.is_empty() || rest.starts_with(char::is_whitespace) || normalize(rest).is_empty())
                .then_some((l, rest))
        }
        (Some(l), None, _) if l.is_ascii_alphabetic() => Some((l, "")),
        _ => None,
    }
}
