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
