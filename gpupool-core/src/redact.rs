//! Keeping secrets out of messages: passwords in URLs become `***`.

/// Replaces the password of every `scheme://user:password@host` in `text`
/// with `***` (and a bare `scheme://token@host` user part too, since git
/// hosts take tokens there).
pub fn redact_url(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the first '/', whitespace or quote.
        let end = tail.find(|c: char| c == '/' || c.is_whitespace() || c == '"' || c == '\'').unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.split_once(':') {
                    Some((user, _)) => {
                        out.push_str(user);
                        out.push_str(":***");
                    }
                    None => out.push_str("***"),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Whether a URL carries a password (`user:password@`). A bare user such
/// as `ssh://git@host` is not one.
pub fn url_has_password(url: &str) -> bool {
    url.split_once("://").is_some_and(|(_, tail)| {
        let authority = &tail[..tail.find('/').unwrap_or(tail.len())];
        authority.rfind('@').is_some_and(|at| authority[..at].contains(':'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact_url("mysql://u:secret@db:3306/pool"), "mysql://u:***@db:3306/pool");
        assert_eq!(redact_url("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(
            redact_url("failed https://ghp_tok@github.com/a/b.git and amqp://g:g@h/%2f"),
            "failed https://***@github.com/a/b.git and amqp://g:***@h/%2f"
        );
        assert_eq!(redact_url("sqlite://.gpupool/queue.db"), "sqlite://.gpupool/queue.db");
        assert_eq!(redact_url("no url here"), "no url here");
        assert!(url_has_password("https://u:p@h/x"));
        assert!(!url_has_password("https://h/x") && !url_has_password("ssh://git@github.com/a/b.git"));
    }
}
