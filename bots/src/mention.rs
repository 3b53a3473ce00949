//! A Telegram `@username` mention of the bot in a message's text. Telegram matches
//! usernames without regard to case (`@LoraLoop_Bot` reaches `@loraloop_bot`), and a
//! name is not a mention of a longer one (`@loraloop_bot2` is another bot).

/// Whether `c` can be part of a username (Telegram's: letters, digits, `_`).
fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The text with every mention of `username` (given without the `@`) taken out and
/// the rest trimmed; `None` when the text does not mention it.
pub fn strip(text: &str, username: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut found = false;
    let mut rest = 0;
    for (at, _) in text.match_indices('@') {
        if at < rest {
            continue;
        }
        let end = at + 1 + username.len();
        let is_name = text
            .get(at + 1..end)
            .is_some_and(|n| n.eq_ignore_ascii_case(username));
        // A command names its bot right after itself (`/reset@loraloop_bot`), so only
        // what follows the name bounds it.
        let bounded = !text[end.min(text.len())..]
            .chars()
            .next()
            .is_some_and(name_char);
        if !username.is_empty() && is_name && bounded {
            out.push_str(&text[rest..at]);
            rest = end;
            found = true;
        }
    }
    out.push_str(&text[rest..]);
    found.then(|| out.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::strip;

    #[test]
    fn a_mention_is_found_in_any_case_and_taken_out() {
        let bot = "loraloop_bot";
        assert_eq!(
            strip("@loraloop_bot what is Zorblax?", bot).as_deref(),
            Some("what is Zorblax?")
        );
        assert_eq!(
            strip("hey @LoraLoop_Bot, hi", bot).as_deref(),
            Some("hey , hi")
        );
        assert_eq!(strip("/reset@loraloop_bot", bot).as_deref(), Some("/reset"));
        assert_eq!(strip("@loraloop_bot", bot).as_deref(), Some(""));
        assert_eq!(
            strip("@loraloop_bot @LORALOOP_BOT twice", bot).as_deref(),
            Some("twice")
        );
    }

    #[test]
    fn a_longer_name_or_no_mention_is_not_one() {
        let bot = "loraloop_bot";
        assert_eq!(strip("@loraloop_bot2 hello", bot), None);
        assert_eq!(strip("just chatting", bot), None);
        assert_eq!(strip("@ é @loraloop_b", bot), None);
        assert_eq!(strip("@loraloop_botü", bot).as_deref(), Some("ü"));
    }
}
