//! Chat prompts rendered with the model's own Jinja chat template (`tokenizer.chat_template`),
//! by minijinja, the way Hugging Face's `apply_chat_template` renders them.

use ferry_schemas::ChatMessage;
use minijinja::{context, Environment, ErrorKind};

use super::ModelError;

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

const NAME: &str = "chat";

impl ChatTemplate {
    pub fn new(source: &str) -> Result<Self, ModelError> {
        let mut env = Environment::new();
        // Templates written for Hugging Face's renderer call `raise_exception` to reject chats
        // they cannot render (say, roles that do not alternate).
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| ModelError::Template(format!("the model's chat template does not compile: {e}")))?;
        Ok(Self { env })
    }

    /// The prompt text for `messages`, ending with the opening of the assistant's turn.
    pub fn render(&self, messages: &[ChatMessage], bos_token: &str, eos_token: &str) -> Result<String, ModelError> {
        let messages: Vec<_> = messages
            .iter()
            .map(|m| context! { role => m.role.as_str(), content => m.content.as_str() })
            .collect();
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| ModelError::Template(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => bos_token,
            eos_token => eos_token,
        })
        .map_err(|e| ModelError::Template(e.to_string()))
    }
}

/// A part of a rendered chat: the template's own text, or a message's content as the caller
/// wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Template(String),
    Content(String),
}

impl ChatTemplate {
    /// The prompt for `messages` as the template's text and the messages' contents, apart, so
    /// that a content can be tokenised with its control-token look-alikes kept as text. Each
    /// content is rendered as a placeholder and found again in the output; `None` when the
    /// template does not pass every content through exactly once and unchanged (one that trims
    /// or rewrites it), which the caller must then refuse.
    pub fn render_segments(
        &self,
        messages: &[ChatMessage],
        bos_token: &str,
        eos_token: &str,
    ) -> Result<Option<Vec<Segment>>, ModelError> {
        let holder = |i: usize| format!("\u{E000}ferry-content-{i}\u{E001}");
        let placed: Vec<ChatMessage> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| ChatMessage {
                role: m.role,
                content: holder(i),
            })
            .collect();
        let rendered = self.render(&placed, bos_token, eos_token)?;
        let mut out = Vec::new();
        let mut rest = rendered.as_str();
        for (i, m) in messages.iter().enumerate() {
            let h = holder(i);
            let Some(at) = rest.find(&h) else { return Ok(None) };
            if at > 0 {
                out.push(Segment::Template(rest[..at].to_string()));
            }
            out.push(Segment::Content(m.content.clone()));
            rest = &rest[at + h.len()..];
        }
        if rest.contains('\u{E000}') {
            return Ok(None);
        }
        if !rest.is_empty() {
            out.push(Segment::Template(rest.to_string()));
        }
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_schemas::Role;

    /// SmolLM2-135M-Instruct's template, as its GGUF file carries it.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    fn msg(role: Role, content: &str) -> ChatMessage {
        ChatMessage {
            role,
            content: content.into(),
        }
    }

    #[test]
    fn renders_chatml_with_default_system_prompt() {
        let t = ChatTemplate::new(SMOLLM2).expect("template compiles");
        let out = t.render(&[msg(Role::User, "Hi")], "", "").expect("renders");
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn explicit_system_prompt_replaces_default() {
        let t = ChatTemplate::new(SMOLLM2).expect("template compiles");
        let out = t
            .render(&[msg(Role::System, "Be brief."), msg(Role::User, "Hi")], "", "")
            .expect("renders");
        assert!(out.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n"), "{out}");
        assert!(!out.contains("SmolLM"));
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}").expect("compiles");
        let err = t.render(&[msg(Role::User, "x")], "", "").expect_err("must fail");
        assert!(err.to_string().contains("roles must alternate"), "{err}");
    }
}
