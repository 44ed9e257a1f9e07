//! Conversation memory and its rendering into a prompt with the model's own
//! chat template (read from the GGUF metadata, rendered by minijinja).

use serde::Serialize;

use crate::error::AgentError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        ChatMessage { role, content: content.into() }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
}

impl ChatTemplate {
    pub fn new(source: &str) -> Result<Self, AgentError> {
        let mut env = minijinja::Environment::new();
        env.add_template_owned("chat", source.to_string()).map_err(|e| AgentError::Model(format!("chat template: {e}")))?;
        Ok(ChatTemplate { env })
    }

    /// The prompt for `messages` ending with the assistant's turn opened.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, AgentError> {
        self.render_with(messages, true)
    }

    /// The prompt for `messages` followed by a user turn opened, up to where
    /// the user's words go: every prompt answering that turn starts with it.
    pub fn open_user_turn(&self, messages: &[ChatMessage]) -> Result<String, AgentError> {
        // A character no transcript contains marks where the words go.
        const MARK: &str = "\u{1}";
        let mut with_turn = messages.to_vec();
        with_turn.push(ChatMessage::new(Role::User, MARK));
        let rendered = self.render_with(&with_turn, false)?;
        let at = rendered.rfind(MARK).ok_or_else(|| AgentError::Inference("chat template drops the user's words".into()))?;
        Ok(rendered[..at].to_string())
    }

    /// `messages` alone, without opening the assistant's turn: the prefix
    /// every later prompt of the conversation starts with.
    pub fn render_with(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, AgentError> {
        let tmpl = self.env.get_template("chat").map_err(|e| AgentError::Model(e.to_string()))?;
        tmpl.render(minijinja::context! { messages => minijinja::value::Serde(messages), add_generation_prompt => add_generation_prompt })
            .map_err(|e| AgentError::Inference(format!("chat template: {e}")))
    }
}
