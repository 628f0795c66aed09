//! How chat messages become the text a base model continues: a transcript in a format that
//! the model's corpus can spell, which `/v1/chat/completions` ([`super::openai`]) hands to the
//! sampler.

use serde_json::Value;

use super::openai::{ApiError, ApiResult};

/// How chat messages become the text a base model continues. Each part's `{content}` is the
/// message's text; the transcript ends with `generation`, and `stop` ends the answer. A
/// template file (`serve --chat-template FILE`, TOML) sets any of the fields.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatTemplate {
    pub system: String,
    pub user: String,
    pub assistant: String,
    pub generation: String,
    pub stop: Vec<String>,
}

impl Default for ChatTemplate {
    /// `User:` / `Assistant:` lines, a system message as a first paragraph.
    fn default() -> ChatTemplate {
        ChatTemplate {
            system: "{content}\n\n".into(),
            user: "User: {content}\n".into(),
            assistant: "Assistant: {content}\n".into(),
            generation: "Assistant:".into(),
            stop: vec!["\nUser:".into()],
        }
    }
}

impl ChatTemplate {
    /// Reads a template file, naming what is wrong with it.
    pub fn load(path: &std::path::Path) -> crate::error::Result<ChatTemplate> {
        use crate::error::Error;
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let t: ChatTemplate = toml::from_str(&text).map_err(|e| {
            Error::Usage(format!(
                "--chat-template {}: {}; its keys are system, user, assistant (each with {{content}}), generation and stop",
                path.display(),
                e.message()
            ))
        })?;
        for (key, part) in [
            ("system", &t.system),
            ("user", &t.user),
            ("assistant", &t.assistant),
        ] {
            if !part.contains("{content}") {
                return Err(Error::Usage(format!(
                    "--chat-template {}: `{key}` has no {{content}} for the message's text",
                    path.display()
                )));
            }
        }
        Ok(t)
    }

    /// The transcript of `body`'s `messages`, ending where the assistant's answer begins.
    pub fn transcript(&self, body: &Value) -> ApiResult<String> {
        let messages = match body.get("messages") {
            Some(Value::Array(m)) if !m.is_empty() => m,
            _ => {
                return Err(ApiError::field(
                    "messages",
                    "`messages` must be a non-empty list of {role, content}",
                ))
            }
        };
        let mut text = String::new();
        for (i, m) in messages.iter().enumerate() {
            let part = match m.get("role").and_then(Value::as_str) {
                Some("system" | "developer") => &self.system,
                Some("user") => &self.user,
                Some("assistant") => &self.assistant,
                _ => {
                    return Err(ApiError::field(
                        &format!("messages[{i}].role"),
                        format!("`messages[{i}].role` must be system, user or assistant"),
                    ))
                }
            };
            text.push_str(&part.replace("{content}", &message_text(m, i)?));
        }
        text.push_str(&self.generation);
        Ok(text)
    }
}

/// A message's text: a string, or a list of parts of which the `text` ones count.
fn message_text(m: &Value, i: usize) -> ApiResult<String> {
    let bad = || {
        ApiError::field(
            &format!("messages[{i}].content"),
            format!("`messages[{i}].content` must be a string or a list of text parts"),
        )
    };
    match m.get("content") {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(
                |p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                    _ => Err(bad()),
                },
            )
            .collect::<ApiResult<Vec<_>>>()
            .map(|t| t.concat()),
        _ => Err(bad()),
    }
}
